"""Answering a question with a compressed-contextual-memory method (family ``contextual-memory``).

These methods (memagent, hmt; lact is a profiling workload only) make their own model calls: the runner
hands the method a ``ContextRequest`` and its four-step pipeline, times every step with one StepTimer,
and assembles the record ``hetmem run --json`` prints (the same keys as an in-model method's record,
plus the method's own fields: the memory after each chunk or segment, LLM calls, tokens read/written).
"""

from __future__ import annotations

import time

import torch

from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError
from hetmem.methods.contextual_common import ContextRequest


def check_answering(method, model_name: str) -> None:
    """One line when the method does not answer with the models hetmem loads (lact)."""
    if not getattr(method, "answering", True):
        raise HetmemError(f"{method.name} is not an answer-producing method for {model_name}: {method.refusal}")


def answer_contextual(lm, method, context: str, question: str, max_new_tokens: int = 32,
                      step_timing: bool = True, timer: StepTimer | None = None, wrap=None) -> dict:
    """Run ``method`` over the context and answer. ``timer`` (default: a new one) times the steps; ``wrap``
    (the profiler's op counter) may wrap the pipeline before it runs."""
    check_answering(method, lm.name)
    t0 = time.perf_counter()
    timer = timer or StepTimer(enabled=step_timing)
    req = ContextRequest(lm, context, question, max_new_tokens)
    device = str(next(lm.model.parameters()).device)
    pipe = method.pipeline(device, timer, lm=lm, stats=req.stats)
    if wrap is not None:
        pipe = wrap(pipe)
    own = method.run(req, pipe)
    st = req.stats
    p0 = next(lm.model.parameters())
    rec = {
        "answer": own.pop("answer"),
        "method": method.name,
        "family": method.family,
        "params": method.params(),
        "notes": method.notes(),
        "model": lm.name,
        "device": device,
        "dtype": str(p0.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "time_source": "measured",
        "total_ms": round((time.perf_counter() - t0) * 1e3, 3),
        "prefill_ms": round(st["prefill_ms"], 3),
        "decode_ms": round(st["decode_ms"], 3),
        "tokens": own.pop("tokens"),
        "steps": timer.summary(),
        "step_timing": {"enabled": step_timing, "cuda_sync_per_step": step_timing and device.startswith("cuda")},
        "llm_calls": st["llm_calls"],
        "tokens_read": st["tokens_read"],
        "tokens_prefilled": st["tokens_prefilled"],
        "tokens_written": st["tokens_written"],
        **own,
    }
    return rec
