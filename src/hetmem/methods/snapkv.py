"""``snapkv``: SnapKV -- at the end of prefill, the last ``window`` prompt tokens vote for the prefix tokens to keep.

    Prepare    the observation window: the last ``window`` prefill queries, kept across prefill chunks
               (each chunk's queries are appended and only the last ``window`` retained)
    Relevancy  once, at the first decode step: the window's votes -- its attention on every prompt token,
               summed over the window and the GQA group (ops.evict) -- max-pooled over ``kernel``
               neighbouring tokens (keeps clusters, as in SnapKV)
    Retrieval  keep-set: top ``budget - window`` voted prefix tokens + the window itself  (ops.evict)
    Apply      evict the rest from the KV cache once (at the first decode step, memory shrinks);
               tokens generated afterwards are appended and kept

The votes depend only on the prompt, not on how its prefill was chunked (Li et al., "SnapKV: LLM Knows
What You are Looking for Before Generation", NeurIPS 2024, arXiv 2404.14469).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.compressed import CompressedMethod, EvictAttend, KeepSetRetrieval, LeadPrepare
from hetmem.methods.shared import dense_pipeline
from hetmem.ops.evict import attention_column_mass


@register_impl("observation-votes", role="prepare")
@dataclass
class ObservationWindowPrepare(LeadPrepare):
    """Prepare: the stored tokens, and (from prefill) the last ``window`` queries of the prompt."""

    window: int = 32
    name: str = "observation-window"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        memory = super().prepare(raw, memory)
        memory.meta.setdefault("compressed", False)
        memory.meta["layer"] = raw[0]
        return memory

    def observe(self, layer, query, scale) -> None:
        """Prefill: append this chunk's queries ``[B, H, T, D]`` to the window and keep its last ``window``.

        Chunks arrive in order, so the retained queries are those of positions ``end - w .. end - 1``."""
        meta = layer.memory.meta
        q = query[:, :, -self.window :]
        prev = meta.get("window_q")
        if prev is not None and q.shape[2] < self.window:
            q = torch.cat([prev, q], dim=2)[:, :, -self.window :]
        meta["window_q"] = q.clone()  # a copy: the chunk's query tensor is not kept alive
        meta["window_end"] = layer.length
        meta["scale"] = scale


@register_impl("pooled-votes", role="relevancy")
@dataclass
class WindowVotesRelevancy:
    """Relevancy: votes of the observation window on the candidate (pre-window) tokens, max-pooled."""

    budget: int
    window: int
    kernel: int
    device: str = "cpu"
    name: str = "window-votes"

    def score(self, memory: Memory, query: Query) -> Scores | None:
        meta = memory.meta
        q = meta.get("window_q")
        if meta.get("compressed") or memory.n_units <= self.budget or q is None:
            return None  # nothing will be evicted (or no prefill queries were seen): no votes needed
        layer, end, L = meta["layer"], meta["window_end"], memory.n_units
        B, H, w, D = q.shape
        Hkv = layer.buf_k.shape[1]
        n = max(0, L - self.window)  # candidates: every token before the recent window
        mass = attention_column_mass(q.reshape(B, Hkv, H // Hkv, w, D), layer.buf_k[:, :, :end], meta["scale"],
                                     q_pos0=end - w)  # [B, H_kv, end]: causal, the window attends to the prompt
        v = mass.new_zeros(B, Hkv, n)
        v[:, :, : min(n, end)] = mass[:, :, : min(n, end)]
        if self.kernel > 1 and n:
            v = F.max_pool1d(v.reshape(B * Hkv, 1, n), self.kernel, stride=1, padding=self.kernel // 2)[..., :n]
            v = v.reshape(B, Hkv, n)
        return Scores(v)


@register_impl("keep-set-once", role="retrieval")
@dataclass
class OnceKeepSetRetrieval(KeepSetRetrieval):
    def select(self, scores, memory):
        if memory.meta.get("compressed"):
            return None
        return super().select(scores, memory)


@register_impl("evict-attend-once", role="apply")
@dataclass
class OnceEvictAttend(EvictAttend):
    def apply(self, raw, selection, target):
        out = super().apply(raw, selection, target)
        raw.memory.meta["compressed"] = True  # the first decode step decides; later tokens are all kept
        raw.memory.meta.pop("window_q", None)  # the window's queries are not needed any more
        return out


@register
@dataclass
class SnapKV(CompressedMethod):
    name = "snapkv"
    family = "compressed-kv"
    summary = "SnapKV: observation-window voting at the end of prefill picks the prompt KV to keep"

    budget: int = param(1024, "tokens kept in the KV cache after prefill (observation window included)", low=2)
    window: int = param(32, "last prompt queries that vote for the tokens to keep", low=1)
    kernel: int = param(7, "max-pool width over the votes (odd)", low=1)

    def validate(self) -> None:
        if self.window < 1 or self.budget <= self.window:
            raise HetmemError(f"snapkv needs 1 <= --window < --budget (got window={self.window}, budget={self.budget})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise HetmemError(f"--kernel must be a positive odd number (got {self.kernel})")

    def pipeline(self, device, timer, layer_idx: int = 0):
        if self.window_layer(layer_idx):
            return dense_pipeline(device, timer)
        return MemoryPipeline(ObservationWindowPrepare(device, window=self.window),
                              WindowVotesRelevancy(self.budget, self.window, self.kernel, device),
                              OnceKeepSetRetrieval(self.budget, 0, self.window, device), OnceEvictAttend(device), timer)
