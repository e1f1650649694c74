"""kvquant (KIVI-style, Liu et al., 2024, arXiv 2402.02750) next to dense on the passkey task.

For each context length and seed: hide a passkey (``hetmem.tasks.haystack.passkey_task``), ask for it with
dense attention, with kvquant at each bit width and (``--h2o B``) with h2o at budget B (the prompt and generation of ``hetmem run``: chat
template, greedy, prefill in chunks of ``--prefill-chunk`` tokens), and record whether the answer holds the passkey, the
KV bytes held at the end, and the decode time per token. All figures are measured on this machine:

* ``correct``: the passkey's 5 digits appear in the greedy answer (EOS active, at most --max-new-tokens);
* ``kv_bytes``: bytes allocated for K/V at the end of the run (dense: float buffers; kvquant: packed codes,
  fp16 scales/zeros and the exact tail);
* ``decode_ms_per_token``: wall time of the decode loop / model forwards in it (generated tokens - 1);
* ``attn_peak_extra_bytes``: after the run, outside the timed steps, the peak bytes allocated by one decode
  Apply (attention) of one layer on the final cache with that layer's last query, measured with the
  allocator's events (``ops.quant.peak_allocated_bytes``), max over layers;
* ``prefill_copy_bytes`` (kvquant): the same measurement for the transient float copy of one layer's
  context that prefill attention gets (``QuantKVLayer.context_kv``), max over layers;
* ``attn_ms_per_step``: after the run, the same Apply of every layer timed alone (best of 3 calls per
  layer, summed over layers): the attention part of one decode step, less exposed to other load than
  the whole decode loop.

Recorded with ``benchmarks/_record.py`` to ``benchmarks/results/bench_kvquant_passkey.jsonl`` (figures
``<filler tokens>.<method>.<name>``; the per-run rows under ``details.runs``); docs/methods.md's kvquant/h2o
table is rendered from the latest record of each context length by ``benchmarks/make_results.py``. Slow on a
CPU (the 0.5B model prefills 16k tokens in minutes, once per method and seed). Usage:

    python benchmarks/bench_kvquant_passkey.py [--runs 4096:3,8192:3,16384:1] [--bits 4,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import Record  # noqa: E402

from hetmem.tasks.haystack import passkey_task
from hetmem.llm.generate import generate
from hetmem.llm.models import DEFAULT_MODEL, load_model
from hetmem.llm.prompt import build_prompt_ids, eos_ids
from hetmem.methods import get_method
from hetmem.ops.quant import peak_allocated_bytes


class _ApplyRecorder:
    """Wraps a layer's Apply step: keeps a reference to the last decode target (no copy, no timing cost)."""

    def __init__(self, inner):
        self.inner, self.device, self.name = inner, inner.device, inner.name
        self.last = None

    def apply(self, raw, selection, target):
        self.last = target
        return self.inner.apply(raw, selection, target)


class MeasuredMethod:
    """Delegates to a method; after the run (in ``report``, outside every timed step) measures the peak
    extra memory of one attention Apply per layer on the final cache."""

    def __init__(self, inner):
        self.inner = inner
        self.recorders = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def pipeline(self, device, timer, layer_idx: int = 0):
        pipe = self.inner.pipeline(device, timer, layer_idx)
        pipe.apply = _ApplyRecorder(pipe.apply)
        self.recorders.append(pipe.apply)
        return pipe

    def report(self, cache) -> dict:
        out = dict(self.inner.report(cache) or {})
        attn, copy, attn_ms = 0, 0, 0.0
        for layer, rec in zip(cache.layers, self.recorders[-len(cache.layers):]):
            if rec.last is None:
                continue
            _, peak = peak_allocated_bytes(rec.inner.apply, layer, None, rec.last)
            attn = max(attn, peak)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                rec.inner.apply(layer, None, rec.last)
                best = min(best, (time.perf_counter() - t0) * 1e3)
            attn_ms += best
            if hasattr(layer, "context_kv"):
                t = rec.last.q
                k1 = torch.zeros(t.shape[0], t.shape[1], 1, t.shape[-1], dtype=t.dtype, device=t.device)
                _, peak = peak_allocated_bytes(layer.context_kv, k1, k1)
                copy = max(copy, peak)
        out["attn_peak_extra_bytes"] = attn
        out["attn_ms_per_step"] = round(attn_ms, 3)
        if copy:
            out["prefill_copy_bytes"] = copy
        return out


def parse_runs(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        n, _, seeds = part.partition(":")
        out.append((int(n), int(seeds or 1)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--runs", default="4096:3,8192:3,16384:1", help="LENGTH:SEEDS,... (filler tokens, seeds 0..)")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=1024,
                    help="prefill chunk in tokens (hetmem run's 1024); 0: the whole prompt in one chunk, as KIVI prefills")
    ap.add_argument("--skip-dense", action="store_true", help="run only kvquant")
    ap.add_argument("--h2o", type=int, default=0, help="also run h2o with this budget (0: not run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = Record(argv=sys.argv if argv is None else [sys.argv[0], *argv])
    lm = load_model(args.model)
    bits = [int(b) for b in args.bits.split(",")]
    methods = ([] if args.skip_dense else [("dense", lambda: get_method("dense"))]) + [
        (f"kvquant-{b}", lambda b=b: get_method("kvquant", bits=b, group_size=args.group_size, residual=args.residual))
        for b in bits] + ([(f"h2o-{args.h2o}", lambda: get_method("h2o", budget=args.h2o))] if args.h2o else [])
    rows = []
    for n_tokens, seeds in parse_runs(args.runs):
        for seed in range(seeds):
            task = passkey_task(lm.tokenizer, n_tokens, seed=seed)
            row = {"filler_tokens": n_tokens, "seed": seed, "passkey": task.passkey, "depth": round(task.depth, 3)}
            for label, make in methods:
                method = MeasuredMethod(make())
                ids = build_prompt_ids(lm.tokenizer, task.context, task.question)
                res = generate(lm.model, ids, method, args.max_new_tokens, eos_token_ids=eos_ids(lm.tokenizer, lm.model),
                               progress=False, prefill_chunk=args.prefill_chunk or ids.shape[1])
                answer = lm.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip()
                forwards = max(1, len(res.token_ids) - 1)
                mem = res.memory
                row["prompt_tokens"] = ids.shape[1]
                row[label] = {
                    "correct": task.passkey in answer,
                    "answer": answer,
                    "kv_bytes": mem["kv_bytes"],
                    "decode_ms_per_token": round(res.decode_ms / forwards, 2),
                    "decode_forwards": forwards,
                    "prefill_ms": round(res.prefill_ms, 1),
                    "attn_peak_extra_bytes": mem.get("attn_peak_extra_bytes"),
                    "attn_ms_per_step": mem.get("attn_ms_per_step"),
                    **({"prefill_copy_bytes": mem["prefill_copy_bytes"]} if "prefill_copy_bytes" in mem else {}),
                }
                print(f"{n_tokens} seed {seed} {label}: {row[label]}", file=sys.stderr, flush=True)
            rows.append(row)
    rec.setting(model=lm.name, runs=args.runs, bits=bits, group_size=args.group_size, residual=args.residual, h2o=args.h2o,
                max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk, threads=torch.get_num_threads(),
                methods=[label for label, _ in methods])
    units = {"correct": "runs", "of": "runs", "kv_bytes": "bytes", "decode_ms_per_token": "ms",
             "attn_peak_extra_bytes": "bytes", "prefill_copy_bytes": "bytes", "attn_ms_per_step": "ms"}
    for n_tokens, _ in parse_runs(args.runs):
        sel = [r for r in rows if r["filler_tokens"] == n_tokens]
        for label, _ in methods:
            ms = [r[label] for r in sel]
            vals = {"correct": sum(m["correct"] for m in ms), "of": len(ms),
                    "kv_bytes": round(sum(m["kv_bytes"] for m in ms) / len(ms)),
                    "decode_ms_per_token": round(sum(m["decode_ms_per_token"] for m in ms) / len(ms), 2),
                    "attn_peak_extra_bytes": max(m["attn_peak_extra_bytes"] or 0 for m in ms),
                    "attn_ms_per_step": round(sum(m["attn_ms_per_step"] for m in ms) / len(ms), 3)}
            if any("prefill_copy_bytes" in m for m in ms):
                vals["prefill_copy_bytes"] = max(m.get("prefill_copy_bytes", 0) for m in ms)
            for name, value in vals.items():
                rec.figure(f"{n_tokens}.{label}.{name}", value, units[name])
    rec.detail("runs", rows)
    rec.write(ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
