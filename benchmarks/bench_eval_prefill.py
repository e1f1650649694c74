"""What one shared prefill per context saves in ``hetmem eval``, measured: the same sweep twice in one process
on the same loaded model, once with a fresh prefill per (method, budget) line (``--no-shared-prefill``) and once
sharing one dense prefill per context; wall time of each sweep, and whether every answer is the same.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_eval_prefill.py --model smollm2 --length 2k --samples 2 \
        --methods dense,quest,seer,dsa,oracle --budget 1/8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hetmem.eval.record import run_info
from hetmem.eval.report import read_jsonl
from hetmem.eval.runner import EvalPlan, Sweep
from hetmem.eval.spec import parse_budget, parse_length, parse_list, parse_method
from hetmem.files import check_out_dir, write_atomic
from hetmem.llm.models import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--length", default="2k")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--methods", default="dense,quest,seer,dsa,oracle")
    ap.add_argument("--budget", default="1/8")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = check_out_dir(args.out, "--out", ("bench_eval_prefill.json",))
    lm = load_model(args.model)
    methods = [parse_method(m) for m in parse_list(args.methods, "--methods")]
    res = {"run": run_info(sys.argv[1:], "benchmarks/bench_eval_prefill.py"), "model": lm.name, "task": args.task,
           "length": args.length, "samples": args.samples, "methods": args.methods, "budget": args.budget,
           "time_source": "measured"}
    answers = {}
    for mode in ("fresh", "shared"):  # the machine's load drifts between the arms: compare per-prefill times too
        d = out / mode
        if d.exists():
            for f in d.iterdir():
                f.unlink()
        d.mkdir(exist_ok=True)
        plan = EvalPlan([args.task], [(args.length, parse_length(args.length))], methods,
                        [parse_budget(args.budget)], args.samples, share_prefill=mode == "shared")
        t0 = time.perf_counter()
        Sweep(plan, lm, d, progress=False).run()
        wall = time.perf_counter() - t0
        lines = read_jsonl(d / "results.jsonl")
        answers[mode] = {(x["sample"], x["method"]): x.get("answer") for x in lines}
        res[mode] = {"wall_s": round(wall, 2), "lines": len(lines),
                     "prefills": len({(x["sample"], x["prefill_ms"]) for x in lines if x.get("prefill") == "shared"})
                     + sum(x.get("prefill") == "own" for x in lines),
                     "prefill_s": round(sum({(x["sample"], x["prefill_ms"]): x["prefill_ms"] for x in lines}.values())
                                        / 1e3, 2)}
    same = sum(answers["fresh"][k] == answers["shared"].get(k) for k in answers["fresh"])
    res["same_answers"] = f"{same}/{len(answers['fresh'])}"
    res["saving_s"] = round(res["fresh"]["wall_s"] - res["shared"]["wall_s"], 2)
    res["speedup"] = round(res["fresh"]["wall_s"] / res["shared"]["wall_s"], 2)
    write_atomic(out / "bench_eval_prefill.json", json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
