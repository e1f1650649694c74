"""Sparse decode attention over selected pages, three ways (issue 12): which is fastest on this machine.

One decode step of one layer at the llama3-8b layer shape (8 KV heads, G=4, D=128, page 16, 2k budget: 128
pages per KV head, chosen at random, sorted), fp32, over K/V buffers rotated through copies larger than the
last-level cache:

  cpp      ``ops.fast.page_attention``: the selected pages read in place (C++, AVX-512 where present)
  flex     ``torch.nn.attention.flex_attention`` compiled by ``torch.compile`` (inductor, CPU), with a block
           mask of the selected pages (``create_block_mask`` per step, as decode would need: the selection
           changes every step; its time is also given on its own)
  inductor a gather of the selected pages + softmax attention, the whole function compiled by ``torch.compile``

Each is checked against the others (max abs difference) before it is timed; median of 5 samples of ms/step.
Usage: ``python benchmarks/bench_flex.py [--lengths 32768,131072] [--threads 1]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

from hetmem.ops import fast  # noqa: E402

HKV, G, D, P, BUDGET = 8, 4, 128, 16, 2048


def median_ms(fn, n=5, min_ms=20.0):
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, min(200, math.ceil(min_ms / max((time.perf_counter() - t0) * 1e3, 1e-3))))
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        xs.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(xs)


def gather_attend(q, k, v, pages, scale: float):
    """q [1, Hkv, G, D]; k/v [1, Hkv, L, D]; pages [1, Hkv, n] -> [1, Hkv, G, D] (gather, then attend)."""
    tok = (pages.unsqueeze(-1) * P + torch.arange(P, device=pages.device)).flatten(-2)  # [1, Hkv, n * P]
    idx = tok.unsqueeze(-1).expand(*tok.shape, k.shape[-1])
    ks, vs = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    w = torch.softmax(torch.matmul(q, ks.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(w, vs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths = [int(x) for x in a.lengths.split(",")]
    rec = Record().setting(lengths=lengths, threads=a.threads, shape={"kv_heads": HKV, "group": G, "head_dim": D,
                                                                      "page": P, "budget": BUDGET})
    rec.detail("kernels", fast.backend())
    scale = D**-0.5
    flex_c = torch.compile(flex_attention, dynamic=False)
    gather_c = torch.compile(gather_attend, dynamic=False)
    rows = []
    for L in lengths:
        n_pages, k_sel = L // P, BUDGET // P
        copies = max(2, math.ceil((1 << 30) / (2 * HKV * L * D * 4)))
        g = torch.Generator().manual_seed(L)
        kv = [(torch.randn(1, HKV, L, D, generator=g), torch.randn(1, HKV, L, D, generator=g)) for _ in range(copies)]
        q = torch.randn(1, HKV, G, D, generator=g)
        pages = torch.stack([torch.randperm(n_pages, generator=g)[:k_sel].sort().values for _ in range(HKV)])[None]
        sel = torch.zeros(HKV, n_pages, dtype=torch.bool)
        sel.scatter_(1, pages[0], True)

        def mask_mod(b, h, q_idx, kv_idx):
            return sel[h // G, kv_idx // P]

        def block_mask():
            return create_block_mask(mask_mod, 1, HKV * G, 1, L, device="cpu", BLOCK_SIZE=(1, P))

        qf = q.reshape(1, HKV * G, 1, D)
        it = [0]

        def nxt():
            it[0] = (it[0] + 1) % copies
            return kv[it[0]]

        def run_cpp():
            k, v = nxt()
            return fast.page_attention(q, k, v, pages, P, 0, L, scale)

        t0 = time.perf_counter()
        bm = block_mask()
        mask_ms_first = (time.perf_counter() - t0) * 1e3

        def run_flex():
            k, v = nxt()
            return flex_c(qf, k, v, block_mask=block_mask(), scale=scale, enable_gqa=True).reshape(1, HKV, G, D)

        def run_flex_fixed_mask():
            k, v = nxt()
            return flex_c(qf, k, v, block_mask=bm, scale=scale, enable_gqa=True).reshape(1, HKV, G, D)

        def run_inductor():
            k, v = nxt()
            return gather_c(q, k, v, pages, scale)

        ref = gather_attend(q, *kv[0], pages, scale)
        row = {"length": L}
        for name, fn in (("cpp", run_cpp), ("flex", run_flex), ("flex_fixed_mask", run_flex_fixed_mask),
                         ("inductor", run_inductor)):
            it[0] = copies - 1  # the next call uses copy 0, the reference's
            t0 = time.perf_counter()
            try:
                out = fn()
            except Exception as exc:  # a compiler missing or failing on this machine: said, not hidden
                row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
                print(f"  L={L} {name}: failed: {row[name]['error']}", flush=True)
                continue
            first_s = time.perf_counter() - t0
            err = float((out.float() - ref).abs().max())
            ms = median_ms(fn)
            row[name] = {"ms": round(ms, 4), "max_abs_err": err, "first_call_s": round(first_s, 2)}
            print(f"  L={L:>7} {name:<16} {ms:8.3f} ms/step  (max |diff| {err:.1e}; first call incl. compile "
                  f"{first_s:.1f} s)", flush=True)
        row["block_mask_ms"] = round(median_ms(block_mask), 4)
        row["block_mask_first_ms"] = round(mask_ms_first, 1)
        print(f"  L={L:>7} create_block_mask alone {row['block_mask_ms']:.3f} ms", flush=True)
        ok = {k: r["ms"] for k, r in row.items() if isinstance(r, dict) and "ms" in r and k != "flex_fixed_mask"}
        row["fastest"] = min(ok, key=ok.get)
        for name in ("cpp", "flex", "flex_fixed_mask", "inductor"):
            if "ms" in row.get(name, {}):
                rec.figure(f"{name}_ms_{L}", row[name]["ms"], "ms/step")
        rec.figure(f"block_mask_ms_{L}", row["block_mask_ms"], "ms")
        rows.append(row)
        del kv
    rec.detail("rows", rows)
    if not a.no_record:
        rec.write(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
