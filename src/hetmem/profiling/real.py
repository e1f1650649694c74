"""Real-model profiling: the whole model end to end (``hetmem.llm.generate``) at each context length.

The context is the first ``length`` tokens of the packaged essays (real text, exact length). Prefill
is chunked and dense (its attention is timed as Apply by the attention hook); decode runs the method
in every layer for ``decode_tokens`` steps. Every time is measured; ``rest`` is everything in the
model that is not one of the method's steps (projections, MLP, norms, embedding, LM head, cache).
"""

from __future__ import annotations

import torch

from hetmem.ops import counts as C
from hetmem.profiling.counters import OpTally, StepCounter
from hetmem.profiling.records import phase_records
from hetmem.profiling.sweep import fit_context, window_reason
from hetmem.core.timer import StepTimer
from hetmem.llm.generate import generate
from hetmem.tasks.haystack import essay_text

PREFILL_CHUNK = 1024


class _CountingMethod:
    """The method, with every pipeline it builds wrapped by a StepCounter."""

    def __init__(self, method, counter: StepCounter):
        self._method, self._counter = method, counter

    def pipeline(self, device, timer, layer_idx: int = 0):
        return self._counter.wrap(self._method.pipeline(device, timer, layer_idx=layer_idx))

    def __getattr__(self, item):
        return getattr(self._method, item)


def shape_of(model, name: str) -> dict:
    c = model.config
    heads = c.num_attention_heads
    return {
        "name": name,
        "layers": c.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "vocab": c.vocab_size,
        "max_context": int(getattr(c, "max_position_embeddings", 0) or 2048),
    }


class ModelRunner:
    def __init__(self, lm, decode_tokens: int = 4, counting: bool = True, trace: bool = True):
        self.lm = lm
        self.decode_tokens = decode_tokens
        self.counting, self.trace = counting, trace
        self.shape = shape_of(lm.model, lm.name)
        p = next(lm.model.parameters())
        self.device, self.dtype = str(p.device), p.dtype
        self.esize = p.element_size()
        self._ids: torch.Tensor | None = None
        self._warm: set[str] = set()

    def fit(self, length: int) -> tuple[int, str | None]:
        """The prompt that runs for a named ``length`` (shortened so the decode steps fit the window) and a note."""
        return fit_context(length, self.decode_tokens + 1, self.lm.max_context, self.lm.name,
                           f"{self.decode_tokens} timed decode steps + the first generated token")

    def check(self, length: int) -> str | None:
        return window_reason(length, self.decode_tokens + 1, self.lm.max_context, self.lm.name)

    def input_ids(self, length: int) -> torch.Tensor:
        if self._ids is None or self._ids.shape[1] < length:
            text = essay_text()
            chars = 8 * length + 1024  # tokenize only what is needed (a few characters per token)
            ids = self.lm.tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
            while len(ids) < length and chars < len(text):
                chars *= 4
                ids = self.lm.tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
            while len(ids) < length:
                ids = ids + ids
            self._ids = torch.tensor([ids])
        return self._ids[:, :length]

    def _generate(self, method, length: int, timer: StepTimer, new_tokens: int, progress: bool):
        return generate(self.lm.model, self.input_ids(length), method, new_tokens, eos_token_ids=None,
                        prefill_chunk=PREFILL_CHUNK, progress=progress, timer=timer)

    def run(self, method, length: int, base: dict, progress: bool = True) -> tuple[dict, list[dict], list[tuple]]:
        if method.name not in self._warm:  # first use of a method: a short untimed run warms the kernels up
            self._generate(method, min(64, length), StepTimer(enabled=False), 2, progress=False)
            self._warm.add(method.name)
        timer = StepTimer(trace=self.trace)
        counter = StepCounter(timer, enabled=self.counting)
        res = self._generate(_CountingMethod(method, counter), length, timer, self.decode_tokens + 1, progress)
        s, e = self.shape, self.esize
        L, n = length, len(res.token_ids) - 1
        B, H, Hkv, D = 1, s["heads"], s["kv_heads"], s["head_dim"]
        chunks = [(min(PREFILL_CHUNK, L - a), a + min(PREFILL_CHUNK, L - a)) for a in range(0, L, PREFILL_CHUNK)]
        pre_apply, pre_rest = OpTally(), OpTally()
        for lq, lk in chunks:
            pre_apply.add([C.prefill_attention(B, H, Hkv, lq, lk, D, e)], s["layers"])
            pre_rest.add(C.dense_layer(lq, s["hidden"], H, Hkv, D, s["intermediate"], e), s["layers"])
            pre_rest.add(C.lm_head(1, s["hidden"], s["vocab"], e))
        dec_rest = OpTally(C.dense_layer(1, s["hidden"], H, Hkv, D, s["intermediate"], e), n * s["layers"])
        dec_rest.add(C.lm_head(1, s["hidden"], s["vocab"], e), n)
        pre, pre_sum = phase_records(
            base=base, phase="prefill", timer=timer, counter=counter, total_ms=res.prefill_ms, tokens=L,
            layers=s["layers"], rest=pre_rest, rest_calls=len(chunks) * s["layers"],
            extra_counts={"apply": pre_apply})
        dec, dec_sum = phase_records(
            base=base, phase="decode", timer=timer, counter=counter, total_ms=res.decode_ms, tokens=n,
            layers=s["layers"], rest=dec_rest, rest_calls=n * s["layers"])
        return {"prefill": pre_sum, "decode": dec_sum}, pre + dec, list(timer.events or [])
