"""What every subcommand shares: the one-line-error parser, the model options, reading a context file,
and building a method from the command line."""

from __future__ import annotations

import argparse
import sys

from hetmem.errors import HetmemError
from hetmem.files import read_user_text
from hetmem.llm.models import DEFAULT_MODEL
from hetmem.methods import REGISTRY, get_method, param_specs


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise HetmemError(message)


def model_args(sp) -> None:
    sp.add_argument("--model", default=DEFAULT_MODEL,
                    help="qwen2.5-coder-0.5b (default), smollm2, a local HF model directory or a .gguf file")
    sp.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    sp.add_argument("--device", default="cpu", help="cpu or cuda")


def read_context(path: str) -> str:
    text = read_user_text(path, "context file")
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
    return read_context(args.context)


def add_method_options(parser, methods=None, only: set[str] | None = None) -> None:
    """One option per parameter of ``methods`` (default: every registered method), built from the methods'
    own declarations (``hetmem.methods.base.param``). A name several methods share is one option; its
    default is None, so each method keeps its own default."""
    owners: dict[str, list] = {}
    for name in sorted(methods or REGISTRY):
        for spec in param_specs(REGISTRY[name]):
            if only is None or spec.name in only:
                owners.setdefault(spec.name, []).append((name, spec))
    for pname, owned in owners.items():
        spec = owned[0][1]
        names = ", ".join(n for n, _ in owned)
        defaults = sorted({str(s.default) for _, s in owned})
        help_text = f"{names}: {spec.help} (default {' or '.join(defaults)})"
        if spec.type is bool:
            parser.add_argument(spec.flag, dest=pname, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(spec.flag, dest=pname, type=spec.type, default=None, help=help_text)


def method_from_args(args):
    """The method named by ``--method`` with every method option that was given (the others keep the
    method's defaults). An option the method does not take is an error naming the ones it does."""
    given = {spec.name: getattr(args, spec.name) for cls in REGISTRY.values() for spec in param_specs(cls)
             if getattr(args, spec.name, None) is not None}
    method = get_method(args.method, **given)
    for note in method.notes():
        print(f"hetmem: note: {note}", file=sys.stderr)
    return method


# Runners for method families other than in-model attention methods: family -> callable(args, method) -> int.
# A family registers itself here (e.g. RAG, whose Apply assembles a prompt from retrieved passages).
RUNNERS: dict = {}
