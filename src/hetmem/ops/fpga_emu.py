"""Emulated FPGA kernels: Compute Relevancy and Retrieval as the prototype's FPGA runs them.

They run on the host for their *function* (bit-exact to the integer datapath described here) and
count what the hardware would do: cycles of the streaming units, multiply-accumulates of the scoring
kernels, bytes streamed from HBM. Their time is *modelled* from those counts and the FPGA's device
file (``hw.cost.fpga_modelled_us``: MACs at the file's ``macs_per_cycle``, cycles at its
``clock_mhz``, bytes at its HBM bandwidth), never measured. Nothing here knows a device's rates.

* ``quest_upper_bound_int16`` / ``gemv_int16``: scoring with int16-quantised queries and keys
  (symmetric, one scale per tensor), int64 accumulation (the DSP48 cascade's 48-bit accumulator
  never overflows at these sizes). Scores are integers; ``scale`` maps them back to floats.
* ``streaming_topk``: k slots and a running minimum; scores arrive 16 per cycle and each is checked
  against the minimum; a score strictly greater replaces the minimum slot (the newest of equal
  minima). The result is exactly the top-k under (score desc, index asc).
* ``threshold_bitmap_128``: one 128-bit word per 128 keys (score >= threshold), 16 compares per cycle.
* ``bm25_int16``: BM25 with 16 lanes: the postings of each query term stream 16 per cycle; each
  weight (idf x tf-part, b = 0 in the prototype) is int16 fixed point and doc scores accumulate in
  int32. Integer addition is associative, so the order lanes add in does not change the result.

Differences from the float reference (``ops.page_score``, ``ops.topk``, ``ops.bm25``) come only
from quantisation: two units whose float scores differ by less than about one quantum
(``scale`` x a few units) may swap order, so a top-k can differ from the float top-k at its
boundary, and a threshold bitmap can differ for scores within a quantum of the threshold.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import torch

INT16_MAX = 32767
LANES = 16
BITMAP_WORD = 128


@dataclass
class FpgaCycles:
    """What the hardware would spend: cycles of the streaming units (top-k, bitmap, postings), int16
    multiply-accumulates of the scoring array (their cycles depend on the device: ``macs_per_cycle``
    in its file), and bytes streamed from HBM."""

    cycles: float = 0.0
    hbm_bytes: float = 0.0
    macs: float = 0.0

    def __iadd__(self, o: "FpgaCycles"):
        self.cycles += o.cycles
        self.hbm_bytes += o.hbm_bytes
        self.macs += o.macs
        return self


def quantize_int16(x: torch.Tensor, amax: float | None = None) -> tuple[torch.Tensor, float]:
    """Symmetric int16 quantisation: ``x ~= q * scale`` with ``|q| <= 32767``."""
    amax = float(x.abs().max()) if amax is None and x.numel() else (amax or 0.0)
    scale = amax / INT16_MAX if amax > 0 else 1.0
    q = torch.round(x.float() / scale).clamp_(-INT16_MAX, INT16_MAX).to(torch.int64)  # int16 values, int64 math
    return q, scale


def gemv_int16(q: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, float, FpgaCycles]:
    """Scores ``q [..., D] . keys [..., N, D]`` -> int ``[..., N]`` (x ``scale`` = float score)."""
    qi, sq = quantize_int16(q)
    ki, sk = quantize_int16(keys)
    s = torch.matmul(ki, qi.unsqueeze(-1)).squeeze(-1)
    n_mac = keys.numel()
    cyc = FpgaCycles(macs=n_mac, hbm_bytes=keys.numel() * 2 + q.numel() * 2 + s.numel() * 4)
    return s, sq * sk, cyc


def quest_upper_bound_int16(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> tuple[torch.Tensor, float, FpgaCycles]:
    """Quest upper bound ``[B, H_kv, N]`` (max over the GQA group) with int16 operands.

    ``q [B, H_kv, G, D]``, page bounds ``[B, H_kv, N, D]``; both bounds share one scale.
    """
    qi, sq = quantize_int16(q)
    amax = max(float(kmin.abs().max()) if kmin.numel() else 0.0, float(kmax.abs().max()) if kmax.numel() else 0.0)
    mi, sk = quantize_int16(kmin, amax)
    ma, _ = quantize_int16(kmax, amax)
    ub = torch.matmul(qi.clamp(min=0), ma.transpose(-1, -2)) + torch.matmul(qi.clamp(max=0), mi.transpose(-1, -2))
    out = ub.amax(dim=2)
    macs = 2 * q.shape[2] * kmin.numel()
    cyc = FpgaCycles(macs=macs, hbm_bytes=(kmin.numel() + kmax.numel() + q.numel()) * 2 + out.numel() * 4)
    return out, sq * sk, cyc


def index_scores_int16(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, float, FpgaCycles]:
    """DSA's lightning indexer, sum_h w_h ReLU(q_h . k_t), with int16 q, w and keys: ``q [B, H_i, D]``,
    ``w [B, H_i]``, ``k [B, L, D]`` -> int ``[B, L]`` (x ``scale`` = float score)."""
    qi, sq = quantize_int16(q)
    wi, sw = quantize_int16(w)
    ki, sk = quantize_int16(k)
    s = torch.relu(torch.matmul(qi, ki.transpose(-1, -2)))  # [B, H_i, L]
    out = torch.matmul(wi.unsqueeze(1), s).squeeze(1)
    macs = q.shape[0] * q.shape[1] * k.shape[1] * (k.shape[2] + 1)
    cyc = FpgaCycles(macs=macs, hbm_bytes=k.numel() * 2 + q.numel() * 2 + out.numel() * 4)
    return out, sq * sw * sk, cyc


def streaming_topk(scores: torch.Tensor, k: int, lanes: int = LANES) -> tuple[torch.Tensor, FpgaCycles]:
    """Top-``k`` indices (ascending) of each row of ``scores [..., N]`` by the streaming unit.

    Returns the indices and the cycles: per row ``ceil(N / lanes)`` scan cycles, ``k`` fill cycles and
    ``ceil(log2 k)`` per later insertion (the slot update), rows one after another.
    """
    lead = scores.shape[:-1]
    n = scores.shape[-1]
    k = max(0, min(k, n))
    x = scores.reshape(-1, n)
    R = x.shape[0]
    if k == 0:
        return torch.zeros(*lead, 0, dtype=torch.int64), FpgaCycles()
    out = torch.empty(R, k, dtype=torch.int64)
    inserts = 0
    for r, row in enumerate(x.tolist()):
        # k slots as a min-heap on (score, -index): the root is the running minimum, and among equal
        # minima the newest index, which is the one a strictly greater score evicts.
        slots = [(row[i], -i) for i in range(k)]  # fill
        heapq.heapify(slots)
        m = slots[0][0]
        for start in range(k, n, lanes):  # one cycle: 16 scores against the running minimum
            chunk = row[start : start + lanes]
            if max(chunk) <= m:
                continue
            for j, v in enumerate(chunk):
                if v > m:
                    heapq.heapreplace(slots, (v, -(start + j)))
                    inserts += 1
                    m = slots[0][0]
        out[r] = torch.tensor(sorted(-i for _, i in slots))
    log2k = math.ceil(math.log2(max(k, 2)))
    cycles = R * (math.ceil(n / lanes) + k) + log2k * inserts
    return out.reshape(*lead, k), FpgaCycles(cycles=cycles, hbm_bytes=x.numel() * 4 + R * k * 4)


def topk_reference_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k under (score desc, index asc), ascending indices: what the streaming unit must return."""
    k = max(0, min(k, scores.shape[-1]))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def threshold_bitmap_128(scores: torch.Tensor, threshold: float | int) -> tuple[torch.Tensor, torch.Tensor, FpgaCycles]:
    """``scores >= threshold`` as packed 128-bit words ``[..., ceil(N/128), 16]`` (uint8) and as bools."""
    n = scores.shape[-1]
    words = math.ceil(n / BITMAP_WORD)
    bits = scores >= threshold
    pad = torch.zeros(*bits.shape[:-1], words * BITMAP_WORD, dtype=torch.bool)
    pad[..., :n] = bits
    packed = torch.from_numpy(np.packbits(pad.numpy(), axis=-1, bitorder="little")).reshape(*bits.shape[:-1], words, BITMAP_WORD // 8)
    rows = bits.numel() // max(n, 1)
    cyc = FpgaCycles(cycles=rows * words * (BITMAP_WORD // LANES), hbm_bytes=scores.numel() * 4 + packed.numel())
    return packed, bits, cyc


def unpack_bitmap_128(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = np.unpackbits(packed.numpy().reshape(*packed.shape[:-2], -1), axis=-1, bitorder="little")
    return torch.from_numpy(flat[..., :n].astype(bool))


def bm25_int16(weights, term_ids: np.ndarray, wmax: float | None = None) -> tuple[np.ndarray, float, FpgaCycles]:
    """BM25 scores (int) of one query from the term x passage CSR weight matrix, 16 postings per cycle.

    Returns integer scores, the scale (float score ~= int x scale) and the cycles.
    """
    n = weights.shape[1]
    wmax = float(weights.data.max()) if wmax is None and weights.nnz else (wmax or 1.0)
    scale = wmax / INT16_MAX if wmax > 0 else 1.0
    out = np.zeros(n, dtype=np.int64)
    cycles = 0.0
    postings = 0
    for t in np.asarray(term_ids, dtype=np.int64):
        a, b = weights.indptr[t], weights.indptr[t + 1]
        w = np.clip(np.rint(weights.data[a:b] / scale), 0, INT16_MAX).astype(np.int64)
        np.add.at(out, weights.indices[a:b], w)  # 16 lanes accumulate; integer adds commute
        cycles += math.ceil((b - a) / LANES)
        postings += b - a
    assert out.max(initial=0) < 2**31, "int32 accumulator overflow"
    return out, scale, FpgaCycles(cycles=cycles, hbm_bytes=postings * 6 + n * 4)
