"""Greedy generation with a method's pipeline running inside every attention layer."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hetmem.llm import attention
from hetmem.llm.paged_cache import PagedKVCache
from hetmem.methods.base import Method
from hetmem.profiling.timer import StepTimer


@dataclass
class GenerationResult:
    token_ids: list[int]
    prompt_tokens: int
    timer: StepTimer
    prefill_ms: float
    decode_ms: float
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return self.prefill_ms + self.decode_ms


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
) -> GenerationResult:
    """Prefill the prompt (dense, chunked), then decode greedily with ``method`` in every layer."""
    attention.install(model)
    device = _device_name(model)
    timer = timer or StepTimer()
    n_layers = model.config.num_hidden_layers
    page_size = getattr(method, "page_size", 16)
    pipelines = [method.pipeline(device, timer) for _ in range(n_layers)]
    prompt_len = input_ids.shape[1]
    cache = PagedKVCache(n_layers, page_size, pipelines, reserve_tokens=prompt_len + max_new_tokens)
    runtime = attention.SparseRuntime(cache, device)
    eos = eos_token_ids or set()
    input_ids = input_ids.to(device)
    out_ids: list[int] = []
    logits_kept: list[torch.Tensor] = []
    show = progress and (prompt_len > prefill_chunk or max_new_tokens > 16)

    with runtime.activate():
        timer.phase = "prefill"
        t0 = time.perf_counter()
        bar = tqdm(total=prompt_len, desc="prefill", unit="tok", file=sys.stderr, disable=not show, leave=False)
        for s in range(0, prompt_len, prefill_chunk):
            chunk = input_ids[:, s : s + prefill_chunk]
            logits = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            bar.update(chunk.shape[1])
        bar.close()
        prefill_ms = (time.perf_counter() - t0) * 1e3

        timer.phase = "decode"
        t1 = time.perf_counter()
        bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", file=sys.stderr, disable=not show, leave=False)
        for i in range(max_new_tokens):
            last = logits[:, -1].float()
            if keep_logits:
                logits_kept.append(last.cpu())
            nxt = int(last.argmax(-1)[0])
            out_ids.append(nxt)
            bar.update(1)
            if nxt in eos or i == max_new_tokens - 1:
                break
            step = torch.tensor([[nxt]], device=device)
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits
        bar.close()
        decode_ms = (time.perf_counter() - t1) * 1e3

    return GenerationResult(out_ids, prompt_len, timer, prefill_ms, decode_ms, logits_kept)
