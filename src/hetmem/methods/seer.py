"""``seer``: SeerAttention-R for decoding -- block-sparse attention chosen by a learned gate.

    Prepare    average-pool the keys of each block (running sums), then the per-KV-head linear K gate
               (ops.block_pool)
    Relevancy  the gated query (GQA group mean through the Q gate) . gated block summaries: one GEMV per
               KV head (ops.block_pool)
    Retrieval  a token budget (top blocks; sink and recent blocks always in) or a threshold on the gate's
               softmax (a bitmap)                                                   (ops.topk)
    Apply      gather the selected blocks' K and V and attend over only those       (methods.shared.GatherAttention,
               ops.token_gather for a ragged bitmap)

Untrained gates are the identity (pooled-key scoring). ``hetmem train --method seer`` distils them from
the frozen model's own block-pooled attention; ``--gates DIR`` loads them. The gates act on what the cache
holds: per KV head keys, or on MLA models the latent ``c_kv ++ k_rope``. On a sliding-window layer the
blocks ranked are those inside the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.timer import substep
from hetmem.core.types import DecodeTarget, Memory, Query, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.methods.base import Method, param, register
from hetmem.methods.gates import check_gates_dir, check_shape, load_gates
from hetmem.methods.shared import GatherAttention, dense_pipeline, gather_attention_counts, model_dims
from hetmem.ops import counts as C
from hetmem.ops.block_pool import block_counts, gated_block_scores, update_block_sums
from hetmem.ops.sparse_attention import grouped_decode_attention
from hetmem.ops.token_gather import bitmap_to_padded, gather_tokens, unit_token_ids
from hetmem.ops.topk import budget_page_indices, candidate_range


def identity_gates(n_layers: int, n_kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    eye = torch.eye(head_dim).expand(n_layers, n_kv, head_dim, head_dim).clone()
    return {"wq": eye, "wk": eye.clone()}


@register_impl("block-pool-gate", role="prepare")
@dataclass
class BlockPoolPrepare:
    """Prepare: per-block key sums kept current; the gated block summaries of the blocks that changed."""

    page_size: int
    wk: torch.Tensor  # [H_kv, D, D]
    device: str = "cpu"
    name: str = "block-pool-gate"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        P = self.page_size
        n_cap = layer.capacity // P
        if memory is None:
            B, H, _, D = layer.buf_k.shape
            memory = Memory(kind="gated-block-keys", unit_size=P, tensors={
                "ksum": layer.buf_k.new_zeros(B, H, n_cap, D, dtype=torch.float32),
                "kgated": layer.buf_k.new_zeros(B, H, n_cap, self.wk.shape[-1], dtype=torch.float32),
            })
        b0, b1 = update_block_sums(memory.tensors["ksum"], layer.buf_k, start, end, P)
        counts = block_counts(b1, end, P, layer.buf_k.device)[b0:b1].clamp(min=1).float()
        mean = memory.tensors["ksum"][:, :, b0:b1] / counts[:, None]
        memory.tensors["kgated"][:, :, b0:b1] = torch.einsum("bhnd,hde->bhne", mean, self.wk.to(mean.device))
        memory.n_units = -(-end // P)
        memory.meta["length"] = end
        return memory

    def op_counts(self, raw, memory=None):
        layer, start, end = raw
        B, H, _, D = layer.buf_k.shape
        if end <= start:
            return {"prepare": []}
        P = self.page_size
        b0, b1 = start // P, (end - 1) // P + 1
        n_tok = 1 if end - start == 1 else end - b0 * P  # a span re-sums the blocks it touches
        return {"prepare": [C.block_pool_gate(B, H, n_tok, b1 - b0, D, self.wk.shape[-1], layer.buf_k.element_size())]}


@register_impl("gate-score", role="relevancy")
@dataclass
class GateRelevancy:
    """Relevancy: gated query . gated block summaries, for the candidate blocks between sink and recent."""

    wq: torch.Tensor  # [H_kv, D, D]
    sink_pages: int
    recent_pages: int
    budget_pages: int
    device: str = "cpu"
    name: str = "gate-score"

    def score(self, memory: Memory, query: Query) -> Scores:
        first = memory.meta.get("window_start", 0) // memory.unit_size  # a sliding window's first block
        lo, hi = candidate_range(memory.n_units, self.sink_pages, self.recent_pages, self.budget_pages, first)
        q = query.vectors.float().mean(dim=2)  # [B, H_kv, D]: one gated query per GQA group
        qg = torch.einsum("bhd,hde->bhe", q, self.wq.to(q.device))
        scale = qg.shape[-1] ** -0.5
        return Scores(gated_block_scores(qg, memory.tensors["kgated"][:, :, lo:hi], scale), offset=lo)

    def op_counts(self, memory, query):
        first = memory.meta.get("window_start", 0) // memory.unit_size
        lo, hi = candidate_range(memory.n_units, self.sink_pages, self.recent_pages, self.budget_pages, first)
        B, Hkv, G, D = query.vectors.shape
        return {"relevancy": [C.gated_block_scores(B, Hkv, G, hi - lo, D, self.wq.shape[-1], query.vectors.element_size())]}


@register_impl("block-select", role="retrieval")
@dataclass
class BlockBudgetOrThreshold:
    """Retrieval: top blocks under the budget, or (threshold > 0) every candidate block whose gate
    probability (softmax over the candidates) reaches the threshold -- a bitmap; sink/recent always in."""

    budget_pages: int
    sink_pages: int
    recent_pages: int
    threshold: float = 0.0
    device: str = "cpu"
    name: str = "block-select"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        n, L, P = memory.n_units, memory.meta["length"], memory.unit_size
        ws = memory.meta.get("window_start", 0)
        first = ws // P  # a sliding window's first block (0 on full-attention layers)
        if self.threshold <= 0:
            idx = budget_page_indices(scores.values, scores.offset, n, self.budget_pages, self.sink_pages,
                                      self.recent_pages, first)
            return Selection(indices=idx, n_units=n, unit_size=P, length=L, start=ws)
        lead = scores.values.shape[:-1]
        bitmap = torch.zeros(*lead, n, dtype=torch.bool, device=scores.values.device)
        if scores.n_units:
            probs = torch.softmax(scores.values, dim=-1)
            bitmap[..., scores.offset : scores.offset + scores.n_units] = probs >= self.threshold
        bitmap[..., first : min(first + self.sink_pages, n)] = True
        bitmap[..., max(first, n - self.recent_pages) :] = True
        return Selection(bitmap=bitmap, n_units=n, unit_size=P, length=L, start=ws)

    def op_counts(self, scores, memory):
        v = scores.values
        rows = math.prod(v.shape[:-1])
        if self.threshold <= 0:
            return {"retrieval": C.budget_page_indices(rows, v.shape[-1], memory.n_units, self.budget_pages,
                                                       self.sink_pages, self.recent_pages)}
        return {"retrieval": [C.threshold_select(rows, v.shape[-1], memory.n_units)]}


@register_impl("block-sparse-attention", role="apply")
@dataclass
class BlockSparseAttention(GatherAttention):
    """Apply: gather the selected blocks' K and V and attend over only those tokens. A top-k selection is
    the shared GatherAttention; a threshold bitmap selects a different count per KV head, so its rows are
    padded to the longest and the padding is masked."""

    name: str = "block-sparse-attention"

    def apply(self, raw, selection: Selection, target: DecodeTarget):
        if selection.form == "topk":
            return super().apply(raw, selection, target)
        units, unit_valid = bitmap_to_padded(selection.bitmap)  # ragged: rows pad to the longest
        tok, valid = unit_token_ids(units, selection.unit_size, selection.length, unit_valid)
        valid &= tok >= selection.start
        with substep("gather", self.device):
            k, v = gather_tokens(raw.buf_k, tok), gather_tokens(raw.buf_v, tok)
        return grouped_decode_attention(target.q, k, v, target.scale, softcap=target.softcap, sinks=target.sinks,
                                        valid=valid)

    def op_counts(self, raw, selection, target):
        if selection.form == "topk":
            return super().op_counts(raw, selection, target)
        B, Hkv, G, D = target.q.shape
        return gather_attention_counts(B, Hkv, G, D, raw.buf_k.element_size(), selection.selected_tokens,
                                       int(selection.bitmap.sum(-1).max()))


@register
@dataclass
class Seer(Method):
    name = "seer"
    family = "sparse-attention"
    summary = "SeerAttention-R: avg-pooled block keys x learned gate, top blocks or threshold bitmap"

    budget: int = param(1024, "tokens attended per decode step, in whole blocks (sink and recent blocks included)", low=1)
    page_size: int = param(16, "tokens per block", low=1)
    sink_pages: int = param(1, "first blocks always selected", low=0)
    recent_pages: int = param(1, "most recent blocks always selected", low=1)
    threshold: float = param(0.0, "> 0: keep blocks whose gate probability reaches it (a bitmap) instead of a budget", low=0.0, high=0.999999)
    dense_layers: int = param(0, "first layers kept dense", low=0)
    gates: str | None = param(None, "trained gates: a directory written by 'hetmem train --method seer' (default: identity)")

    def validate(self) -> None:
        if self.gates:
            check_gates_dir(self.gates)
        if self.page_size < 1:
            raise HetmemError(f"--page-size must be at least 1 (got {self.page_size})")
        if self.budget < self.page_size:
            raise HetmemError(f"--budget {self.budget} is smaller than one block ({self.page_size} tokens)")
        if self.sink_pages < 0 or self.recent_pages < 1 or self.dense_layers < 0:
            raise HetmemError("seer needs sink_pages >= 0, recent_pages >= 1 and dense_layers >= 0")
        if not 0 <= self.threshold < 1:
            raise HetmemError(f"--threshold must be in [0, 1) (got {self.threshold})")

    @property
    def budget_pages(self) -> int:
        return self.budget // self.page_size

    def notes(self) -> list[str]:
        if self.budget % self.page_size:
            return [f"--budget {self.budget} is not a multiple of --page-size {self.page_size}: seer attends "
                    f"{self.budget_pages * self.page_size} tokens ({self.budget_pages} blocks)"]
        return []

    def bind(self, model) -> None:
        n_layers, n_kv, d = model_dims(model)
        if self.gates:
            t, meta = load_gates(self.gates, self.name)
            if meta.get("page_size") not in (None, self.page_size):
                raise HetmemError(f"--gates {self.gates} were trained with --page-size {meta['page_size']}, "
                                  f"not {self.page_size}")
            self._w = {k: check_shape(t[k], (n_layers, n_kv, d, d), k, self.gates) for k in ("wq", "wk")}
        else:
            self._w = identity_gates(n_layers, n_kv, d)

    def pipeline(self, device, timer, layer_idx: int = 0):
        if layer_idx < self.dense_layers:
            return dense_pipeline(device, timer)
        w = getattr(self, "_w", None)
        if w is None:
            raise HetmemError("seer: bind(model) must run before pipeline() (generate does this)")
        return MemoryPipeline(
            BlockPoolPrepare(self.page_size, w["wk"][layer_idx], device),
            # threshold mode has no budget: every candidate block is scored, however short the context
            GateRelevancy(w["wq"][layer_idx], self.sink_pages, self.recent_pages,
                          self.budget_pages if self.threshold <= 0 else 0, device),
            BlockBudgetOrThreshold(self.budget_pages, self.sink_pages, self.recent_pages, self.threshold, device),
            BlockSparseAttention(device),
            timer,
        )
