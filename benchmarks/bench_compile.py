"""Two decode-side evaluations of issue 12's third pass, measured in one run:

  compile   does ``torch.compile`` of the decoder's parts outside hetmem's attention hook pay on CPU? SmolLM2 at
            ``--tokens``, dense and quest at 1/8 budget; every layer's MLP and both RMSNorms compiled (inductor,
            dynamic shapes: the attention hook, with its compiled C++ ops and per-step selection, stays eager
            between them). Eager and compiled decode alternate ``--rounds`` times over one shared prefill; the
            figure is the median ms/token of each, and compiled / eager per round.
  indexers  the one-pass compiled relevancy ops for DSA (``ops.fast.index_scores``) and seer
            (``ops.fast.block_scores``) against their plain torch versions, at ``--index-tokens`` tokens (DSA: 4
            index heads, index dim 128; seer: 8 KV heads, blocks of 16, gate dim 128), over copies larger than the
            L3: GB/s of index bytes read, median of 5, with the read bandwidth (a 1 GiB sum) measured beside each.

    python benchmarks/bench_compile.py [--parts compile,indexers] [--tokens 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402
from bench_limits import GB, LLC_BYTES, Beside, sampled_ms  # noqa: E402

from hetmem.ops import fast  # noqa: E402


def part_compile(rec: Record, log, tokens: int, new_tokens: int, rounds: int) -> dict:
    from hetmem.llm.generate import generate, prefill_once
    from hetmem.llm.models import load_model
    from hetmem.methods import get_method

    lm = load_model("smollm2")
    model = lm.model
    ids = torch.randint(1000, 20000, (1, tokens), generator=torch.Generator().manual_seed(0))
    pre = prefill_once(model, ids, progress=False)
    layers = model.model.layers
    eager = [(ly.mlp.forward, ly.input_layernorm.forward, ly.post_attention_layernorm.forward) for ly in layers]

    def set_compiled(on: bool):
        for ly, (m, a, b) in zip(layers, eager):
            if on:
                ly.mlp.forward = torch.compile(m, dynamic=True)
                ly.input_layernorm.forward = torch.compile(a, dynamic=True)
                ly.post_attention_layernorm.forward = torch.compile(b, dynamic=True)
            else:
                ly.mlp.forward, ly.input_layernorm.forward, ly.post_attention_layernorm.forward = m, a, b

    def decode(name: str) -> float:
        m = get_method(name, **({"budget": tokens // 8} if name == "quest" else {}))
        r = generate(model, ids, m, new_tokens, eos_token_ids=set(), progress=False, prefilled=pre)
        return r.decode_ms / (len(r.token_ids) - 1)

    t0 = time.perf_counter()
    set_compiled(True)
    decode("dense"), decode("quest")  # compiles (decode shapes) and warms up
    compile_s = time.perf_counter() - t0
    set_compiled(False)
    decode("dense"), decode("quest")
    per = {(c, n): [] for c in ("eager", "compiled") for n in ("dense", "quest")}
    for r in range(rounds):
        for c in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            set_compiled(c == "compiled")
            for n in ("dense", "quest"):
                per[(c, n)].append(decode(n))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c} {n} {x[-1]:.1f}" for (c, n), x in per.items()) + " ms/token")
    set_compiled(False)
    out = {"tokens": tokens, "new_tokens": new_tokens, "rounds": rounds, "compile_s": round(compile_s, 1)}
    for n in ("dense", "quest"):
        e, c = per[("eager", n)], per[("compiled", n)]
        ratio = statistics.median(ci / ei for ci, ei in zip(c, e))
        out[n] = {"eager_ms_per_token": round(statistics.median(e), 2), "compiled_ms_per_token": round(statistics.median(c), 2),
                  "compiled_over_eager": round(ratio, 3), "eager_samples": [round(x, 2) for x in e],
                  "compiled_samples": [round(x, 2) for x in c]}
        rec.figure(f"compile_{n}_eager_ms_per_token", out[n]["eager_ms_per_token"], "ms/token")
        rec.figure(f"compile_{n}_compiled_ms_per_token", out[n]["compiled_ms_per_token"], "ms/token")
        rec.figure(f"compile_{n}_compiled_over_eager", out[n]["compiled_over_eager"], "x eager ms/token")
        log(f"  {n}: eager {out[n]['eager_ms_per_token']:.1f}, compiled {out[n]['compiled_ms_per_token']:.1f} ms/token; "
            f"compiled / eager (median per round) {ratio:.2f} (first compile {compile_s:.0f} s)")
    rec.figure("compile_s", out["compile_s"], "s")
    return out


def part_indexers(rec: Record, log, L: int, bw: Beside) -> dict:
    from hetmem.ops.block_pool import gated_block_scores_torch
    from hetmem.ops.index_score import index_scores_torch
    from hetmem.ops.topk import topk_indices

    gen = torch.Generator().manual_seed(0)
    out = {}
    # DSA: index keys [B, 1, cap, 128] float32 (the memory's buffer), 4 index heads
    Hi, D = 4, 128
    nbytes = L * D * 4
    ks = [torch.randn(1, 1, L, D, generator=gen)[:, 0] for _ in range(max(1, -(-LLC_BYTES // nbytes)))]
    q, w = torch.randn(1, Hi, D, generator=gen), torch.rand(1, Hi, generator=gen)
    # seer: gated block summaries [B, 8, L / 16, 128] float32
    H, E, n = 8, 128, L // 16
    sbytes = H * n * E * 4
    kg = [torch.randn(1, H, n, E, generator=gen) for _ in range(max(1, -(-LLC_BYTES // sbytes)))]
    qg = torch.randn(1, H, E, generator=gen)
    it = [0]

    def nxt(xs):
        it[0] += 1
        return xs[it[0] % len(xs)]

    cases = {
        "dsa_torch": (nbytes, lambda: topk_indices(index_scores_torch(q, w, nxt(ks)), 2048)),
        "dsa_compiled": (nbytes, lambda: topk_indices(fast.index_scores(q, w, nxt(ks)), 2048)),
        "seer_torch": (sbytes, lambda: topk_indices(gated_block_scores_torch(qg, nxt(kg), 0.1), 128)),
        "seer_compiled": (sbytes, lambda: topk_indices(fast.block_scores(qg, nxt(kg), 0.1), 128)),
    }
    for name, (nb, fn) in cases.items():
        xs, bws = sampled_ms(fn, bw)
        ratio = statistics.median(nb / (x * 1e-3) / GB / b for x, b in zip(xs, bws))
        ms = statistics.median(xs)
        out[name] = {"ms": round(ms, 3), "GBps": round(nb / (ms * 1e-3) / GB, 2), "ratio": round(ratio, 3), "bytes": nb}
        rec.figure(f"{name}_ms", out[name]["ms"], "ms").figure(f"{name}_ratio", out[name]["ratio"],
                                                              "fraction of read bandwidth")
        log(f"  {name:<14} scores + top-k at {L // 1024}k: {ms:7.3f} ms, {out[name]['GBps']:5.1f} GB/s = {ratio:.2f} of "
            f"the read bandwidth beside each sample")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="compile,indexers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=4096, help="SmolLM2 prompt tokens (compile)")
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--index-tokens", type=int, default=262144)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    if set(parts) - {"compile", "indexers"} or a.threads < 1 or a.rounds < 1 or a.new_tokens < 2:
        ap.error("--parts from compile,indexers; --threads, --rounds >= 1; --new-tokens >= 2")
    torch.set_num_threads(a.threads)
    rec = Record().setting(parts=parts, threads=a.threads, tokens=a.tokens, new_tokens=a.new_tokens, rounds=a.rounds,
                           index_tokens=a.index_tokens)
    rec.detail("kernels", fast.backend())
    log = print
    out = {}
    if "compile" in parts:
        log(f"torch.compile of every layer's MLP + RMSNorms, SmolLM2 at {a.tokens} tokens, {a.rounds} alternating rounds")
        out["compile"] = part_compile(rec, log, a.tokens, a.new_tokens, a.rounds)
    if "indexers" in parts:
        log("one-pass compiled relevancy (DSA indexer, seer block scores) vs plain torch, + top-k")
        bw = Beside()
        out["indexers"] = part_indexers(rec, log, a.index_tokens, bw)
        out["read_GBps_beside_samples"] = bw.summary()
    rec.detail("result", out)
    if not a.no_record:
        rec.write(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
