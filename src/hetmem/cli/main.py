"""``hetmem``: build the parser from one module per subcommand, run it, and turn errors into one line."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading

import torch

from hetmem.cli import contextual, demo, index, methods, plan, profile, run, serve, train
from hetmem.cli import eval as eval_cmd
from hetmem.cli.common import Parser
from hetmem.errors import HetmemError
from hetmem.settings import default_threads

# Subcommands in help order. ``run`` comes first: the others may add options to its parser.
SUBCOMMANDS = (demo, methods, index, contextual, profile, plan, train, eval_cmd, serve)


def build_parser() -> Parser:
    p = Parser(prog="hetmem", description="Memory processing for long-context LLM inference.")
    sub = p.add_subparsers(dest="cmd", parser_class=Parser)
    run_parser = run.register(sub)
    for mod in SUBCOMMANDS:
        if mod in (index, contextual, profile, plan, train):
            mod.register(sub, run_parser)
        else:
            mod.register(sub)
    for sp in sub.choices.values():  # every subcommand takes --threads
        if "--threads" not in sp._option_string_actions:  # noqa: SLF001 -- argparse has no public lookup
            sp.add_argument("--threads", type=int, default=None,
                            help=f"torch CPU threads (default: the cores this process may use, here {default_threads()})")
    return p


def set_threads(args) -> None:
    """Apply --threads (or the default) before any torch work; the value is what run records report."""
    if args.threads is None:
        args.threads = default_threads()
    if args.threads < 1:
        raise HetmemError(f"--threads must be at least 1 (got {args.threads})")
    torch.set_num_threads(args.threads)


def _exit_interrupted(signum, frame) -> None:
    """SIGINT after the command has finished (while Python shuts down): exit 130 at once, as any interrupted
    command does. Python's default would raise KeyboardInterrupt outside ``main`` and, uncaught, the process
    would die by the signal (exit status -2 to a parent, not 130)."""
    try:
        sys.stderr.write("\nhetmem: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code. ``argv=None`` (the ``hetmem`` program, ``python -m hetmem.cli``)
    reads ``sys.argv`` and, once the command is done, makes a late Ctrl-C exit 130 too; a caller passing
    ``argv`` (tests, scripts) keeps its own SIGINT handling."""
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # arrived as _main returned, after its own handler
        print("\nhetmem: interrupted", file=sys.stderr)
        code = 130
    if argv is None and threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGINT, _exit_interrupted)
    return code


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            names = ", ".join(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 -- argparse has no public lookup
            raise HetmemError(f"no command given: use one of {names} (see 'hetmem --help')")
        set_threads(args)
        device = getattr(args, "device", "cpu")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
            raise HetmemError(f"unknown --device '{device}': use cpu, cuda or cuda:N")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise HetmemError("--device cuda was asked for, but no CUDA device is available")
        code = args.func(args)
        sys.stdout.flush()
    except HetmemError as exc:
        print(f"hetmem: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nhetmem: interrupted", file=sys.stderr)  # on its own line, not after a progress bar
        return 130
    except Exception as exc:  # an internal error: one line unless debugging
        if os.environ.get("HETMEM_DEBUG"):
            raise
        print(f"hetmem: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(set HETMEM_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
