"""``hetmem run`` for compressed contextual memory (memagent, hmt, lact): registered as the
"contextual-memory" runner of ``hetmem run``.

    hetmem run --method memagent --context FILE --question TEXT [--chunk-tokens N] [--memory-tokens N] [--json]
"""

from __future__ import annotations

import json
import sys

from hetmem.cli.common import RUNNERS, validated_context
from hetmem.llm.models import load_model
from hetmem.runtime.contextual import answer_contextual, check_answering


def register(subparsers, run_parser) -> None:
    RUNNERS["contextual-memory"] = run_contextual


def run_contextual(args, method) -> int:
    check_answering(method, args.model)  # lact: refused before anything loads
    context = validated_context(args, method)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    rec = answer_contextual(lm, method, context, args.question, args.max_new_tokens,
                            step_timing=not args.no_step_timing)
    if args.json:
        print(json.dumps(rec))
        return 0
    print(rec["answer"])
    err = sys.stderr
    print(f"{method.name}: {rec['llm_calls']} LLM calls, {rec['tokens_read']} tokens read "
          f"({rec['tokens_prefilled']} prefilled), {rec['tokens_written']} written", file=err)
    print("Per-step time (measured wall time on this machine)", file=err)
    for name, s in rec["steps"].items():
        phases = ", ".join(f"{ph} {v['ms']:.1f} ms x{v['calls']}" for ph, v in s["phases"].items()) or "-"
        print(f"  {name:<10} {s['ms']:>10.1f} {s['calls']:>6}  {phases}", file=err)
    return 0
