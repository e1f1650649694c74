"""Run ``hetmem run --method memagent --json`` on a passkey hidden in essays and append its record.

The context is ``--ratio`` times longer than the memory bound (``--memory-tokens``), so the passkey can
only reach the answer through the memory the model writes chunk by chunk (MemAgent, arXiv 2507.02259).
The task is ``hetmem.tasks.haystack.passkey_task``; the run goes through the CLI in this process, and the
run's JSON object is kept whole in the record's details. All times are measured.

    .venv/bin/python benchmarks/record_contextual.py [--threads 1] [--seed 0] [--model qwen] [--ratio 4]

Appends its record to benchmarks/results/record_contextual.jsonl (benchmarks/_record.py);
benchmarks/make_results.py renders docs/methods.md's memagent block from it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

import torch
from _record import Record

STEPS = ("prepare", "relevancy", "retrieval", "apply")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--seed", type=int, default=0, help="passkey seed")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--memory-tokens", type=int, default=256)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=4.0, help="context tokens / memory tokens")
    args = ap.parse_args()
    rec = Record().setting(**vars(args))
    torch.set_num_threads(args.threads)

    from hetmem.cli import main as hetmem_main
    from hetmem.llm.models import load_model
    from hetmem.tasks.haystack import passkey_task

    tok = load_model(args.model).tokenizer
    n_ctx = int(args.ratio * args.memory_tokens)
    task = passkey_task(tok, n_ctx, seed=args.seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "context.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(task.context)
        argv = ["run", "--method", "memagent", "--model", args.model, "--context", path, "--question", task.question,
                "--memory-tokens", str(args.memory_tokens), "--chunk-tokens", str(args.chunk_tokens),
                "--max-new-tokens", "16", "--threads", str(args.threads), "--json"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = hetmem_main(argv)
    text = buf.getvalue().strip()
    if code != 0 or not text:
        print(f"hetmem {' '.join(argv)} failed (exit {code})", file=sys.stderr)
        return code or 1
    run = json.loads(text.splitlines()[-1])
    correct = task.passkey in run["answer"]
    in_memory = task.passkey in run["final_memory"]["text"]
    rec.setting(hetmem_argv=argv[:6] + ["CONTEXT"] + argv[7:], passkey=task.passkey, depth=round(task.depth, 3))
    rec.figure("context_tokens", run["tokens"]["context"], "tokens")
    rec.figure("memory_bound_tokens", args.memory_tokens, "tokens")
    rec.figure("context_over_memory", round(run["tokens"]["context"] / args.memory_tokens, 2), "x")
    rec.figure("correct", int(correct), "bool", note=f"passkey {task.passkey} in the answer")
    rec.figure("passkey_in_final_memory", int(in_memory), "bool")
    rec.figure("chunks", run["chunks"], "chunks")
    rec.figure("llm_calls", run["llm_calls"], "calls")
    rec.figure("tokens_read", run["tokens_read"], "tokens")
    rec.figure("tokens_prefilled", run["tokens_prefilled"], "tokens",
               note="the fixed prompt prefix is prefilled once and its KV reused by every chunk")
    rec.figure("tokens_written", run["tokens_written"], "tokens")
    rec.figure("max_memory_tokens", max(h["memory_tokens"] for h in run["memory_after_chunk"]), "tokens")
    rec.figure("total_ms", round(run["total_ms"], 1), "ms")
    for s in STEPS:
        rec.figure(f"{s}.ms", round(run["steps"][s]["ms"], 1), "ms")
        rec.figure(f"{s}.calls", run["steps"][s]["calls"], "calls")
    rec.detail("run", run)
    rec.write(correct)
    print(json.dumps({"answer": run["answer"], "passkey": task.passkey, "correct": correct,
                      "memory": [h["memory"] for h in run["memory_after_chunk"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
