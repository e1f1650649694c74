"""``snapkv``: SnapKV -- at the end of prefill, the last ``window`` prompt tokens vote for the prefix tokens to keep.

    Prepare    votes: attention of the observation window (the last ``window`` prefill queries) on every
               prompt token, summed over the window and the GQA group           (ops.evict)
    Relevancy  votes max-pooled over ``kernel`` neighbouring tokens (keeps clusters, as in SnapKV)
    Retrieval  keep-set: top ``budget - window`` voted prefix tokens + the window itself  (ops.evict)
    Apply      evict the rest from the KV cache once (at the first decode step, memory shrinks);
               tokens generated afterwards are appended and kept
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.compressed import CompressedMethod, EvictAttend, KeepSetRetrieval, LeadPrepare
from hetmem.ops.evict import attention_column_mass


@dataclass
class ObservationVotesPrepare(LeadPrepare):
    window: int = 32
    name: str = "observation-votes"
    observes_last_chunk: ClassVar[bool] = True  # each observe replaces the votes: only the last chunk counts

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer = raw[0]
        memory = super().prepare(raw, memory)
        if "votes" not in memory.tensors:
            memory.tensors["votes"] = torch.zeros(*layer.buf_k.shape[:2], layer.capacity, device=layer.buf_k.device)
            memory.meta["compressed"] = False
        return memory

    def observe(self, layer, query, scale) -> None:
        """Prefill: votes of this chunk's last ``window`` queries (the last chunk's are the prompt's window)."""
        B, H, T, D = query.shape
        Hkv, L = layer.buf_k.shape[1], layer.length
        w = min(self.window, T)
        q = query[:, :, T - w :].reshape(B, Hkv, H // Hkv, w, D)
        votes = layer.memory.tensors["votes"]
        votes.zero_()
        votes[:, :, :L] = attention_column_mass(q, layer.buf_k[:, :, :L], scale, q_pos0=L - w)


@dataclass
class PooledVotesRelevancy:
    window: int
    kernel: int
    device: str = "cpu"
    name: str = "pooled-votes"

    def score(self, memory: Memory, query: Query) -> Scores | None:
        if memory.meta.get("compressed"):
            return None
        L = memory.n_units
        v = memory.tensors["votes"][:, :, : max(0, L - self.window)]
        if self.kernel > 1 and v.shape[-1]:
            B, H, n = v.shape
            v = F.max_pool1d(v.reshape(B * H, 1, n), self.kernel, stride=1, padding=self.kernel // 2)[..., :n]
            v = v.reshape(B, H, n)
        return Scores(v)


@dataclass
class OnceKeepSetRetrieval(KeepSetRetrieval):
    def select(self, scores, memory):
        if memory.meta.get("compressed"):
            return None
        return super().select(scores, memory)


@dataclass
class OnceEvictAttend(EvictAttend):
    def apply(self, raw, selection, target):
        out = super().apply(raw, selection, target)
        raw.memory.meta["compressed"] = True  # the first decode step decides; later tokens are all kept
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
        return MemoryPipeline(ObservationVotesPrepare(device, window=self.window),
                              PooledVotesRelevancy(self.window, self.kernel, device),
                              OnceKeepSetRetrieval(self.budget, 0, self.window, device), OnceEvictAttend(device), timer)
