"""``dsa``: DeepSeek's sparse attention (V3.2 lightning indexer) -- token-sparse attention chosen by a
small learned indexer computed from the layer's hidden state.

    Prepare    one small index key per token, k_t = W_k h_t (from the attention input h; captured with a
               forward pre-hook on the attention module)
    Relevancy  index queries q_h = W_q h and weights w = W_w h for H index heads from the query's hidden
               state; score_t = sum_h w_h * ReLU(q_h . k_t)                               (ops.index_score)
    Retrieval  the top ``budget`` tokens (the last ``recent`` always in), one selection shared by every
               head, as in DeepSeek                                                     (ops.topk)
    Apply      gather the selected tokens' K and V and attend over only those          (ops.token_gather)

The untrained indexer is the model's own query/key projections (the first KV group, without RoPE) with
equal head weights, found by ``llm.arch.qk_projections`` whatever the module layout (separate q/k, fused
qkv, MLA); ``hetmem train --method dsa`` distils it (KL to the head-summed attention), and ``--gates DIR``
loads it. Index dim = the model's head dim; on MLA models (DeepSeek-V3) it is the latent rank: index keys
start as ``c_kv`` (the latent the cache holds) and index queries as ``W_UK^T q_nope``, so the indexer
selects on the latent cache, and Apply attends over the selected latents. On a sliding-window layer the
candidates are the tokens inside the window. DeepSeek stores index keys in FP8; here they are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.llm.arch import attention_modules, qk_projections
from hetmem.methods.base import Method, param, register
from hetmem.methods.gates import check_gates_dir, check_shape, load_gates
from hetmem.methods.shared import GatherAttention, dense_pipeline
from hetmem.ops import counts as C
from hetmem.ops.index_score import index_scores
from hetmem.ops.topk import budget_page_indices

INDEXER_KEYS = ("wq", "bq", "wk", "bk", "ww", "bw")


def init_indexer(model, index_heads: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Indexer weights for every layer, started from the model's own q/k projections (KV group 0, no RoPE).

    Shapes (per layer, stacked over layers): wq [H_i*D, hidden], bq [H_i*D], wk [D, hidden], bk [D],
    ww [H_i, hidden], bw [H_i].
    """
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in INDEXER_KEYS}
    for m in attention_modules(model):
        p = qk_projections(m, model.config)  # wq [H, d, hidden], wk [H_kv, d, hidden]
        heads_per_group = p["wq"].shape[0] // p["wk"].shape[0]
        hidden = p["wq"].shape[2]
        rows = []
        for i in range(index_heads):
            w = p["wq"][i % heads_per_group]
            if i >= heads_per_group:  # a repeated head: break the symmetry so training can separate them
                w = w + 0.01 * w.std() * torch.randn(w.shape, generator=gen)
            rows.append(w)
        out["wq"].append(torch.cat(rows))
        out["bq"].append(torch.cat([p["bq"][i % heads_per_group] for i in range(index_heads)]))
        out["wk"].append(p["wk"][0].clone())
        out["bk"].append(p["bk"][0].clone())
        out["ww"].append(torch.zeros(index_heads, hidden))
        out["bw"].append(torch.full((index_heads,), 1.0 / index_heads))
    return {k: torch.stack(v) for k, v in out.items()}


def indexer_query(w: dict, h: torch.Tensor, index_heads: int):
    """Index queries ``[..., H_i, D]`` and head weights ``[..., H_i]`` from hidden states ``h [..., hidden]``."""
    q = torch.nn.functional.linear(h, w["wq"], w["bq"])
    wts = torch.nn.functional.linear(h, w["ww"], w["bw"])
    return q.reshape(*q.shape[:-1], index_heads, -1), wts


def indexer_key(w: dict, h: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(h, w["wk"], w["bk"])


@register_impl("index-keys", role="prepare")
@dataclass
class IndexKeyPrepare:
    """Prepare: index keys of the tokens just written, from their hidden states ``[B, 1, cap, D_i]``."""

    weights: dict
    device: str = "cpu"
    name: str = "index-keys"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        h = layer.hidden
        if h is None:
            raise HetmemError("dsa needs the attention input hidden states (generate installs the hook)")
        cap = layer.capacity
        if memory is None:
            B = layer.buf_k.shape[0]
            d = self.weights["wk"].shape[0]
            memory = Memory(kind="index-keys", unit_size=1,
                            tensors={"kidx": layer.buf_k.new_zeros(B, 1, cap, d, dtype=torch.float32)})
            memory.meta["n_kv"] = layer.buf_k.shape[1]
        n = end - start
        memory.tensors["kidx"][:, 0, start:end] = indexer_key(self.weights, h[:, -n:].float())
        memory.n_units = end
        memory.meta["length"] = end
        return memory

    def op_counts(self, raw, memory=None):
        layer, start, end = raw
        d, hidden = self.weights["wk"].shape
        return {"prepare": [C.indexer_key(layer.buf_k.shape[0], end - start, hidden, d)]}


@register_impl("lightning-indexer", role="relevancy")
@dataclass
class LightningIndexerRelevancy:
    """Relevancy: score_t = sum_h w_h ReLU(q_h . k_t) for the candidate tokens (all but the recent window)."""

    weights: dict
    index_heads: int
    budget: int
    recent: int
    device: str = "cpu"
    name: str = "lightning-indexer"

    def score(self, memory: Memory, query: Query) -> Scores:
        L, ws = memory.n_units, memory.meta.get("window_start", 0)  # a sliding window's first token
        hi = max(ws, L - self.recent) if self.budget < L - ws else ws
        h = query.meta["hidden"][:, -1].float()  # [B, hidden]: the decode token's attention input
        q, w = indexer_query(self.weights, h, self.index_heads)
        return Scores(index_scores(q, w, memory.tensors["kidx"][:, 0, ws:hi]), offset=ws)

    def op_counts(self, memory, query):
        L = memory.n_units
        hi = max(0, L - self.recent) if self.budget < L else 0
        d = memory.tensors["kidx"].shape[-1]
        return {"relevancy": C.lightning_indexer(query.vectors.shape[0], self.index_heads, hi, d,
                                                 self.weights["wq"].shape[-1])}


@register_impl("token-topk-shared", role="retrieval")
@dataclass
class SharedTokenTopK:
    """Retrieval: top ``budget`` tokens (recent window forced), shared by all KV heads."""

    budget: int
    recent: int
    device: str = "cpu"
    name: str = "token-topk-shared"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        L, ws = memory.n_units, memory.meta.get("window_start", 0)
        idx = budget_page_indices(scores.values, scores.offset, L, self.budget, 0, self.recent, ws)  # [B, k]
        idx = idx.unsqueeze(1).expand(idx.shape[0], memory.meta["n_kv"], idx.shape[-1])
        return Selection(indices=idx, n_units=L, unit_size=1, length=L, start=ws)

    def op_counts(self, scores, memory):
        v = scores.values
        return {"retrieval": C.budget_page_indices(math.prod(v.shape[:-1]), v.shape[-1], memory.n_units, self.budget,
                                                   0, self.recent)}


@register
@dataclass
class DSA(Method):
    name = "dsa"
    family = "sparse-attention"
    summary = "DeepSeek lightning indexer: sum_h w_h*ReLU(q_h.k_t) from hidden states, top-k tokens"

    budget: int = param(2048, "tokens attended per decode step (top tokens by indexer score, recent window included)", low=1)
    index_heads: int = param(4, "indexer heads H (DeepSeek-V3.2 uses 64)", low=1)
    recent: int = param(16, "most recent tokens always selected", low=1)
    dense_layers: int = param(0, "first layers kept dense (not sparse)", low=0)
    gates: str | None = param(None, "trained indexer: a directory written by 'hetmem train --method dsa' (default: untrained)")

    needs_hidden = True  # generate installs the pre-hook that captures attention inputs

    def validate(self) -> None:
        if self.gates:
            check_gates_dir(self.gates)
        if self.budget < 1 or self.index_heads < 1:
            raise HetmemError("dsa needs --budget >= 1 and --index-heads >= 1")
        if not 1 <= self.recent <= self.budget:
            raise HetmemError(f"dsa needs 1 <= --recent <= --budget (got recent={self.recent})")
        if self.dense_layers < 0:
            raise HetmemError("--dense-layers must be >= 0")

    def bind(self, model) -> None:
        init = init_indexer(model, self.index_heads)
        if self.gates:
            t, meta = load_gates(self.gates, self.name)
            if meta.get("index_heads") != self.index_heads:
                raise HetmemError(f"--gates {self.gates} were trained with --index-heads {meta.get('index_heads')}, "
                                  f"not {self.index_heads}")
            init = {k: check_shape(t[k], tuple(init[k].shape), k, self.gates).float() for k in INDEXER_KEYS}
        dev = next(model.parameters()).device
        self._w = {k: v.to(dev) for k, v in init.items()}

    def layer_weights(self, i: int) -> dict:
        return {k: v[i] for k, v in self._w.items()}

    def pipeline(self, device, timer, layer_idx: int = 0):
        if layer_idx < self.dense_layers:
            return dense_pipeline(device, timer)
        if getattr(self, "_w", None) is None:
            raise HetmemError("dsa: bind(model) must run before pipeline() (generate does this)")
        w = self.layer_weights(layer_idx)
        return MemoryPipeline(
            IndexKeyPrepare(w, device),
            LightningIndexerRelevancy(w, self.index_heads, self.budget, self.recent, device),
            SharedTokenTopK(self.budget, self.recent, device),
            GatherAttention(device),
            timer,
        )
