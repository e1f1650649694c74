"""Analytic op counts: FLOPs (or integer/comparison ops), bytes read and bytes written per op call.

Every count here is computed from the shapes and dtypes of an op's inputs (``count_source:
"analytic"``); nothing is measured. The conventions (one place, so the unit tests and the docs agree):

* a multiply-add is 2 flops; a comparison, max/min, add, exp or divide is 1 op;
* bytes read = every input element read once from memory (weights once per call, no cache reuse
  across calls); bytes written = every output element written once;
* ``e`` is the element size in bytes of the op's main tensors (4 for float32, 2 for bfloat16);
  scores are float32 (4 bytes) and indices int64 (8 bytes), as the ops produce them.

The functions take plain ints, so they are cheap. A method's step says what one call of it costs with an
``op_counts(*args) -> {step name: [OpCount]}`` method built from these; the profiler's StepCounter calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class OpCount:
    op: str
    cls: str  # reduce | gemv | topk | gather | attention | dense | copy
    flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    def as_dict(self) -> dict:
        return {"op": self.op, "class": self.cls, "flops": self.flops, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written}


def total(counts: list[OpCount]) -> tuple[float, float, float]:
    return (sum(c.flops for c in counts), sum(c.bytes_read for c in counts), sum(c.bytes_written for c in counts))


def intensity(flops: float | None, bytes_read: float | None, bytes_written: float | None) -> float | None:
    if flops is None or bytes_read is None:
        return None
    b = bytes_read + (bytes_written or 0.0)
    return flops / b if b > 0 else None


def _log2(k: int) -> int:
    return max(1, math.ceil(math.log2(max(k, 2))))


# ---------------------------------------------------------------------------------------------
# Ops (ops/*.py)
# ---------------------------------------------------------------------------------------------
def page_minmax(B: int, H: int, L: int, D: int, page_size: int, e: int) -> OpCount:
    """ops.page_minmax over L tokens: one min and one max comparison per key element."""
    n_pages = -(-L // page_size)
    return OpCount("page_minmax", "reduce", 2.0 * B * H * L * D, float(e * B * H * L * D), float(e * 2 * B * H * n_pages * D))


def page_minmax_update(B: int, H: int, D: int, start: int, end: int, page_size: int, e: int) -> OpCount:
    """ops.update_page_minmax for tokens [start, end) (what Prepare does on each cache update)."""
    if end <= start:
        return OpCount("update_page_minmax", "reduce")
    if end - start == 1:
        if start % page_size == 0:  # first token of a page: copied into min and max
            return OpCount("update_page_minmax", "reduce", 0.0, float(e * B * H * D), float(e * 2 * B * H * D))
        # running min and max: read key + page min + page max, write min and max
        return OpCount("update_page_minmax", "reduce", 2.0 * B * H * D, float(e * 3 * B * H * D), float(e * 2 * B * H * D))
    p0 = start // page_size
    c = page_minmax(B, H, end - p0 * page_size, D, page_size, e)
    c.op = "update_page_minmax"
    return c


def quest_upper_bound(B: int, H_kv: int, G: int, N: int, D: int, e: int) -> OpCount:
    """ops.quest_upper_bound: q+ . M + q- . m for N pages, then max over the G query heads of a KV head.

    flops = 2 clamps of q (2*B*H_kv*G*D) + two matmuls (2 * 2*B*H_kv*G*N*D) + their sum (B*H_kv*G*N)
            + the max over G (B*H_kv*(G-1)*N)
    read  = q (B*H_kv*G*D) + page min and max (2*B*H_kv*N*D), at e bytes
    write = scores B*H_kv*N float32
    """
    flops = 2.0 * B * H_kv * G * D + 4.0 * B * H_kv * G * N * D + B * H_kv * G * N + B * H_kv * (G - 1) * N
    read = e * (B * H_kv * G * D + 2 * B * H_kv * N * D)
    return OpCount("quest_upper_bound", "gemv", flops, float(read), 4.0 * B * H_kv * N)


def topk(rows: int, n: int, k: int, sort: bool = True) -> OpCount:
    """ops.topk_indices: a heap top-k (n*log2(k) comparisons per row) plus sorting the k ids (k*log2(k)).

    read: the float32 scores; write: k int64 ids per row.
    """
    k = max(0, min(k, n))
    if k == 0 or n == 0:
        return OpCount("topk", "topk")
    ops = rows * n * _log2(k) + (rows * k * _log2(k) if sort else 0)
    return OpCount("topk", "topk", float(ops), 4.0 * rows * n, 8.0 * rows * k)


def budget_page_indices(rows: int, n_candidates: int, n_pages: int, budget_pages: int, sink_pages: int,
                        recent_pages: int) -> list[OpCount]:
    """ops.budget_page_indices: top-k over the candidate pages, then writing the budget's page ids."""
    if budget_pages >= n_pages:
        return [OpCount("page_ids", "copy", 0.0, 0.0, 8.0 * rows * n_pages)]
    recent = min(recent_pages, n_pages, budget_pages)
    sink = min(sink_pages, n_pages - recent, budget_pages - recent)
    k = budget_pages - recent - sink
    out = [topk(rows, n_candidates, k)] if k > 0 else []
    # concatenation: read the k ids, write all budget ids
    out.append(OpCount("page_ids", "copy", 0.0, 8.0 * rows * max(k, 0), 8.0 * rows * budget_pages))
    return out


def gather_pages(B: int, H: int, n_tokens: int, D: int, n_index: int, e: int, tensors: int = 2) -> OpCount:
    """Gather ``n_tokens`` selected tokens of ``tensors`` KV tensors (K and V): pure data movement.

    read = the selected rows (tensors*B*H*n_tokens*D at e) + the page ids (B*H*n_index int64); write = the rows.
    """
    rows = tensors * B * H * n_tokens * D
    return OpCount("gather_pages", "gather", 0.0, float(e * rows + 8 * B * H * n_index), float(e * rows))


def decode_attention(B: int, H_kv: int, G: int, S: int, D: int, e: int) -> OpCount:
    """ops.grouped_decode_attention: G query heads per KV head against S keys and values.

    flops = q.K (2*B*H_kv*G*S*D) + P.V (2*B*H_kv*G*S*D) + softmax (5 per score: scale, max, sub+exp, sum, divide)
    read  = K and V (2*B*H_kv*S*D) + q (B*H_kv*G*D); write = the output (B*H_kv*G*D), all at e bytes.
    """
    flops = 4.0 * B * H_kv * G * S * D + 5.0 * B * H_kv * G * S
    return OpCount("decode_attention", "attention", flops, float(e * (2 * B * H_kv * S * D + B * H_kv * G * D)),
                   float(e * B * H_kv * G * D))


def prefill_attention(B: int, H: int, H_kv: int, Lq: int, Lk: int, D: int, e: int) -> OpCount:
    """Causal attention of the last ``Lq`` of ``Lk`` tokens (a prefill chunk), counting only the causal pairs."""
    pairs = Lq * (Lk - Lq) + Lq * (Lq + 1) // 2
    flops = 4.0 * B * H * pairs * D + 5.0 * B * H * pairs
    read = e * (B * H * Lq * D + 2 * B * H_kv * Lk * D)
    return OpCount("prefill_attention", "attention", flops, float(read), float(e * B * H * Lq * D))


def linear(name: str, T: int, n_in: int, n_out: int, e: int) -> OpCount:
    """y = x W^T for T tokens: 2*T*n_in*n_out flops; read W and x, write y."""
    return OpCount(name, "dense", 2.0 * T * n_in * n_out, float(e * (n_in * n_out + T * n_in)), float(e * T * n_out))


def elementwise(name: str, n: int, ops_per: float, reads: int, writes: int, e: int) -> OpCount:
    return OpCount(name, "dense", float(ops_per * n), float(e * reads * n), float(e * writes * n))


def dense_layer(T: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, e: int) -> list[OpCount]:
    """The dense parts of one Llama/Qwen2 decoder layer for T tokens: 2 RMSNorms, Q/K/V/O projections,
    the gated MLP (gate, up, SiLU*mul, down), 2 residual adds, and the KV-cache append."""
    return [
        elementwise("rmsnorm", T * hidden, 4, 1, 1, e),
        linear("q_proj", T, hidden, heads * head_dim, e),
        linear("k_proj", T, hidden, kv_heads * head_dim, e),
        linear("v_proj", T, hidden, kv_heads * head_dim, e),
        OpCount("kv_append", "copy", 0.0, float(e * 2 * T * kv_heads * head_dim), float(e * 2 * T * kv_heads * head_dim)),
        linear("o_proj", T, heads * head_dim, hidden, e),
        elementwise("residual_add", T * hidden, 1, 2, 1, e),
        elementwise("rmsnorm", T * hidden, 4, 1, 1, e),
        linear("gate_proj", T, hidden, intermediate, e),
        linear("up_proj", T, hidden, intermediate, e),
        elementwise("silu_mul", T * intermediate, 5, 2, 1, e),
        linear("down_proj", T, intermediate, hidden, e),
        elementwise("residual_add", T * hidden, 1, 2, 1, e),
    ]


def lm_head(T: int, hidden: int, vocab: int, e: int) -> list[OpCount]:
    return [elementwise("final_norm", T * hidden, 4, 1, 1, e), linear("lm_head", T, hidden, vocab, e)]


def block_pool_gate(B: int, H: int, n_tokens: int, n_blocks: int, D: int, Dg: int, e: int) -> OpCount:
    """SeerAttention-R Prepare (ops.block_pool + the gate): add ``n_tokens`` keys into the running block sums of
    ``n_blocks`` blocks, average them, and gate each block mean ([D] x [D, Dg]).

    flops = adds (B*H*n_tokens*D) + means (B*H*n_blocks*D) + gate GEMVs (2*B*H*n_blocks*D*Dg)
    read  = keys (e*B*H*n_tokens*D) + block sums (4*B*H*n_blocks*D) + gate (4*H*D*Dg)
    write = block sums and gated summaries, float32 (4*B*H*n_blocks*(D + Dg))
    """
    flops = B * H * n_tokens * D + B * H * n_blocks * D + 2.0 * B * H * n_blocks * D * Dg
    read = e * B * H * n_tokens * D + 4 * B * H * n_blocks * D + 4 * H * D * Dg
    return OpCount("block_pool_gate", "reduce", float(flops), float(read), float(4 * B * H * n_blocks * (D + Dg)))


def gated_block_scores(B: int, H: int, G: int, N: int, D: int, Dg: int, e: int) -> OpCount:
    """SeerAttention-R Relevancy: mean of the G query heads, gate the query ([D] x [D, Dg]), one GEMV over N
    gated block summaries, scale.

    flops = mean (B*H*G*D) + query gate (2*B*H*D*Dg) + GEMV (2*B*H*N*Dg) + scale (B*H*N)
    read  = q (e*B*H*G*D) + gate (4*H*D*Dg) + summaries (4*B*H*N*Dg); write = scores (4*B*H*N)
    """
    flops = B * H * G * D + 2.0 * B * H * D * Dg + 2.0 * B * H * N * Dg + B * H * N
    read = e * B * H * G * D + 4 * H * D * Dg + 4 * B * H * N * Dg
    return OpCount("gated_block_scores", "gemv", float(flops), float(read), float(4 * B * H * N))


def threshold_select(rows: int, n: int, n_units: int) -> OpCount:
    """Softmax over n candidate scores (5 ops each) and a compare -> a bool bitmap of n_units per row."""
    return OpCount("threshold_bitmap", "topk", 6.0 * rows * n, 4.0 * rows * n, 1.0 * rows * n_units)


def indexer_key(B: int, n_tokens: int, hidden: int, d: int) -> OpCount:
    """DSA Prepare: one index key per token, k = W_k h + b (float32)."""
    return OpCount("indexer_key", "dense", 2.0 * B * n_tokens * hidden * d,
                   float(4 * (d * hidden + d + B * n_tokens * hidden)), float(4 * B * n_tokens * d))


def lightning_indexer(B: int, Hi: int, N: int, D: int, hidden: int) -> list[OpCount]:
    """DSA Relevancy (float32): index queries and head weights from the hidden state, then
    score_t = sum_h w_h ReLU(q_h . k_t) over N tokens.

    query:  flops 2*B*hidden*(Hi*D + Hi); read weights 4*(Hi*D + Hi)*(hidden + 1) + hidden state
    scores: flops 2*B*Hi*N*D (dots) + B*Hi*N (ReLU) + 2*B*Hi*N (weighted sum);
            read keys 4*B*N*D + q 4*B*Hi*D + w 4*B*Hi; write 4*B*N
    """
    q = OpCount("indexer_query", "dense", 2.0 * B * hidden * (Hi * D + Hi),
                float(4 * ((Hi * D + Hi) * (hidden + 1) + B * hidden)), float(4 * B * (Hi * D + Hi)))
    sc = OpCount("index_scores", "gemv", 2.0 * B * Hi * N * D + 3.0 * B * Hi * N,
                 float(4 * (B * N * D + B * Hi * D + B * Hi)), float(4 * B * N))
    return [q, sc]


def _mm(name: str, H: int, M: int, K: int, N: int, e: int) -> OpCount:
    """H batched [M, K] x [K, N] matmuls."""
    return OpCount(name, "dense", 2.0 * H * M * K * N, float(e * H * (M * K + K * N)), float(e * H * M * N))


def fast_weight_forward(H: int, T: int, d: int, m: int, r: int, e: int) -> list[OpCount]:
    """LaCT f_W(x) for T tokens per head (ops.fast_weight.fw_forward): the low-rank W1/W3 paths, SwiGLU, W2."""
    return [_mm("fw_x_v1", H, T, d, r, e), _mm("fw_h1_u1", H, T, r, m, e), _mm("fw_x_v3", H, T, d, r, e),
            _mm("fw_h3_u3", H, T, r, m, e), elementwise("fw_swiglu", H * T * m, 5, 2, 1, e),
            _mm("fw_g_w2", H, T, m, d, e)]


def fast_weight_loss(H: int, T: int, d: int, e: int) -> OpCount:
    return OpCount("fw_loss", "reduce", 2.0 * H * T * d, float(e * 2 * H * T * d), float(4 * H))


def fast_weight_update(H: int, T: int, d: int, m: int, r: int, e: int) -> list[OpCount]:
    """The hand-written gradient of -f_W(k)^T v and the SGD step (ops.fast_weight.fw_grads, fw_step)."""
    n_w = H * (2 * m * r + 2 * r * d + d * m)
    return [_mm("fw_dW2", H, d, T, m, e), _mm("fw_dg", H, T, d, m, e), elementwise("fw_dswiglu", H * T * m, 10, 4, 2, e),
            _mm("fw_dU1", H, m, T, r, e), _mm("fw_da_u1", H, T, m, r, e), _mm("fw_dV1", H, r, T, d, e),
            _mm("fw_dU3", H, m, T, r, e), _mm("fw_db_u3", H, T, m, r, e), _mm("fw_dV3", H, r, T, d, e),
            elementwise("fw_sgd", n_w, 2, 2, 1, e)]
