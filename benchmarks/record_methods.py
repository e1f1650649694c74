"""Every in-model memory method on one passkey task: the answer, decode time and KV bytes, recorded.

Loads the model once, hides a passkey in essay filler (hetmem.tasks.haystack.passkey_task, fixed seed)
and asks for it with each method through ``answer_question`` (what ``hetmem run --json`` prints). Each
method that takes a token budget gets ``--budget``; kvquant runs at 4 and 8 bits. Figures per method
(all measured): whether the passkey is in the answer, the KV cache bytes at the end of the run
(``memory.kv_bytes``), decode ms per token and prefill ms. seer and dsa run with their untrained
estimators (identity gates, the model's own q/k projections) unless ``--seer-gates``/``--dsa-gates``
name trained ones (``hetmem train``).

    .venv/bin/python benchmarks/record_methods.py [--model smollm2] [--tokens 2000] [--budget 256] [--threads 1]

Appends its record to benchmarks/results/record_methods.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import torch
from _record import Record

DEFAULT = "dense,quest,seer,dsa,oracle,streaming,h2o,snapkv,kvquant-4bit,kvquant-8bit"


def build(spec: str, budget: int, gates: dict):
    from hetmem.methods import REGISTRY, get_method

    name, _, variant = spec.partition("-")
    if name not in REGISTRY:
        name, variant = spec, ""
    takes = {f.name for f in fields(REGISTRY[name])}
    kw = {}
    if "budget" in takes:
        kw["budget"] = budget
    if variant.endswith("bit") and "bits" in takes:
        kw["bits"] = int(variant[:-3])
    if gates.get(name) and "gates" in takes:
        kw["gates"] = gates[name]
    return get_method(name, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2000, help="filler tokens around the passkey")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--methods", default=DEFAULT)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seer-gates", default=None)
    ap.add_argument("--dsa-gates", default=None)
    args = ap.parse_args()
    rec = Record().setting(**vars(args))
    torch.set_num_threads(args.threads)

    from hetmem.tasks.haystack import passkey_task
    from hetmem.llm.models import load_model
    from hetmem.llm.run import answer_question

    lm = load_model(args.model)
    task = passkey_task(lm.tokenizer, args.tokens, seed=args.seed)
    gates = {"seer": args.seer_gates, "dsa": args.dsa_gates}
    rec.setting(model_name=lm.name, dtype=str(lm.model.dtype).replace("torch.", ""))
    runs, prompt = [], None
    for spec in args.methods.split(","):
        method = build(spec, args.budget, gates)
        r = answer_question(lm, method, task.context, task.question, args.max_new_tokens, progress=False)
        prompt = r["tokens"]["prompt"]
        right = task.passkey in r["answer"]
        n_dec = max(1, r["tokens"]["generated"] - 1)
        rec.figure(f"{spec}.correct", int(right), "bool")
        rec.figure(f"{spec}.kv_bytes", r["memory"]["kv_bytes"], "bytes", note="KV cache at the end of the run")
        rec.figure(f"{spec}.decode_ms_per_token", round(r["decode_ms"] / n_dec, 2), "ms/token")
        rec.figure(f"{spec}.prefill_ms", round(r["prefill_ms"], 1), "ms")
        runs.append({"label": spec, "method": r["method"], "params": r["params"], "answer": r["answer"],
                     "correct": right, "memory": r["memory"]})
        print(f"{spec:<14} {'right' if right else 'WRONG'}  kv {r['memory']['kv_bytes'] / 1e6:7.1f} MB  "
              f"decode {r['decode_ms'] / n_dec:7.1f} ms/token  answer {r['answer']!r}", flush=True)
    rec.figure("prompt_tokens", prompt, "tokens")
    rec.detail("passkey", task.passkey).detail("depth", round(task.depth, 4)).detail("runs", runs)
    rec.write(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
