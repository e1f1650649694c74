"""How well does hetmem's device model predict real step times on this host?

For a set of real runs -- quest's own step objects (Prepare, Relevancy, Retrieval, Apply) on a
Llama-3-8B-shaped layer (8 KV heads x 4 query heads each, head dim 128, float32) with synthetic KV
at several context lengths and budgets -- it

  1. counts each step call analytically (hetmem.profiling.counters, from the call's real inputs),
  2. predicts its time with hetmem.hw.cost on the calibrated host CPU device (modelled),
  3. measures it in the same process (best of repeats, as the calibration does; measured),

and prints a table and, on its last line, the mean absolute percentage error ``MAPE=<number>%``.

The host device is filled from the profiler's calibration (copy bandwidth, matmul peak; measured).
Its per-op-class efficiencies and latencies come from a separate fit (``--fit``, or automatically
when none is cached): op micro-benchmarks at *other* sizes than the evaluated runs. The fit is
cached per machine. By default this benchmark re-measures the calibration and the fit in the same
process, so a cache taken while the machine was busy cannot skew it (a stale fit measured under load
gave MAPE=64% on an idle machine); ``--cached-fit`` reuses the cached ones.

    python benchmarks/model_accuracy.py                 # calibrate + fit, then evaluate (same process)
    python benchmarks/model_accuracy.py --cached-fit    # reuse the cached calibration and fit
    python benchmarks/model_accuracy.py --device cuda   # on a GPU (device model: --gpu-device a100|h100)

Appends its record to benchmarks/results/model_accuracy.jsonl (benchmarks/_record.py): the MAPE, the
per-step errors, and every (predicted, measured) pair.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from datetime import datetime, timezone

import numpy as np
import torch

from hetmem.core.types import DecodeTarget, Query
from hetmem.hw import cost
from hetmem.hw.catalog import Catalog
from hetmem.hw.catalog import fill_from_calibration
from hetmem.hw.host import load_op_fit, save_op_fit
from hetmem.methods.quest import PageBudgetTopK, PageMinMaxPrepare, QuestRelevancy
from hetmem.methods.shared import GatherAttention
from hetmem.ops.page_minmax import update_page_minmax
from hetmem.ops.page_score import quest_upper_bound
from hetmem.ops.sparse_attention import gather_selected_kv, grouped_decode_attention
from hetmem.ops.topk import budget_page_indices, topk_indices
from hetmem.ops import counts as C
from hetmem.profiling.counters import counter_for

B, HKV, G, D, P = 1, 8, 4, 128, 16


def _sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


_FLUSH: dict = {}


def _flush(dev: str) -> None:
    """Evict the caches before a timed call (write 64 MB), as a real decode step finds them: between two
    calls of one layer's step every other layer runs, so its memory is not cache resident."""
    buf = _FLUSH.get(dev)
    if buf is None:
        buf = _FLUSH[dev] = torch.empty(16 << 20, dtype=torch.float32, device=dev)
    buf.fill_(1.0)
    _sync(dev)


def best_us(fn, dev: str, repeats: int, warmup: int = 2) -> float:
    """Best (minimum) wall time of ``repeats`` calls, in us. The minimum, as in timeit and the calibration:
    on a machine shared with other jobs, interference only ever adds time."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        _flush(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e6)
    return min(ts)


class Layer:
    """Just what the quest steps read of a PagedKVLayer: buffers and length."""

    def __init__(self, L: int, dev: str, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        cap = -(-(L + 64) // P) * P
        self.buf_k = torch.randn(B, HKV, cap, D, generator=g).to(dev)
        self.buf_v = torch.randn(B, HKV, cap, D, generator=g).to(dev)
        self.capacity = cap
        self.length = L


# ---------------------------------------------------------------------------------------------------
# fit: op micro-benchmarks at sizes the evaluation does not use


def fit_op_classes(dev: str, device, repeats: int, lengths=(3072, 8192, 16384)) -> dict:
    samples: dict[str, list[tuple[C.OpCount, float]]] = {}
    retrieval: list[tuple[list, float]] = []

    def add(oc: C.OpCount, t: float):
        samples.setdefault(oc.cls, []).append((oc, t))

    for L in lengths:
        lay = Layer(L, dev, seed=1)
        n = L // P
        kmin = torch.empty(B, HKV, lay.capacity // P, D, device=dev)
        kmax = torch.empty_like(kmin)
        update_page_minmax(kmin, kmax, lay.buf_k, 0, L, P)
        for span in (1, 256, 1536):  # decode token, prefill chunks
            s0 = L - span
            add(C.page_minmax_update(B, HKV, D, s0, L, P, 4),
                best_us(lambda: update_page_minmax(kmin, kmax, lay.buf_k, s0, L, P), dev, repeats))
        q = torch.randn(B, HKV, G, D, device=dev)
        add(C.quest_upper_bound(B, HKV, G, n - 2, D, 4),
            best_us(lambda: quest_upper_bound(q, kmin[:, :, 1:n - 1], kmax[:, :, 1:n - 1]), dev, repeats))
        sc = torch.randn(B, HKV, n - 2, device=dev)
        for kp in (24, 96):
            add(C.topk(B * HKV, n - 2, kp), best_us(lambda: topk_indices(sc, kp), dev, repeats))
            # the retrieval op as quest calls it (top-k + forced sink/recent ids); fitted as top-k plus copy below
            bud = kp + 2
            steps_ops = C.budget_page_indices(B * HKV, n - 2, n, bud, 1, 1)
            retrieval.append((steps_ops, best_us(lambda: budget_page_indices(sc, 1, n, bud, 1, 1), dev, repeats)))
        for kp in (40, 120):
            ids = torch.sort(torch.randperm(n - 1, device=dev)[:kp - 1]).values.expand(B, HKV, kp - 1).contiguous()
            idx = torch.cat([ids, torch.full((B, HKV, 1), n - 1, device=dev)], -1)
            S = (kp - 1) * P + (L - (n - 1) * P)
            add(C.gather_pages(B, HKV, S, D, kp - 1, 4),
                best_us(lambda: gather_selected_kv(lay.buf_k, lay.buf_v, idx, P, L), dev, repeats))
            kk, vv = gather_selected_kv(lay.buf_k, lay.buf_v, idx, P, L)
            add(C.decode_attention(B, HKV, G, S, D, 4),
                best_us(lambda: grouped_decode_attention(q, kk, vv, D ** -0.5), dev, repeats))
            parts = [torch.arange(1, device=dev).expand(B, HKV, 1), ids, torch.arange(n - 1, n, device=dev).expand(B, HKV, 1)]
            add(C.OpCount("page_ids", "copy", 0.0, 8.0 * B * HKV * kp, 8.0 * B * HKV * (kp + 1)),
                best_us(lambda: torch.cat(parts, dim=-1), dev, repeats))
        del lay, kmin, kmax
    out = {}
    for cls, rows in samples.items():
        out[cls] = _fit_class(rows, device)
    # top-k from the real retrieval op: its time minus the fitted copy part (the op launches more small
    # tensors than the counted ones; their cost belongs to the top-k here)
    from hetmem.hw.catalog import OpClass

    dcopy = OpClass(out["copy"]["bw_eff"], out["copy"]["compute_eff"], out["copy"]["latency_us"])
    saved = device.op_classes.get("copy")
    device.op_classes["copy"] = dcopy
    rows = []
    for ops, t in retrieval:
        t_copy = sum(cost.op_time_us(cost.OpWork(o.cls, o.flops, o.bytes_read, o.bytes_written), device, "float32")
                     for o in ops if o.cls == "copy")
        rows += [(o, max(t - t_copy, 1e-3)) for o in ops if o.cls == "topk"]
    if saved is not None:
        device.op_classes["copy"] = saved
    out["topk"] = _fit_class(rows + samples.get("topk", []), device)
    return {"op_classes": out, "fitted_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fit_lengths": list(lengths),
            "device": dev, "threads": torch.get_num_threads(), "samples": {k: len(v) for k, v in samples.items()}, "source": "measured fit"}


def _fit_class(rows, device) -> dict:
    """t = latency + max(bytes / (bw x bw_eff), flops / (peak x compute_eff)), fitted for least relative error.

    Tries the memory-bound and the compute-bound form (linear in bytes or flops) and keeps the better.
    """
    t = np.array([r[1] for r in rows])
    best = None
    for which in ("bytes", "flops"):
        x = np.array([r[0].bytes if which == "bytes" else r[0].flops for r in rows], dtype=np.float64)
        if not x.any():
            continue
        A = np.stack([np.ones_like(x), x], 1) / t[:, None]
        (lat, slope), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
        lat, slope = max(lat, 0.0), max(slope, 1e-18)
        pred = lat + slope * x
        err = float(np.mean(np.abs(pred - t) / t))
        if best is None or err < best[0]:
            best = (err, which, lat, slope)
    err, which, lat, slope = best
    if which == "bytes":
        bw_eff = min(8.0, 1.0 / (slope * device.mem_bw_gbs * 1e9 / 1e6))  # > 1: the op runs from cache
        ce = 1.0
    else:
        ce = min(8.0, 1.0 / (slope * device.peak("float32") / 1e6))
        bw_eff = 1.0
    return {"bw_eff": round(bw_eff, 6), "compute_eff": round(ce, 6), "latency_us": round(lat, 3), "bound": which,
            "fit_mape": round(100 * err, 2)}


# ---------------------------------------------------------------------------------------------------
# evaluation: the method's real step calls


def eval_runs(dev: str, device, repeats: int, lengths, budgets):
    rows = []
    for L in lengths:
        lay = Layer(L, dev, seed=2)
        for budget in budgets:
            kp = budget // P
            prep = PageMinMaxPrepare(P, dev)
            rel = QuestRelevancy(1, 1, kp, dev)
            ret = PageBudgetTopK(kp, 1, 1, dev)
            app = GatherAttention(dev)
            mem = prep.prepare((lay, 0, L - 1))  # prefill build (not evaluated: one call)
            q = Query(vectors=torch.randn(B, HKV, G, D, device=dev))
            calls = {
                "prepare (decode)": (prep, "prepare", lambda: prep.prepare((lay, L - 1, L), mem)),
                "prepare (1k chunk)": (prep, "prepare", lambda: prep.prepare((lay, L - 1024, L), mem)),
            }
            mem = prep.prepare((lay, L - 1, L), mem)
            scores = rel.score(mem, q)
            sel = ret.select(scores, mem)
            tgt = DecodeTarget(q.vectors, D ** -0.5)
            calls["relevancy"] = (rel, "relevancy", lambda: rel.score(mem, q))
            calls["retrieval"] = (ret, "retrieval", lambda: ret.select(scores, mem))
            calls["apply"] = (app, "apply", lambda: app.apply(lay, sel, tgt))
            args = {"prepare (decode)": ((lay, L - 1, L), mem), "prepare (1k chunk)": ((lay, L - 1024, L), mem),
                    "relevancy": (mem, q), "retrieval": (scores, mem), "apply": (lay, sel, tgt)}
            for label, (step, role, fn) in calls.items():
                counts = counter_for(step)(step, *args[label])[role]
                pred = sum(cost.op_time_us(cost.OpWork(c.cls, c.flops, c.bytes_read, c.bytes_written), device, "float32")
                           for c in counts)
                meas = best_us(fn, dev, repeats)
                rows.append({"length": L, "budget": budget, "step": label, "predicted_us": pred, "measured_us": meas})
        del lay
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-device", default="a100", help="device file for --device cuda")
    ap.add_argument("--cached-fit", action="store_true",
                    help="reuse the cached calibration and op-class fit (default: re-measure both in this process)")
    ap.add_argument("--refit", action="store_true", help="(default) re-measure the calibration and the op-class fit")
    ap.add_argument("--fit-lengths", default="3072,8192,16384",
                    help="context lengths the op classes are fitted at (micro-benchmarks)")
    ap.add_argument("--lengths", default="4096,12288",
                    help="evaluation lengths inside the fitted range")
    ap.add_argument("--outside-lengths", default="65536,131072,262144",
                    help="evaluation lengths outside (above) the fitted range: does the model extrapolate?")
    ap.add_argument("--budgets", default="1024,2048")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: robust on a shared machine; the fit is per thread count)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _record import Record

    record = Record(argv=None if argv is None else [sys.argv[0], *argv]).setting(**vars(a))
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cat = Catalog(calibrate_host=False)
    if a.device == "cpu":
        calibration = None
        if not a.cached_fit:
            from hetmem.hw.calibrate import calibrate

            calibration = calibrate("cpu", "float32", force=True)
        device = fill_from_calibration(cat.device("host-cpu"), calibration)
        if device.note:
            print(f"note: {device.note}", file=sys.stderr)
        fit = load_op_fit() if a.cached_fit else None
        if (fit is None or fit.get("device") != "cpu" or fit.get("threads") != torch.get_num_threads()
                or fit.get("fit_lengths") != [int(x) for x in a.fit_lengths.split(",")]):
            print("fitting op classes on this host (micro-benchmarks at other sizes than the evaluation) ...", file=sys.stderr)
            fit = fit_op_classes("cpu", device, a.repeats, [int(x) for x in a.fit_lengths.split(",")])
            print(f"cached the fit in {save_op_fit(fit)}", file=sys.stderr)
    else:
        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA device", file=sys.stderr)
            return 2
        device = cat.device(a.gpu_device)
        fit = None
    from hetmem.hw.catalog import OpClass

    if fit:
        for cls, oc in fit["op_classes"].items():
            device.op_classes[cls] = OpClass(oc["bw_eff"], oc["compute_eff"], oc["latency_us"])
    print(f"device model: {device.name}: copy bandwidth {device.mem_bw_gbs:.2f} GB/s, fp32 peak "
          f"{device.peak('float32') / 1e9:.1f} GFLOP/s ({device.sources['mem_bw_gbs']})")
    if fit:
        for cls, oc in sorted(fit["op_classes"].items()):
            print(f"  op class {cls:<10} latency {oc['latency_us']:8.2f} us  bw_eff {oc['bw_eff']:.3f}  "
                  f"compute_eff {oc['compute_eff']:.3f}  ({oc['bound']}-bound, fit error {oc['fit_mape']:.1f}%)")
    budgets = [int(x) for x in a.budgets.split(",")]
    ranges = {"inside": [int(x) for x in a.lengths.split(",")], "outside": [int(x) for x in a.outside_lengths.split(",") if x]}
    all_rows = []
    record.setting(device_model=device.name, fit=("cached" if a.cached_fit else "measured in this run"))
    for where, lengths in ranges.items():
        if not lengths:
            continue
        rows = eval_runs(a.device, device, a.repeats, lengths, budgets)
        print(f"\n{where} the fitted range ({a.fit_lengths} tokens): lengths {lengths}")
        print(f"{'length':>7} {'budget':>6} {'step':<20} {'predicted us':>13} {'measured us':>12} {'error':>7}")
        print(f"{'':>7} {'':>6} {'':<20} {'(modelled)':>13} {'(measured)':>12}")
        errs = []
        for r in rows:
            e = abs(r["predicted_us"] - r["measured_us"]) / r["measured_us"]
            errs.append(e)
            r["range"] = where
            print(f"{r['length']:>7} {r['budget']:>6} {r['step']:<20} {r['predicted_us']:>13.1f} {r['measured_us']:>12.1f} {100 * e:>6.1f}%")
        by_step = {}
        for r, e in zip(rows, errs):
            by_step.setdefault(r["step"], []).append(e)
        print("per step: " + ", ".join(f"{s_} {100 * np.mean(v):.1f}%" for s_, v in by_step.items()))
        print(f"MAPE {where} the fitted range = {100 * float(np.mean(errs)):.1f}% ({len(rows)} step calls)")
        prefix = "mape" if where == "inside" else "mape_outside"
        record.figure(prefix, round(100 * float(np.mean(errs)), 2), "%", source="modelled",
                      note=f"mean |modelled - measured| / measured, {where} the fitted range")
        for s_, v in by_step.items():
            record.figure(f"{prefix}.{s_}", round(100 * float(np.mean(v)), 2), "%", source="modelled")
        all_rows += rows
    rows = all_rows
    print(f"{a.device}, {torch.get_num_threads()} threads; target MAPE <= 20% inside the fitted range")
    record.figure("copy_gbps", round(device.mem_bw_gbs, 3), "GB/s", note="host calibration")
    record.figure("fp32_peak_gflops", round(device.peak("float32") / 1e9, 2), "GFLOP/s", note="host calibration")
    record.detail("calls", [{**r, "predicted_us": round(r["predicted_us"], 2), "measured_us": round(r["measured_us"], 2),
                             "predicted_source": "modelled", "measured_source": "measured"} for r in rows])
    record.write(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
