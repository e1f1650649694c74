"""The ``hetmem`` command line. Bad input gets one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hetmem.errors import HetmemError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise HetmemError(message)


def _read_context(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise HetmemError(f"context file {path} does not exist")
    if not p.is_file():
        raise HetmemError(f"context path {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HetmemError(f"context file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise HetmemError(f"cannot read context file {path}: {exc.strerror}") from None
    if not text.strip():
        raise HetmemError(f"context file {path} is empty")
    return text


def validated_context(args, method) -> str:
    """Check an in-model run's question and options, and read its context file (before any model loads)."""
    if not args.context:
        raise HetmemError(f"--context FILE is required for method '{method.name}'")
    if not args.question or not args.question.strip():
        raise HetmemError("the question is empty")
    if args.max_new_tokens < 1:
        raise HetmemError("--max-new-tokens must be at least 1")
    return _read_context(args.context)


def _method_from_args(args):
    """Build the method from every CLI option whose name matches one of its parameters."""
    from dataclasses import fields

    from hetmem.methods import REGISTRY, get_method

    cls = REGISTRY.get(args.method)
    if cls is not None and getattr(args, "gates", None) and "gates" not in {f.name for f in fields(cls)}:
        raise HetmemError(f"--gates is for methods with trained gates (seer, dsa), not '{args.method}'")
    return get_method(args.method, **{k: v for k, v in vars(args).items() if k not in ("method", "func", "cmd")})


# Runners for method families other than in-model attention methods: family -> callable(args, method) -> int.
# A family registers itself here (e.g. RAG, whose Apply assembles a prompt from retrieved passages).
RUNNERS: dict = {}


def cmd_run(args) -> int:
    from hetmem.llm.models import load_model
    from hetmem.llm.run import answer_question
    from hetmem.profiling.report import step_table

    method = _method_from_args(args)
    if method.family in RUNNERS:
        return RUNNERS[method.family](args, method)
    context = validated_context(args, method)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    rec = answer_question(lm, method, context, args.question, args.max_new_tokens, recall=getattr(args, "recall", False))
    if args.json:
        print(json.dumps(rec))
    else:
        print(rec["answer"])
        print(step_table({method.name: rec}), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from hetmem.eval.haystack import passkey_task
    from hetmem.llm.models import load_model
    from hetmem.llm.run import answer_question
    from hetmem.methods import get_method
    from hetmem.profiling.report import step_table

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


def cmd_methods(args) -> int:
    from dataclasses import fields

    from hetmem.methods import REGISTRY

    rows = []
    for name, cls in sorted(REGISTRY.items()):
        params = {f.name: f.default for f in fields(cls)}
        rows.append({"name": name, "family": cls.family, "summary": cls.summary, "params": params})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            ps = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
            print(f"{r['name']:<10} {r['family']:<18} {r['summary']}  [{ps}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hetmem.llm.models import DEFAULT_MODEL
    from hetmem.methods import REGISTRY

    p = _Parser(prog="hetmem", description="Memory processing for long-context LLM inference.")
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    def model_args(sp):
        sp.add_argument("--model", default=DEFAULT_MODEL,
                        help="qwen2.5-coder-0.5b (default), smollm2, a local HF model directory or a .gguf file")
        sp.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
        sp.add_argument("--device", default="cpu", help="cpu or cuda")

    r = sub.add_parser("run", help="answer a question about a context with one method")
    r.add_argument("--method", required=True, choices=sorted(REGISTRY))
    r.add_argument("--budget", type=int, default=None, help="token budget for sparse methods (default 1024)")
    r.add_argument("--page-size", type=int, default=None, help="tokens per page (default 16)")
    r.add_argument("--dense-layers", type=int, default=None, help="quest: first layers kept dense (default 2)")
    r.add_argument("--context", help="a UTF-8 text file (attention methods)")
    r.add_argument("--question")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    model_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="hide a passkey in long filler and ask for it with dense and quest")
    d.add_argument("--tokens", type=int, default=3500, help="filler tokens (default 3500)")
    d.add_argument("--page-size", type=int, default=16)
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--json", action="store_true", help="print one JSON object: the task and both runs' records")
    model_args(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("methods", help="list the memory methods and their parameters")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)

    # Other subcommands and method families plug in here: each module's register(sub, run_parser) adds its
    # own subcommands and `hetmem run` options (and may add to RUNNERS).
    import importlib

    for mod_name in EXTENSIONS:
        importlib.import_module(mod_name).register(sub, r)
    return p


# Modules with a `register(subparsers, run_parser)` function (profile, plan, index, train, ...).
EXTENSIONS: list[str] = ["hetmem.rag.cli", "hetmem.profiling.cli", "hetmem.hw.cli", "hetmem.train.cli"]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "func", None):
            raise HetmemError("no command given: use one of run, demo, methods (see 'hetmem --help')")
        if getattr(args, "device", "cpu").startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise HetmemError("--device cuda was asked for, but no CUDA device is available")
        code = args.func(args)
    except HetmemError as exc:
        print(f"hetmem: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("hetmem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line unless debugging
        if os.environ.get("HETMEM_DEBUG"):
            raise
        print(f"hetmem: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set HETMEM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
