"""``hetmem demo``: hide a passkey in essays and ask for it with dense attention and with Quest."""

from __future__ import annotations

import json
import sys

from hetmem.cli.common import model_args
from hetmem.errors import HetmemError
from hetmem.llm.models import load_model
from hetmem.llm.run import answer_question
from hetmem.methods import get_method
from hetmem.profiling.report import step_table
from hetmem.tasks.haystack import passkey_task


def cmd_demo(args) -> int:
    if args.tokens < 64:
        raise HetmemError(f"--tokens must be at least 64 (got {args.tokens})")
    if args.page_size < 1:
        raise HetmemError(f"--page-size must be at least 1 (got {args.page_size})")
    if args.max_new_tokens < 1:
        raise HetmemError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    task = passkey_task(lm.tokenizer, args.tokens, seed=args.seed)
    budget = max(args.page_size, (args.tokens // 4) // args.page_size * args.page_size)
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout carries only the JSON object
    print(f"Hid passkey {task.passkey} at depth {task.depth:.0%} of {args.tokens} tokens of essays.", file=out)
    runs, ok = {}, True
    for label, method in (
        ("dense", get_method("dense")),
        (f"quest budget={budget}", get_method("quest", budget=budget, page_size=args.page_size)),
    ):
        print(f"asking with {label} ...", file=sys.stderr, flush=True)
        rec = answer_question(lm, method, task.context, task.question, args.max_new_tokens)
        found = task.passkey in rec["answer"]
        ok &= found
        runs[label] = rec
        print(f"{label:<22} answer: {rec['answer']!r:<40} {'correct' if found else 'WRONG'}", file=out, flush=True)
    if args.json:  # one object: the task, and each run's `hetmem run --json` record plus whether it was right
        task_d = {"passkey": task.passkey, "depth": round(task.depth, 4), "tokens": args.tokens, "seed": args.seed,
                  "question": task.question}
        print(json.dumps({"task": task_d, "model": lm.name, "budget": budget, "page_size": args.page_size,
                          "correct": all(task.passkey in r["answer"] for r in runs.values()),
                          "runs": {lab: {**r, "correct": task.passkey in r["answer"]} for lab, r in runs.items()}}))
        return 0 if ok else 1
    print()
    print(f"prompt: {next(iter(runs.values()))['tokens']['prompt']} tokens, model {lm.name} ({rec['dtype']}, {rec['device']})")
    print(step_table(runs))
    return 0 if ok else 1


def register(sub) -> None:
    d = sub.add_parser("demo", help="hide a passkey in long filler and ask for it with dense and quest")
    d.add_argument("--tokens", type=int, default=3500, help="filler tokens (default 3500)")
    d.add_argument("--page-size", type=int, default=16)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--json", action="store_true", help="print one JSON object: the task and both runs' records")
    model_args(d)
    d.set_defaults(func=cmd_demo)
