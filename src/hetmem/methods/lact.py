"""``lact``: a fast-weight SwiGLU memory updated once per large chunk (LaCT).

Zhang et al., 2025, "Test-Time Training Done Right", arXiv 2505.23884 (large-chunk test-time training).
The memory is f_W(x) = W2 (silu(W1 x) * (W3 x)) per head with W1 = U1 V1 and W3 = U3 V3 low rank
(``--rank``) and W2 full; per chunk of ``--chunk-tokens`` tokens:

    Prepare    take the chunk's keys and values                                       (the layer's K/V)
    Relevancy  the loss -f_W(k)^T v over the chunk (forward pass of the fast weights)  (ops.fast_weight)
    Retrieval  one gradient step updates W (hand-written backward + SGD)               (ops.fast_weight)
    Apply      out = f_W(q) for the chunk's queries                                    (ops.fast_weight)

No embedded model was trained with such a layer, so ``lact`` answers nothing with them: ``hetmem run
--method lact`` refuses in one line. It is a real workload for ``hetmem profile --shape`` and ``hetmem plan``
(the compute-bound member of the family: large chunks make its updates matmuls, not matrix-vector products).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.methods.base import param, register
from hetmem.methods.contextual_common import ContextualMethod
from hetmem.ops import counts as C
from hetmem.ops.fast_weight import NAMES, fw_apply, fw_forward, fw_grads, fw_loss, fw_step, init_fast_weights


def _dims(memory: Memory) -> tuple[int, int, int, int]:
    U1, V1 = memory.tensors["U1"], memory.tensors["V1"]
    return U1.shape[0], V1.shape[2], U1.shape[1], U1.shape[2]  # H, d, m, r


@register_impl("lact-chunk-kv", role="prepare")
@dataclass
class ChunkKVPrepare:
    """Prepare: raw = (k, v) of one chunk ``[H, T, d]`` -> the Memory (fast weights, created on the first chunk)."""

    rank: int
    hidden: int  # fast-weight hidden dim m (0: the head dim)
    seed: int = 0
    device: str = "cpu"
    name: str = "chunk-kv"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        k, v = raw
        if memory is None:
            H, _, d = k.shape
            W = init_fast_weights(H, d, self.hidden or d, self.rank, k.dtype, k.device, self.seed)
            memory = Memory(kind="lact-mlp", tensors=W, unit_size=k.shape[1])
        memory.meta["k"], memory.meta["v"] = k, v
        memory.n_units += 1
        return memory

    def op_counts(self, raw, memory=None):
        k, _ = raw
        return {"prepare": [_kv_view_count(k)]}


def _kv_view_count(k: torch.Tensor):
    n = 2 * k.numel() * k.element_size()
    return C.OpCount("chunk_kv_view", "copy", 0.0, float(n), 0.0)


@dataclass
class LossScores(Scores):
    """The loss per head ``[H]``, with the forward intermediates the gradient step needs."""

    inter: dict | None = None


@register_impl("lact-loss", role="relevancy")
@dataclass
class FastWeightLossRelevancy:
    """Relevancy: -f_W(k)^T v for the chunk's (k, v) pairs (the fast weights' forward pass)."""

    device: str = "cpu"
    name: str = "fast-weight-loss"

    def score(self, memory: Memory, query: Query) -> LossScores:
        y, inter = fw_forward(memory.tensors, memory.meta["k"])
        return LossScores(fw_loss(y, memory.meta["v"]), inter=inter)

    def op_counts(self, memory: Memory, query: Query):
        H, d, m, r = _dims(memory)
        T, e = memory.meta["k"].shape[1], memory.meta["k"].element_size()
        return {"relevancy": C.fast_weight_forward(H, T, d, m, r, e) + [C.fast_weight_loss(H, T, d, e)]}


@register_impl("lact-update", role="retrieval")
@dataclass
class GradientStepRetrieval:
    """Retrieval: one gradient step on the loss updates W (in place); the updated memory is what is retrieved."""

    lr: float
    device: str = "cpu"
    name: str = "fast-weight-sgd"

    def select(self, scores: LossScores, memory: Memory) -> Memory:
        fw_step(memory.tensors, fw_grads(memory.tensors, scores.inter, memory.meta["v"]), self.lr)
        scores.inter = None
        return memory

    def op_counts(self, scores: LossScores, memory: Memory):
        H, d, m, r = _dims(memory)
        T, e = memory.meta["k"].shape[1], memory.meta["k"].element_size()
        return {"retrieval": C.fast_weight_update(H, T, d, m, r, e)}


@register_impl("lact-apply", role="apply")
@dataclass
class FastWeightApply:
    """Apply: out = f_W(q) for the queries ``[H, T, d]``."""

    device: str = "cpu"
    name: str = "fast-weight-apply"

    def apply(self, raw, selection: Memory, target: torch.Tensor) -> torch.Tensor:
        return fw_apply(selection.tensors, target)

    def op_counts(self, raw, selection: Memory, target: torch.Tensor):
        H, d, m, r = _dims(selection)
        return {"apply": C.fast_weight_forward(H, target.shape[1], d, m, r, target.element_size())}


@register
@dataclass
class LaCT(ContextualMethod):
    name = "lact"
    summary = ("fast-weight SwiGLU memory, one gradient step per large chunk (LaCT); a profiling workload: "
               "no embedded model has this layer")
    answering: ClassVar[bool] = False
    refusal: ClassVar[str] = ("it needs a model trained with a LaCT fast-weight layer, which this model does not have "
                              "(profile it instead: hetmem profile --methods lact --shape SHAPE)")
    consumes: ClassVar[str] = "kv-chunks"  # the profiler feeds it (k, v, q) chunks at a shape

    chunk_tokens: int = param(2048, "tokens per fast-weight update (LaCT's large chunk)", low=1)
    rank: int = param(32, "rank of the low-rank W1 = U1 V1 and W3 = U3 V3", low=1)
    fw_hidden: int = param(0, "fast-weight hidden dim (0: the head dim)", low=0)
    lr: float = param(1.0, "fast-weight learning rate of the one gradient step per chunk", low=0.0)

    def pipeline(self, device, timer, layer_idx: int = 0, lm=None, stats=None):
        return MemoryPipeline(ChunkKVPrepare(self.rank, self.fw_hidden, layer_idx, device), FastWeightLossRelevancy(device),
                              GradientStepRetrieval(self.lr, device), FastWeightApply(device), timer)

    def process(self, pipe, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, memory: Memory | None = None):
        """Run a layer's (k, v, q) ``[H, L, d]`` through the memory chunk by chunk; returns (outputs, memory)."""
        outs = []
        for a in range(0, k.shape[1], self.chunk_tokens):
            sl = slice(a, a + self.chunk_tokens)
            memory = pipe.build((k[:, sl], v[:, sl]), memory)
            sel = pipe.select(memory, Query(vectors=q[:, sl]))
            with pipe.timer.step("apply", pipe.apply.device):
                outs.append(pipe.apply.apply((k[:, sl], v[:, sl]), sel, q[:, sl]))
        return torch.cat(outs, dim=1), memory


__all__ = ["LaCT", "NAMES"]
