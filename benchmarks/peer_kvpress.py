"""hetmem's methods and NVIDIA kvpress's presses side by side, on the same generated samples and the same model,
measured in the same run: accuracy, KV bytes held, decode ms/token.

kvpress (github.com/NVIDIA/kvpress, PyPI ``kvpress``) 0.5.5 requires ``transformers<5.3``; hetmem pins
transformers 5.23, so kvpress cannot be installed next to hetmem. It runs in its own virtual environment
(``requirements-peer.txt``), as a worker process this script starts:

    python -m venv .venv-peer && .venv-peer/bin/pip install -r requirements-peer.txt
    PYTHONPATH=src .venv/bin/python benchmarks/peer_kvpress.py --model qwen --length 2k --samples 3 --out DIR

What runs:
- the hetmem side goes through ``hetmem.eval`` (the same sweep as ``hetmem eval``): the registry methods given
  with ``--methods`` at ``--budget``;
- the kvpress side, in the worker, gets the very same prompt token ids (written by this script) and the same
  weights (the converted model directory), and runs with transformers' own DynamicCache: no press (its dense
  baseline), then SnapKV, StreamingLLM, Knorm and ExpectedAttention (prefill presses, compression ratio =
  1 - budget / prompt), and DecodingPress(Knorm) (its decoding-time press: re-compresses to the budget at every
  decode step). A prefill press compresses the whole prompt but its last token (question included, as
  hetmem's snapkv does: question-aware), then decoding starts from that last token, as kvpress's pipeline does
  with its question ids. Answers are scored by the same scorer (``hetmem.eval.scoring``).

If the worker cannot run (no .venv-peer, kvpress missing, an import or runtime error), the table says exactly
why in kvpress's rows; the comparison is never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESSES = ("none", "snapkv", "streaming_llm", "knorm", "expected_attention", "decoding_knorm")


# ----------------------------------------------------------------------------------- the kvpress worker

def worker(samples_path: str, model_dir: str, out_path: str, threads: int) -> int:
    """Runs inside .venv-peer: kvpress's presses on the given prompt ids. Writes one JSON line per (sample, press)."""
    import contextlib
    import importlib.metadata as md

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvpress import (DecodingPress, ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress)

    sys.path.insert(0, str(ROOT / "src"))
    from hetmem.eval.scoring import score_sample  # pure Python: no hetmem dependency on transformers here

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    env = {"kvpress": md.version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__,
           "kvpress_requires": [r for r in (md.requires("kvpress") or []) if r.startswith("transformers")]}
    samples = [json.loads(x) for x in Path(samples_path).read_text().splitlines() if x.strip()]
    with open(out_path, "w") as fh:
        for s in samples:
            ids = torch.tensor([s["prompt_ids"]])
            n = ids.shape[1]
            keep = s["budget_tokens"]
            ratio = max(0.0, 1.0 - keep / (n - 1))
            presses = {
                "none": None,
                "snapkv": SnapKVPress(compression_ratio=ratio),
                "streaming_llm": StreamingLLMPress(compression_ratio=ratio),
                "knorm": KnormPress(compression_ratio=ratio),
                "expected_attention": ExpectedAttentionPress(compression_ratio=ratio),
                "decoding_knorm": DecodingPress(base_press=KnormPress(), compression_interval=1, target_size=keep),
            }
            for name, press in presses.items():
                decoding = isinstance(press, DecodingPress)
                cache = DynamicCache()
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    with press(model) if press is not None and not decoding else contextlib.nullcontext():
                        model.model(input_ids=ids[:, :-1], past_key_values=cache)
                    prefill_ms = (time.perf_counter() - t0) * 1e3
                    stored_after_prefill = cache.get_seq_length()
                    out_ids = []
                    t1 = time.perf_counter()
                    with press(model) if decoding else contextlib.nullcontext():
                        pos = n - 1
                        nxt = ids[:, -1:]
                        for i in range(s["max_new_tokens"]):
                            logits = model(input_ids=nxt, past_key_values=cache,
                                           position_ids=torch.tensor([[pos + i]])).logits
                            t = int(logits[0, -1].argmax())
                            out_ids.append(t)
                            if t in eos:
                                break
                            nxt = torch.tensor([[t]])
                    decode_ms = (time.perf_counter() - t1) * 1e3
                kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
                answer = tok.decode(out_ids, skip_special_tokens=True).strip()
                fh.write(json.dumps({
                    "side": "kvpress", "method": name, "sample": s["sample"], "task": s["task"], "answer": answer,
                    "score": score_sample(s, answer), "prompt_tokens": n, "budget_tokens": keep,
                    "compression_ratio": None if press is None or decoding else round(ratio, 6),
                    "prefill_ms": round(prefill_ms, 3), "decode_ms": round(decode_ms, 3),
                    "generated_tokens": len(out_ids),
                    # the first answer token needs a forward pass here (the prompt's last token), so every token counts
                    "decode_ms_per_token": round(decode_ms / max(1, len(out_ids)), 3),
                    "kv_bytes": kv, "tokens_stored_after_prefill": stored_after_prefill,
                    "kv_bytes_source": "measured: bytes of K/V tensors in the DynamicCache at the end of decoding",
                    "env": env,
                }) + "\n")
                fh.flush()
                print(f"[kvpress] sample {s['sample']} {name:<20} score {score_sample(s, answer):.2f} "
                      f"answer {answer!r}", file=sys.stderr, flush=True)
    return 0


# ------------------------------------------------------------------------------- the hetmem-side driver

def _fmt_bytes(b):
    if b is None:
        return "–"
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=3, metavar=("SAMPLES", "MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--task", default="niah-single")
    ap.add_argument("--length", default="2k")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--budget", default="1/8")
    ap.add_argument("--methods", default="dense,snapkv,streaming,h2o,quest",
                    help="hetmem registry methods (budget applied where they take one)")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)

    import torch

    from hetmem.eval.record import run_info
    from hetmem.eval.runner import EvalPlan, Sweep, append_run
    from hetmem.eval.spec import parse_budget, parse_length, parse_list, parse_method
    from hetmem.files import check_out_dir, write_atomic
    from hetmem.llm.models import EMBEDDED, ensure_embedded, load_model, resolve_model_name
    from hetmem.llm.prompt import build_prompt_ids
    from hetmem.tasks.ruler import make_sample

    torch.set_num_threads(args.threads)
    out = check_out_dir(args.out, "--out", ("peer_kvpress.md", "results.jsonl"))
    n_tokens = parse_length(args.length)
    budget = parse_budget(args.budget)
    methods = [parse_method(m) for m in parse_list(args.methods, "--methods")]
    lm = load_model(args.model)
    name = resolve_model_name(args.model)
    model_dir = str(ensure_embedded(name)) if name in EMBEDDED else str(Path(args.model).expanduser())
    info = {"run_id": "peer-" + time.strftime("%Y%m%dT%H%M%S"), **run_info(sys.argv[1:], "benchmarks/peer_kvpress.py"),
            "model": lm.name}
    append_run(out, info)

    # 1. the samples, with their exact prompt ids, for both sides
    samples = []
    for i in range(args.samples):
        s = make_sample(args.task, lm.tokenizer, n_tokens, i, args.samples)
        ids = build_prompt_ids(lm.tokenizer, s.context, s.question)[0].tolist()
        samples.append({**s.to_json(), "sample": i, "prompt_ids": ids, "budget_tokens": budget.resolve(len(ids))})
    write_atomic(out / "samples.jsonl", "".join(json.dumps(x) + "\n" for x in samples))

    # 2. hetmem's methods, through the eval sweep (same generator, same seed: the same samples)
    plan = EvalPlan([args.task], [(args.length, n_tokens)], methods, [budget], args.samples)
    Sweep(plan, lm, out, run_id=info["run_id"], progress=False).run()
    from hetmem.eval.report import read_jsonl

    hetmem_rows = [x for x in read_jsonl(out / "results.jsonl") if x.get("status") == "ok"]
    for x in hetmem_rows:  # the same prompt on both sides, or the comparison is void
        assert x["prompt_tokens"] == len(samples[x["sample"]]["prompt_ids"]), "prompt mismatch"

    # 3. kvpress's presses, in their own environment
    peer_rows, why_not = [], None
    peer_out = out / "kvpress.jsonl"
    py = Path(args.peer_python)
    if not py.exists():
        why_not = (f"no peer environment at {py}: create it with 'python -m venv .venv-peer && "
                   ".venv-peer/bin/pip install -r requirements-peer.txt' (kvpress 0.5.5 needs transformers<5.3; "
                   "hetmem pins transformers 5.23, so they cannot share one environment)")
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
        proc = subprocess.run([str(py), __file__, "--worker", str(out / "samples.jsonl"), model_dir, str(peer_out),
                               "--out", str(out), "--threads", str(args.threads)], env=env, stderr=subprocess.PIPE,
                              text=True)
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            last = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            why_not = f"the kvpress worker failed (exit {proc.returncode}): {last[-1] if last else 'no message'}"
        if peer_out.exists():
            peer_rows = [json.loads(x) for x in peer_out.read_text().splitlines() if x.strip()]

    # 4. one table
    def agg(rows):
        n = len(rows)
        return (n, sum(r["score"] for r in rows) / n, sum(r["kv_bytes"] for r in rows) / n,
                sum(r["decode_ms_per_token"] for r in rows) / n, sum(r["prefill_ms"] for r in rows) / n)

    lines = [f"# hetmem vs kvpress: {args.task}, {args.length} tokens, budget {args.budget}, {lm.name}", "",
             f"Run {info['run_id']} on {info['cpu']} ({info['threads']} threads), commit "
             f"{(info['commit'] or '?')[:10]}{'+dirty' if info.get('dirty') else ''}, {info['date']}. "
             "All figures measured in this run; n = samples (the same prompt ids on both sides).", "",
             "| side | method / press | n | accuracy | KV bytes held | decode ms/token | prefill ms |",
             "|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(x["method"] for x in hetmem_rows):
        n, acc, kv, ms, pf = agg([x for x in hetmem_rows if x["method"] == m])
        lines.append(f"| hetmem | {m} | {n} | {acc:.2f} | {_fmt_bytes(kv)} | {ms:.1f} | {pf:.0f} |")
    for m in PRESSES:
        rows = [x for x in peer_rows if x["method"] == m]
        if rows:
            n, acc, kv, ms, pf = agg(rows)
            lines.append(f"| kvpress | {m} | {n} | {acc:.2f} | {_fmt_bytes(kv)} | {ms:.1f} | {pf:.0f} |")
        elif why_not:
            lines.append(f"| kvpress | {m} | 0 | not run | – | – | – |")
    lines.append("")
    if peer_rows:
        e = peer_rows[0]["env"]
        lines.append(f"kvpress {e['kvpress']} ran in .venv-peer with transformers {e['transformers']} (its requirement: "
                     f"{', '.join(e['kvpress_requires'])}), torch {e['torch']}; hetmem ran with its pinned "
                     f"transformers {__import__('transformers').__version__}.")
    dense = {x["sample"]: x["answer"] for x in hetmem_rows if x["method"] == "dense"}
    base = {x["sample"]: x["answer"] for x in peer_rows if x["method"] == "none"}
    both = sorted(set(dense) & set(base))
    if both:
        same = sum(dense[i] == base[i] for i in both)
        lines.append(f"Baselines: hetmem dense and kvpress without a press gave the same answer on {same} of "
                     f"{len(both)} samples (same weights, same prompt ids, two transformers versions).")
    if why_not:
        lines.append(f"kvpress not run: {why_not}")
    lines += ["", "KV bytes: hetmem counts the bytes allocated for its paged K/V buffers (whole pages, room for the "
              "answer reserved); kvpress the K/V tensors its DynamicCache holds. Decode ms/token: hetmem's first answer "
              "token comes from the prefill's logits; kvpress's from a forward pass of the prompt's last token."]
    text = "\n".join(lines) + "\n"
    write_atomic(out / "peer_kvpress.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
