"""One question against one context with one method: the record ``hetmem run --json`` prints."""

from __future__ import annotations

import time

import torch

from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError
from hetmem.llm.generate import KV_DTYPES, generate
from hetmem.llm.models import LoadedModel
from hetmem.llm.prompt import build_prompt_ids, eos_ids
from hetmem.core.steps import MemoryMethod as Method


def answer_question(
    lm: LoadedModel, method: Method, context: str, question: str, max_new_tokens: int = 32, progress: bool = True,
    recall: bool = False, step_timing: bool = True, kv_dtype: str | None = None,
) -> dict:
    """Answer ``question`` about ``context`` with ``method``. ``step_timing=False`` turns the per-step timer off
    (on CUDA it synchronises the device around every step); ``recall=True`` also measures attention-mass
    recall, whose time is reported as measurement and kept out of the method's times."""
    t0 = time.perf_counter()
    ids = build_prompt_ids(lm.tokenizer, context, question)
    n_prompt = ids.shape[1]
    if n_prompt + max_new_tokens > lm.max_context:
        raise HetmemError(
            f"the prompt is {n_prompt} tokens; with {max_new_tokens} new tokens it needs "
            f"{n_prompt + max_new_tokens}, more than {lm.name}'s {lm.max_context}-token window"
        )
    timer = StepTimer(enabled=step_timing)
    res = generate(lm.model, ids, method, max_new_tokens, eos_token_ids=eos_ids(lm.tokenizer, lm.model), progress=progress,
                   recall=recall, timer=timer, kv_dtype=KV_DTYPES[kv_dtype] if kv_dtype else None)
    device = str(next(lm.model.parameters()).device)
    answer = lm.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip()
    steps = res.timer.summary()
    rec = {
        "answer": answer,
        "method": method.name,
        "params": method.params(),
        "notes": method.notes(),
        "model": lm.name,
        "device": device,
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "kv_dtype": kv_dtype or str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "time_source": "measured",
        "total_ms": round((time.perf_counter() - t0) * 1e3 - res.measurement_ms, 3),
        "prefill_ms": round(res.prefill_ms, 3),
        "decode_ms": round(res.decode_ms, 3),
        "tokens": {"prompt": n_prompt, "generated": len(res.token_ids)},
        "steps": steps,
        "step_timing": {"enabled": step_timing, "cuda_sync_per_step": step_timing and device.startswith("cuda")},
        "measurement_ms": {"recall": round(res.measurement_ms, 3), "note": "excluded from total_ms and decode_ms"},
        "memory": res.memory,
    }
    if recall:  # attention-mass recall vs the oracle top-k at the same budget (sparse attention methods)
        rec["recall"] = res.recall or {
            "attention_mass_recall": None,
            "note": f"'{method.name}' ({method.family}) makes no per-step selection over the full cache to compare",
        }
    return rec
