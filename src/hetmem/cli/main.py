"""``hetmem``: build the parser from one module per subcommand, run it, and turn errors into one line."""

from __future__ import annotations

import os
import sys

from hetmem.cli import demo, index, methods, plan, profile, run, train
from hetmem.cli.common import Parser
from hetmem.errors import HetmemError

# Subcommands in help order. ``run`` comes first: the others may add options to its parser.
SUBCOMMANDS = (demo, methods, index, profile, plan, train)


def build_parser() -> Parser:
    p = Parser(prog="hetmem", description="Memory processing for long-context LLM inference.")
    sub = p.add_subparsers(dest="cmd", parser_class=Parser)
    run_parser = run.register(sub)
    for mod in SUBCOMMANDS:
        if mod in (index, profile, plan, train):
            mod.register(sub, run_parser)
        else:
            mod.register(sub)
    return p


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
