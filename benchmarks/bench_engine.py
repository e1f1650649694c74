"""Continuous-batching engine throughput (issue 10, part A): tokens/s of 1 sequence vs N concurrent ones, measured.

SmolLM2 (the embedded model), short prompts (essay text, ``--prompt-tokens`` each, a different slice per request),
greedy, ``--max-tokens`` generated per request, no early stop (EOS is not honoured, so every request generates the
same count). In one run, on one ``BatchEngine`` (``runtime/batch_engine.py``):

  sequential   ``--requests`` requests one after another (batch of 1): tokens/s = generated tokens / wall time;
               once as the engine runs by default (every step padded to 16 rows, for batch invariance) and once
               with ``min_rows=1`` (no padding: the fastest one sequence can go)
  concurrent   ``--concurrent`` requests submitted at once: tokens/s over the same wall-clock definition

The ratio concurrent / sequential is reported against both sequential figures. All figures are measured wall time
on this machine (shared: the record keeps the load average). Usage:

    python benchmarks/bench_engine.py [--concurrent 16] [--requests 4] [--max-tokens 64] [--prompt-tokens 16]
                                      [--method dense] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

from hetmem.llm.models import load_model  # noqa: E402
from hetmem.runtime.batch_engine import BatchEngine  # noqa: E402
from hetmem.runtime.engine_api import GenRequest, Sampling  # noqa: E402
from hetmem.tasks.haystack import essay_text  # noqa: E402


def run_wave(engine, reqs) -> tuple[float, int, list[float]]:
    """Submit ``reqs`` at once; wait for all. Returns (wall s, generated tokens, per-request ttft ms)."""
    done = threading.Event()
    left = [len(reqs)]
    toks = [0]
    ttft: list[float] = []
    lock = threading.Lock()

    def on_event(ev):
        with lock:
            if ev.token_id is not None:
                toks[0] += 1
            if ev.finish_reason:
                if ev.error:
                    raise SystemExit(f"request failed: {ev.error}")
                ttft.append(ev.report["ttft_ms"])
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r, on_event)
    done.wait()
    return time.perf_counter() - t0, toks[0], ttft


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="sequential requests (batch of 1)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--method", default="dense")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Record("bench_engine")
    lm = load_model("smollm2")
    ids = lm.tokenizer(essay_text(), add_special_tokens=False)["input_ids"]
    P = args.prompt_tokens

    def req(i: int, tag: str) -> GenRequest:
        return GenRequest(f"{tag}{i}", ids[i * P : (i + 1) * P], args.method, {},
                          Sampling(max_tokens=args.max_tokens))

    rec.setting(model=lm.name, method=args.method, concurrent=args.concurrent, sequential_requests=args.requests,
                max_tokens=args.max_tokens, prompt_tokens=P, threads=torch.get_num_threads(),
                dtype=str(next(lm.model.parameters()).dtype))
    never = {-1}  # no EOS: every request generates max_tokens
    out = {}
    for label, min_rows in (("padded16", 16), ("unpadded", 1)):
        eng = BatchEngine(lm.model, lm.tokenizer, model_name=lm.name, max_batch=max(args.concurrent, 1),
                          pool_tokens=(args.concurrent + 1) * (P + args.max_tokens + 16), min_rows=min_rows,
                          eos_token_ids=never)
        try:
            run_wave(eng, [req(999, "warm")])  # warm-up (kernels, allocator)
            wall, toks = 0.0, 0
            for i in range(args.requests):
                w, t, _ = run_wave(eng, [req(i, "s")])
                wall, toks = wall + w, toks + t
            out[f"seq_{label}"] = toks / wall
            print(f"sequential ({label}): {toks} tokens in {wall:.2f} s = {toks / wall:.2f} tok/s", flush=True)
            if min_rows == 16:
                w, t, ttft = run_wave(eng, [req(100 + i, "c") for i in range(args.concurrent)])
                out["concurrent"] = t / w
                out["ttft_p50"] = sorted(ttft)[len(ttft) // 2]
                print(f"concurrent x{args.concurrent}: {t} tokens in {w:.2f} s = {t / w:.2f} tok/s", flush=True)
                st = eng.stats()
                assert st["pool_free_pages"] == st["pool_pages"], "pages not all freed"
        finally:
            eng.close()
    rec.figure("tokens_per_s_sequential_padded16", round(out["seq_padded16"], 2), "tok/s")
    rec.figure("tokens_per_s_sequential_unpadded", round(out["seq_unpadded"], 2), "tok/s")
    rec.figure(f"tokens_per_s_concurrent_{args.concurrent}", round(out["concurrent"], 2), "tok/s")
    rec.figure("ratio_vs_sequential_unpadded", round(out["concurrent"] / out["seq_unpadded"], 2), "x")
    rec.figure("ratio_vs_sequential_padded16", round(out["concurrent"] / out["seq_padded16"], 2), "x")
    rec.figure("ttft_p50_concurrent_ms", round(out["ttft_p50"], 1), "ms")
    print(f"ratio: {out['concurrent'] / out['seq_unpadded']:.2f}x vs unpadded, "
          f"{out['concurrent'] / out['seq_padded16']:.2f}x vs padded", flush=True)
    rec.write(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
