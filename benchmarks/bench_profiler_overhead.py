"""What the profiler costs: the same real-model run with and without it, as a ratio from one process.

"With" = a StepTimer timing every step call (and the apply.gather sub-step) with per-call trace spans,
plus the analytic StepCounter counting every step call from its inputs (what ``hetmem profile``
uses). "Without" = the timer disabled and no counter (``hetmem run --no-step-timing``). A third arm,
the step timer alone, is what ``hetmem run`` does by default. Each round runs the three in a rotating
order so machine noise and order effects hit all alike. Reported, all measured on this machine:

* the median over pairs of (with / without) end-to-end time, as wall time and as process CPU time
  (with one torch thread, CPU time is not inflated by other programs preempting this one, which
  on a shared machine swings wall time by tens of percent);
* the direct cost: one timed + counted step call vs an untimed one, in a tight loop, times the
  number of step calls of the run, over the run's time.

Target: overhead <= 3% (the exit code checks the CPU-time ratio and the direct cost).

    .venv/bin/python benchmarks/bench_profiler_overhead.py [--model smollm2] [--method quest] [--length 2048]

Appends its record to benchmarks/results/bench_profiler_overhead.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _record import Record

from hetmem.llm.generate import generate
from hetmem.llm.models import load_model
from hetmem.methods import get_method
from hetmem.profiling.counters import StepCounter
from hetmem.profiling.real import ModelRunner, _CountingMethod
from hetmem.core.timer import StepTimer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="quest")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args()
    rec = Record().setting(**vars(args))
    torch.set_num_threads(args.threads)

    lm = load_model(args.model)
    method = get_method(args.method, budget=args.budget)
    ids = ModelRunner(lm).input_ids(args.length)

    def once(mode: str):
        """off = ``hetmem run --no-step-timing``; timing = ``hetmem run`` (step timer only); profiled = the
        profiler (timer + trace spans + analytic counter)."""
        if mode == "profiled":
            timer = StepTimer(trace=True)
            m = _CountingMethod(method, StepCounter(timer))
        else:
            timer, m = StepTimer(enabled=mode == "timing"), method
        c0, w0 = time.process_time(), time.perf_counter()
        r = generate(lm.model, ids, m, args.new_tokens, eos_token_ids=None, progress=False, timer=timer)
        return (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3, r.decode_ms, timer

    once("off")  # warm-up
    modes = ("off", "timing", "profiled")
    runs = {m: [] for m in modes}  # (wall, cpu, decode) per repeat
    timer = None
    for i in range(args.repeats):
        order = modes[i % 3:] + modes[:i % 3]  # rotate the order so warm-up and order effects cancel out
        for mode in order:
            w, c, d, t = once(mode)
            runs[mode].append((w, c, d))
            if mode == "profiled":
                timer = t
        print(f"  round {i + 1}: " + ", ".join(f"{m} wall {runs[m][-1][0]:.0f} cpu {runs[m][-1][1]:.0f} ms" for m in modes)
              + " (measured)", file=sys.stderr)

    def ratio(a: str, b: str, k: int) -> float:
        return statistics.median(x[k] / y[k] for x, y in zip(runs[a], runs[b]))

    on_w = statistics.median(r[0] for r in runs["profiled"])
    calls = sum(timer.calls.values())
    per_call_us = _direct_cost_us(method)
    direct = calls * per_call_us / 1e3 / on_w

    rw, rc, rd = ratio("profiled", "off", 0), ratio("profiled", "off", 1), ratio("profiled", "off", 2)
    tw, tc = ratio("timing", "off", 0), ratio("timing", "off", 1)
    print(f"model {lm.name}, method {args.method} (budget {args.budget}), {args.length} prompt tokens + "
          f"{args.new_tokens} decoded, {args.threads} thread(s), {args.repeats} rounds of 3 runs in rotating order (all measured)")
    print(f"profiled run: {calls} timed step calls, each also counted analytically")
    print(f"direct cost: {per_call_us:.2f} us per timed+counted step call -> {calls} calls = {100 * direct:.2f}% of the run")
    print(f"profiler overhead ratio (with / without, median of pairs): CPU time {rc:.4f} ({100 * (rc - 1):+.2f}%), "
          f"wall {rw:.4f} ({100 * (rw - 1):+.2f}%), decode wall {rd:.4f} ({100 * (rd - 1):+.2f}%); target <= 1.03")
    print(f"step timing of 'hetmem run' vs --no-step-timing (median of rounds): CPU time {tc:.4f} "
          f"({100 * (tc - 1):+.2f}%), wall {tw:.4f} ({100 * (tw - 1):+.2f}%)")
    ok = rc <= 1.03 and direct <= 0.03
    rec.setting(model_name=lm.name)
    rec.figure("cpu_ratio", round(rc, 4), "x", note="with / without profiler, process CPU time, median of rounds")
    rec.figure("wall_ratio", round(rw, 4), "x", note="with / without profiler, wall time, median of rounds")
    rec.figure("decode_wall_ratio", round(rd, 4), "x", note="with / without profiler, decode wall time, median of rounds")
    rec.figure("step_timing_cpu_ratio", round(tc, 4), "x", note="hetmem run (step timer) / --no-step-timing, CPU time")
    rec.figure("step_timing_wall_ratio", round(tw, 4), "x", note="hetmem run (step timer) / --no-step-timing, wall time")
    rec.figure("step_calls", calls, "calls")
    rec.figure("direct_us_per_call", round(per_call_us, 3), "us/call", note="timed + counted step call vs untimed")
    rec.figure("direct_share", round(direct, 5), "fraction", note="direct cost x calls / profiled run wall time")
    rec.detail("rounds", [{m: {"wall_ms": round(r[i][0], 1), "cpu_ms": round(r[i][1], 1)} for m, r in runs.items()}
                          for i in range(args.repeats)])
    rec.write(ok)
    return 0 if ok else 1


def _direct_cost_us(method, n: int = 20000) -> float:
    """Extra cost of timing + counting one step call: a cheap step called through the pipeline both ways."""
    from hetmem.core.types import Memory, Query

    class _Raw:  # what the counters read for a dense apply
        length = 16
        buf_k = torch.zeros(1, 1, 16, 8)

    from hetmem.core.types import DecodeTarget

    target = DecodeTarget(torch.zeros(1, 1, 1, 8), 1.0)
    dense = get_method("dense")
    res = []
    for profiled in (False, True):
        timer = StepTimer(enabled=profiled, trace=profiled)
        pipe = dense.pipeline("cpu", timer)
        pipe.apply.apply = lambda raw, sel, tgt: tgt  # the step's own work removed: only the wrapper is left
        if profiled:
            StepCounter(timer).wrap(pipe)
        raw, mem, q = _Raw(), Memory("none"), Query()
        t0 = time.perf_counter()
        for _ in range(n):
            pipe.query_and_apply(None, q, raw, target)
        res.append((time.perf_counter() - t0) / n * 1e6)
        del mem
    return max(0.0, res[1] - res[0])


if __name__ == "__main__":
    sys.exit(main())
