"""``hetmem eval``: how accurate is each method at each budget and length, on a RULER-like suite generated offline.

    hetmem eval --tasks niah-single,vt --lengths 4k,8k --methods dense,quest,snapkv --budgets 1/8,512
                [--samples N] [--seed S] [--model M] --out DIR [--no-shared-prefill]

Writes DIR/results.jsonl (one line per task, length, sample, method, budget; resumable), DIR/runs.jsonl (the
command, commit, date, CPU and threads of every invocation), DIR/summary.md and the plots.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hetmem.cli.common import model_args
from hetmem.errors import HetmemError
from hetmem.eval.record import run_info
from hetmem.eval.report import write_report
from hetmem.eval.runner import RESULTS, EvalPlan, ResultsFile, Sweep, append_run
from hetmem.eval.spec import parse_budget, parse_length, parse_list, parse_method
from hetmem.files import check_out_dir
from hetmem.llm.models import EMBEDDED, load_model, resolve_model_name
from hetmem.tasks.ruler import TASKS


def plan_from_args(args) -> EvalPlan:
    tasks = list(TASKS) if args.tasks == "all" else parse_list(args.tasks, "--tasks")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise HetmemError(f"--tasks: unknown task '{bad[0]}': use one of {', '.join(TASKS)} (or all)")
    lengths = [(x, parse_length(x)) for x in parse_list(args.lengths, "--lengths")]
    if len({n for _, n in lengths}) != len(lengths):
        raise HetmemError("--lengths names the same length twice")
    methods = [parse_method(x) for x in parse_list(args.methods, "--methods")]
    budgets = [parse_budget(x) for x in parse_list(args.budgets, "--budgets")] if args.budgets else []
    if args.samples < 1:
        raise HetmemError(f"--samples must be at least 1 (got {args.samples})")
    if args.seed < 0:
        raise HetmemError(f"--seed must be at least 0 (got {args.seed})")
    return EvalPlan(tasks, lengths, methods, budgets, args.samples, args.seed, not args.no_shared_prefill)


def cmd_eval(args) -> int:
    plan = plan_from_args(args)
    out = check_out_dir(args.out, "--out", (RESULTS,))
    name = resolve_model_name(args.model)
    existing = ResultsFile(out / RESULTS)
    existing.check_compatible(name if name in EMBEDDED else str(Path(name).expanduser()), args.seed)  # = lm.name
    keys = plan.keys()
    todo = sum(k not in existing.done for k in keys)
    print(f"hetmem eval: {len(keys)} lines ({len(plan.tasks)} tasks x {len(plan.lengths)} lengths x {plan.samples} "
          f"samples x {len(plan.arms())} method/budget arms), {len(keys) - todo} already in {out / RESULTS}",
          file=sys.stderr, flush=True)
    if todo:
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
        existing.check_compatible(lm.name, args.seed)
        sweep = Sweep(plan, lm, out, progress=not args.no_progress)
        info = {"run_id": sweep.run_id, **run_info(sys.argv[2:] if sys.argv[1:2] == ["eval"] else None),
                "model": lm.name, "lines_planned": len(keys), "lines_pending": todo}
        append_run(out, info)
        try:
            sweep.run()
        finally:
            rep = write_report(out)
    else:
        rep = write_report(out)
    print(f"wrote {rep['summary']} ({rep['lines']} lines) and {', '.join(rep['plots']) or 'no plots'} in {out}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="accuracy of methods x budgets x lengths on a RULER-like suite generated offline")
    e.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(TASKS)}, or all")
    e.add_argument("--lengths", required=True, help="context lengths in the model's tokens: 4k,8k,16k or 4096")
    e.add_argument("--methods", required=True,
                   help="comma-separated registered methods, each optionally name:key=value[:key=value] "
                        "(e.g. seer:gates=DIR)")
    e.add_argument("--budgets", default=None,
                   help="comma-separated: a fraction of the prompt (1/8, 0.125) or a token count (512); given to "
                        "every method with a budget parameter (default: each method's own default)")
    e.add_argument("--samples", type=int, default=5, help="samples per task and length (default 5)")
    e.add_argument("--seed", type=int, default=0, help="base seed of the generated samples (default 0)")
    e.add_argument("--out", required=True, help="results directory (resumed if it holds an earlier sweep's results)")
    e.add_argument("--no-shared-prefill", action="store_true",
                   help="prefill every line on its own (to measure what sharing one prefill per context saves)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    model_args(e)
    e.set_defaults(func=cmd_eval)
