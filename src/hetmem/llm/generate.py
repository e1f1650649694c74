"""Greedy generation with a method's pipeline running inside every attention layer."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hetmem.errors import HetmemError
from hetmem.llm import attention
from hetmem.llm.arch import describe
from hetmem.llm.paged_cache import PagedKVCache
from hetmem.core.steps import MemoryMethod as Method
from hetmem.llm.recall import RecallMeter
from hetmem.core.timer import StepTimer
from hetmem.ops import fast


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_tokens: int
    timer: StepTimer
    prefill_ms: float
    decode_ms: float
    logits: list[torch.Tensor] = field(default_factory=list)
    recall: dict | None = None  # attention-mass recall of the method's selections (when asked for)
    memory: dict = field(default_factory=dict)  # KV bytes held at the end, and the method's own report
    measurement_ms: float = 0.0  # measurement work done during decode (recall), already excluded from decode_ms
    # With ``generate(..., prefilled=p)``: the shared prefill's own measured time (``prefill_ms`` is then the
    # time to copy its KV into this method's cache and run the method's Prepare over it).
    shared_prefill_ms: float | None = None

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + self.decode_ms


def arch_notes(arch, method) -> dict:
    """What the run record says about layers that are not plain full attention (kept small)."""
    out = {}
    if arch.sliding_layers:
        w = sorted({arch.windows[i] for i in arch.sliding_layers})
        if getattr(method, "window_layers_dense", False):
            how = "these layers keep their window whole (it is their memory); eviction runs on the other layers"
        elif method.family == "sparse-attention":
            how = "selection on these layers is made inside the window"
        else:
            how = "attention on these layers covers the window"
        out["sliding_window_layers"] = {"layers": arch.sliding_layers, "window": w[0] if len(w) == 1 else w,
                                        "note": how}
    if arch.mla_rank is not None:
        out["mla"] = (f"latent KV cache (c_kv {arch.mla_rank} + k_rope {arch.key_dim - arch.mla_rank} per token); "
                      "methods select and attend on it with absorbed projections")
    return out


@dataclass
class Prefill:
    """A prompt prefilled once with dense attention: each layer's keys and values (RoPE applied), the last
    position's logits and, when asked for, each layer's attention inputs. ``generate(..., prefilled=p)`` copies
    it into a method's own cache (running the method's Prepare over it) instead of prefilling again."""

    input_ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [B, 1, vocab]
    prefill_ms: float
    hidden: list[torch.Tensor] | None = None  # [B, T, hidden] per layer (for methods with ``needs_hidden``)
    chunk: int = 1024  # the prefill chunk it was made with

    @property
    def last_chunk_start(self) -> int:
        return (self.prompt_tokens - 1) // self.chunk * self.chunk

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]


@torch.inference_mode()
def prefill_once(model, input_ids: torch.Tensor, *, prefill_chunk: int = 1024, keep_hidden: bool = False,
                 progress: bool = True) -> Prefill:
    """Prefill ``input_ids`` once, densely and chunked exactly as ``generate`` does, and keep the KV to share."""
    attention.install(model)
    device = _device_name(model)
    n_layers = model.config.num_hidden_layers
    prompt_len = input_ids.shape[1]
    cache = PagedKVCache(n_layers, 16, None, reserve_tokens=prompt_len)
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    hooks = []
    if keep_hidden:
        def hook(module, args, kwargs):
            parts[module.layer_idx].append(kwargs.get("hidden_states", args[0] if args else None))

        hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention.attention_modules(model)]
    input_ids = input_ids.to(device)
    show = progress and prompt_len > prefill_chunk
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=prompt_len, desc="prefill", unit="tok", file=sys.stderr, disable=not show, leave=False)
        for s in range(0, prompt_len, prefill_chunk):
            chunk = input_ids[:, s : s + prefill_chunk]
            logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            bar.update(chunk.shape[1])
        bar.close()
    finally:
        for h in hooks:
            h.remove()
    ms = (time.perf_counter() - t0) * 1e3
    keys = [layer.buf_k[:, :, : layer.length] for layer in cache.layers]
    values = [layer.buf_v[:, :, : layer.length] for layer in cache.layers]
    hidden = [torch.cat(p, dim=1) for p in parts] if keep_hidden else None
    return Prefill(input_ids, keys, values, logits[:, -1:], ms, hidden, prefill_chunk)


def prefill_unshareable(method: Method, model=None, pipelines: list | None = None) -> str | None:
    """Why ``method`` cannot start from a shared dense prefill (None when it can): its Prepare observes every
    prefill chunk's queries (H2O), or its cache layer stores the KV differently (a quantised cache, whose
    prefill attention already reads the dequantised KV). Give ``pipelines`` or the ``model`` to build them for."""
    if getattr(method, "cache_layer", None) is not None:
        return f"{method.name} keeps its own KV cache layer (prefill attends over it): needs its own prefill"
    if pipelines is None:
        pipelines = _pipelines(method, model)
    if any(_observes(p) == "all" for p in pipelines):
        return f"{method.name}'s Prepare observes every prefill chunk's queries: needs its own prefill"
    return None


def _pipelines(method: Method, model) -> list:
    method.bind(model)
    quiet = StepTimer(enabled=False)
    return [method.pipeline(_device_name(model), quiet, layer_idx=i) for i in range(model.config.num_hidden_layers)]


def _observes(pipe) -> str | None:
    """Which prefill queries a layer's Prepare learns from: None, "last-chunk" or "all"."""
    prep = getattr(pipe, "prepare", None) if pipe is not None else None
    if getattr(prep, "observe", None) is None:
        return None
    return "last-chunk" if getattr(prep, "observes_last_chunk", False) else "all"


def shared_prefill_mode(method: Method, model) -> str | None:
    """How ``method`` starts from a shared prefill: "copy" (the whole KV is copied and its Prepare runs over
    it), "replay-last-chunk" (its Prepare observes only the last chunk's queries: all but that chunk is copied,
    the chunk is run through the model again), or None (it needs its own prefill; see ``prefill_unshareable``)."""
    pipelines = _pipelines(method, model) if getattr(method, "cache_layer", None) is None else None
    if prefill_unshareable(method, model, pipelines) is not None:
        return None
    return "replay-last-chunk" if any(_observes(p) for p in pipelines) else "copy"


def _device_name(model) -> str:
    dev = next(model.parameters()).device
    return str(dev)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor,
    method: Method,
    max_new_tokens: int = 32,
    *,
    eos_token_ids: set[int] | None = None,
    prefill_chunk: int = 1024,
    progress: bool = True,
    keep_logits: bool = False,
    timer: StepTimer | None = None,
    recall: bool = False,
    prefilled: Prefill | None = None,
    kv_dtype: torch.dtype | None = None,
    pick=None,
    on_id=None,
) -> GenerationResult:
    """Prefill the prompt (dense, chunked), then decode greedily with ``method`` in every layer.

    With ``prefilled`` (from ``prefill`` on the same ``input_ids``), the prompt is not run through the model
    again: its KV is copied into this method's cache layer by layer, which runs the method's Prepare over it
    (as one span, where a fresh prefill runs it per chunk), and decoding starts from its logits. A method whose
    Prepare observes only the last chunk's queries (``observes_last_chunk``: SnapKV) gets all but the last
    chunk copied, and that chunk run through the model. Methods for which sharing is not the same as their own
    prefill (``prefill_unshareable``) are refused.

    ``kv_dtype`` stores the KV cache in that dtype (``PagedKVLayer.kv_dtype``; float32 accumulation), for methods
    that declare ``low_precision_kv`` (their steps read the cache through ``ops.sparse_attention``).

    ``pick(logits [1, vocab] float32) -> id`` replaces the greedy argmax (a sampler); ``on_id(id) -> bool`` is
    called with every generated id as it is made, and generation stops after an id for which it returns True
    (a server streams tokens and checks stop strings with it)."""
    _check_kv_dtype(model, method, kv_dtype, recall)
    attention.install(model)
    fast.available()  # load (or build) the compiled kernels now, not inside the first timed decode step
    device = _device_name(model)
    timer = timer or StepTimer()
    arch = describe(model)
    n_layers = arch.n_layers
    page_size = getattr(method, "page_size", 16)
    method.bind(model)  # methods with per-layer weights (gates, indexers) size and load them here
    pipelines = [method.pipeline(device, timer, layer_idx=i) for i in range(n_layers)]
    prompt_len = input_ids.shape[1]
    if prefilled is not None:
        why = prefill_unshareable(method, pipelines=pipelines)
        if why:
            raise HetmemError(f"cannot share a prefill: {why}")
        if not torch.equal(prefilled.input_ids.cpu(), input_ids.cpu()):
            raise HetmemError("the shared prefill was made for other input ids")
        if getattr(method, "needs_hidden", False) and prefilled.hidden is None:
            raise HetmemError(f"{method.name} needs the prefill's attention inputs: prefill_once(..., keep_hidden=True)")
    replay_from = None  # with a shared prefill: where the prompt's part run through the model again starts
    if prefilled is not None:
        replay_from = prefilled.last_chunk_start if any(_observes(p) for p in pipelines) else prompt_len
    cache = PagedKVCache(n_layers, page_size, pipelines, reserve_tokens=prompt_len + max_new_tokens,
                         layer_cls=getattr(method, "cache_layer", None), windows=arch.windows, mla_rank=arch.mla_rank,
                         kv_dtype=kv_dtype)
    # recall compares a selection with the oracle over the same cache: defined for sparse attention only
    meter = RecallMeter(n_layers) if recall and method.family == "sparse-attention" else None
    runtime = attention.SparseRuntime(cache, device, recall=meter)
    hooks = attention.capture_hidden(model, cache) if getattr(method, "needs_hidden", False) else []
    eos = eos_token_ids or set()
    input_ids = input_ids.to(device)
    out_ids: list[int] = []
    logits_kept: list[torch.Tensor] = []
    show = progress and (prompt_len > prefill_chunk or max_new_tokens > 16)

    try:
        with runtime.activate():
            times = _run(model, cache, input_ids, logits_kept, out_ids, timer, prefill_chunk, max_new_tokens, show,
                         keep_logits, eos, device, runtime, prefilled, replay_from, pick, on_id)
    finally:
        for h in hooks:
            h.remove()
    memory = {
        "kv_bytes": sum(layer.kv_nbytes() for layer in cache.layers),
        "tokens_stored_max": max(layer.length for layer in cache.layers),
        "tokens_seen": cache.layers[0].seen,
        "source": "measured",
    }
    memory.update(method.report(cache) or {})
    memory.update(arch_notes(arch, method))
    # Measurement work (the recall meter's dense scores) is not the method's: take it out of decode time.
    measure_ms = meter.ms if meter else 0.0
    return GenerationResult(out_ids, prompt_len, timer, times[0], times[1] - measure_ms, logits_kept,
                            meter.summary() if meter else None, memory, measure_ms,
                            prefilled.prefill_ms if prefilled is not None else None)


KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_kv_dtype(model, method: Method, kv_dtype: torch.dtype | None, recall: bool) -> None:
    """Refuse a KV storage dtype other than the model's where it is not supported."""
    if kv_dtype is None or kv_dtype == next(model.parameters()).dtype:
        return
    if not getattr(method, "low_precision_kv", False):
        raise HetmemError(f"--kv-dtype other than the model's dtype is supported for dense and quest, not "
                          f"'{method.name}'")
    if describe(model).mla_rank is not None:
        raise HetmemError("--kv-dtype other than the model's dtype: not supported on MLA's latent cache")
    if recall:
        raise HetmemError("--recall measures over the model-dtype cache: run it without --kv-dtype")


def _run(model, cache, input_ids, logits_kept, out_ids, timer, prefill_chunk, max_new_tokens, show, keep_logits, eos,
         device, runtime, prefilled: Prefill | None = None, replay_from: int | None = None, pick=None,
         on_id=None) -> tuple[float, float]:
    prompt_len = input_ids.shape[1]
    if True:
        timer.phase = "prefill"
        t0 = time.perf_counter()
        start = 0
        if prefilled is not None:  # copy the shared KV in; each layer's update runs the method's Prepare
            n = replay_from
            for i, layer in enumerate(cache.layers if n > 0 else ()):
                if prefilled.hidden is not None:
                    layer.hidden = prefilled.hidden[i][:, :n]
                layer.update(prefilled.keys[i][:, :, :n], prefilled.values[i][:, :, :n])
                layer.hidden = None
            logits = prefilled.logits
            start, prefill_chunk = n, prefilled.chunk  # the rest (the last chunk, if any) runs through the model
        if start < prompt_len:
            bar = tqdm(total=prompt_len, desc="prefill", unit="tok", file=sys.stderr, disable=not show, leave=False)
            runtime.prefill = True  # a last chunk of one token is still prefill
            for s in range(start, prompt_len, prefill_chunk):
                chunk = input_ids[:, s : s + prefill_chunk]
                logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
                bar.update(chunk.shape[1])
            runtime.prefill = False
            bar.close()
        prefill_ms = (time.perf_counter() - t0) * 1e3

        timer.phase = "decode"
        bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", file=sys.stderr, disable=not show, leave=False)
        ids, decode_ms = decode_tokens(model, cache, logits, max_new_tokens, eos, keep_logits=logits_kept if keep_logits
                                       else None, on_token=bar.update, pick=pick, on_id=on_id)
        out_ids.extend(ids)
        bar.close()
    return prefill_ms, decode_ms


def decode_tokens(model, cache, logits, max_new_tokens: int, eos, keep_logits: list | None = None,
                  on_token=None, pick=None, on_id=None) -> tuple[list[int], float]:
    """Greedy decode from the prefill's ``logits``: up to ``max_new_tokens`` ids (the first from ``logits``, then
    one forward per further token, stopping at an id in ``eos``). Returns the ids and the measured wall ms.
    ``pick`` replaces the argmax; ``on_id(id)`` returning True stops after that id (see ``generate``)."""
    device = logits.device
    out_ids: list[int] = []
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        last = logits[:, -1].float()
        if keep_logits is not None:
            keep_logits.append(last.cpu())
        nxt = int(last.argmax(-1)[0]) if pick is None else int(pick(last))
        out_ids.append(nxt)
        if on_token is not None:
            on_token(1)
        stop = on_id is not None and on_id(nxt)
        if stop or nxt in eos or i == max_new_tokens - 1:
            break
        step = torch.tensor([[nxt]], device=device)
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits
    return out_ids, (time.perf_counter() - t1) * 1e3


# -- building blocks for methods that make several LLM calls of their own (contextual memory) ------------------
def new_cache(model, reserve_tokens: int = 0) -> PagedKVCache:
    """An empty dense paged cache for ``model`` (no method pipelines)."""
    arch = describe(model)
    return PagedKVCache(arch.n_layers, reserve_tokens=reserve_tokens, windows=arch.windows, mla_rank=arch.mla_rank)


def fork_cache(model, prefix: PagedKVCache, reserve_tokens: int = 0) -> PagedKVCache:
    """A new cache holding a copy of ``prefix``'s tokens (a prompt prefix prefilled once, reused per call)."""
    cache = new_cache(model, reserve_tokens)
    for dst, src in zip(cache.layers, prefix.layers):
        dst.copy_prefix(src)
    return cache


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: PagedKVCache | None = None, chunk: int = 1024):
    """Dense prefill of ``input_ids`` into ``cache`` (a new one when None), continuing after what it holds.
    Returns ``(cache, logits of the last position [B, vocab] float32)``."""
    device = _device_name(model)
    cache = cache if cache is not None else new_cache(model, input_ids.shape[1])
    input_ids = input_ids.to(device)
    logits = None
    for s in range(0, input_ids.shape[1], chunk):
        logits = model(input_ids=input_ids[:, s : s + chunk], past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
    return cache, logits[:, -1].float()


@torch.inference_mode()
def greedy_continue(model, cache: PagedKVCache, last_logits: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: set[int] | None = None) -> list[int]:
    """Greedy decode from a prefilled ``cache`` (whose last logits are ``last_logits``): at most
    ``max_new_tokens`` tokens, stopping after an end-of-sequence token (which is kept in the output)."""
    device = _device_name(model)
    eos = eos_token_ids or set()
    out: list[int] = []
    logits = last_logits
    for i in range(max_new_tokens):
        nxt = int(logits.argmax(-1)[0])
        out.append(nxt)
        if nxt in eos or i == max_new_tokens - 1:
            break
        logits = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
    return out
