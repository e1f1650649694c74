"""``seer``: SeerAttention-R for decoding -- block-sparse attention chosen by a learned gate.

    Prepare    average-pool the keys of each block (running sums), then the per-KV-head linear K gate
               (ops.block_pool)
    Relevancy  the gated query (GQA group mean through the Q gate) . gated block summaries: one GEMV per
               KV head (ops.block_pool)
    Retrieval  a token budget (top blocks; sink and recent blocks always in) or a threshold on the gate's
               softmax (a bitmap)                                                   (ops.topk)
    Apply      gather the selected blocks' K and V and attend over only those       (ops.sparse_attention,
               ops.token_gather for a ragged bitmap)

Untrained gates are the identity (pooled-key scoring). ``hetmem train --method seer`` distils them from
the frozen model's own block-pooled attention; ``--gates DIR`` loads them. The gates act on what the cache
holds: per KV head keys, or on MLA models the latent ``c_kv ++ k_rope``. On a sliding-window layer the
blocks ranked are those inside the window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import DecodeTarget, Memory, Query, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.methods.base import Method, register
from hetmem.methods.dense import Dense
from hetmem.ops.block_pool import block_counts, gated_block_scores, update_block_sums
from hetmem.ops.sparse_attention import gather_selected_kv, grouped_decode_attention, window_valid
from hetmem.ops.token_gather import bitmap_to_padded, gather_tokens, unit_token_ids
from hetmem.ops.topk import budget_page_indices, candidate_range
from hetmem.profiling.timer import substep


def model_dims(model) -> tuple[int, int, int]:
    """(layers, cached KV heads, cached key dim) of a transformers causal LM (``llm.arch.describe``: for MLA
    one latent head of dim kv_lora_rank + qk_rope_head_dim, which is where the gates act)."""
    from hetmem.llm.arch import describe

    a = describe(model)
    return a.n_layers, a.kv_heads, a.key_dim


def identity_gates(n_layers: int, n_kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    eye = torch.eye(head_dim).expand(n_layers, n_kv, head_dim, head_dim).clone()
    return {"wq": eye, "wk": eye.clone()}


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


@dataclass
class BlockSparseAttention:
    """Apply: gather the selected blocks' K and V and attend over only those tokens."""

    device: str = "cpu"
    name: str = "block-sparse-attention"

    def apply(self, raw, selection: Selection, target: DecodeTarget):
        L, P, ws = selection.length, selection.unit_size, selection.start
        extra = {"softcap": target.softcap, "sinks": target.sinks}
        if selection.form == "topk":
            valid = None
            if selection.indices.shape[-1] >= selection.n_units - ws // P:
                k, v = raw.buf_k[:, :, ws:L], raw.buf_v[:, :, ws:L]
            else:
                with substep("gather", self.device):  # timed as apply.gather (inside apply)
                    k, v = gather_selected_kv(raw.buf_k, raw.buf_v, selection.indices, P, L)
                valid = window_valid(selection.indices, P, ws, k.shape[2])  # a window's partial first block
            return grouped_decode_attention(target.q, k, v, target.scale, valid=valid, **extra)
        units, unit_valid = bitmap_to_padded(selection.bitmap)  # ragged: rows pad to the longest
        tok, valid = unit_token_ids(units, P, L, unit_valid)
        valid &= tok >= ws
        with substep("gather", self.device):
            k, v = gather_tokens(raw.buf_k, tok), gather_tokens(raw.buf_v, tok)
        return grouped_decode_attention(target.q, k, v, target.scale, valid=valid, **extra)


@register
@dataclass
class Seer(Method):
    name = "seer"
    family = "sparse-attention"
    summary = "SeerAttention-R: avg-pooled block keys x learned gate, top blocks or threshold bitmap"

    budget: int = 1024
    page_size: int = 16
    sink_pages: int = 1
    recent_pages: int = 1
    threshold: float = 0.0  # > 0: keep blocks whose gate probability >= threshold (bitmap) instead of a budget
    dense_layers: int = 0  # the first layers attend densely
    gates: str | None = None  # directory from 'hetmem train --method seer' (default: identity gates)

    def validate(self) -> None:
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

    def bind(self, model) -> None:
        n_layers, n_kv, d = model_dims(model)
        if self.gates:
            from hetmem.train.gates import check_shape, load_gates

            t, meta = load_gates(self.gates, self.name)
            if meta.get("page_size") not in (None, self.page_size):
                raise HetmemError(f"--gates {self.gates} were trained with --page-size {meta['page_size']}, "
                                  f"not {self.page_size}")
            self._w = {k: check_shape(t[k], (n_layers, n_kv, d, d), k, self.gates) for k in ("wq", "wk")}
        else:
            self._w = identity_gates(n_layers, n_kv, d)

    def pipeline(self, device, timer, layer_idx: int = 0):
        if layer_idx < self.dense_layers:
            return Dense().pipeline(device, timer)
        w = getattr(self, "_w", None)
        if w is None:
            raise HetmemError("seer: bind(model) must run before pipeline() (generate does this)")
        return MemoryPipeline(
            BlockPoolPrepare(self.page_size, w["wk"][layer_idx], device),
            GateRelevancy(w["wq"][layer_idx], self.sink_pages, self.recent_pages, self.budget_pages, device),
            BlockBudgetOrThreshold(self.budget_pages, self.sink_pages, self.recent_pages, self.threshold, device),
            BlockSparseAttention(device),
            timer,
        )
