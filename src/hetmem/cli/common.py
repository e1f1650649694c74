"""What every subcommand shares: the one-line-error parser, the model options, reading a context file,
and building a method from the command line."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from hetmem.errors import HetmemError
from hetmem.llm.models import DEFAULT_MODEL
from hetmem.methods import REGISTRY, get_method


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise HetmemError(message)


def model_args(sp) -> None:
    sp.add_argument("--model", default=DEFAULT_MODEL,
                    help="qwen2.5-coder-0.5b (default), smollm2, a local HF model directory or a .gguf file")
    sp.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    sp.add_argument("--device", default="cpu", help="cpu or cuda")


def read_context(path: str) -> str:
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
    return read_context(args.context)


def method_from_args(args):
    """Build the method from every CLI option whose name matches one of its parameters."""
    cls = REGISTRY.get(args.method)
    if cls is not None and getattr(args, "gates", None) and "gates" not in {f.name for f in fields(cls)}:
        raise HetmemError(f"--gates is for methods with trained gates (seer, dsa), not '{args.method}'")
    return get_method(args.method, **{k: v for k, v in vars(args).items() if k not in ("method", "func", "cmd")})


# Runners for method families other than in-model attention methods: family -> callable(args, method) -> int.
# A family registers itself here (e.g. RAG, whose Apply assembles a prompt from retrieved passages).
RUNNERS: dict = {}
