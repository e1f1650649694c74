"""``hetmem profile``: per-step time, analytic op counts and memory-processing overhead, method x length.

    hetmem profile --methods dense,quest --lengths 4k,16k,64k --shape llama3-8b --out DIR   # kernel sweep
    hetmem profile --methods dense,quest --lengths 1k,2k --model smollm2 --out DIR          # real model

Writes DIR/profile.json (docs/profile-schema.md), summary.md, overhead.png, roofline.png, trace.json.
Interrupt with Ctrl-C and rerun the same command to resume: finished method x length pairs are kept.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import hetmem
from hetmem.errors import HetmemError
from hetmem.files import check_out_dir
from hetmem.files import write_json_atomic
from hetmem.cli.common import RUNNERS, add_method_options
from hetmem.core.steps import STEP_NAMES
from hetmem.core.timer import StepTimer
from hetmem.hw.calibrate import calibrate, machine_info
from hetmem.hw.catalog import Catalog
from hetmem.llm.models import load_model, parse_dtype
from hetmem.methods import REGISTRY, get_method, param_specs
from hetmem.profiling import artifacts
from hetmem.profiling.contextual import ContextualRunner, is_contextual
from hetmem.profiling.real import ModelRunner
from hetmem.profiling.records import ProfileStore, skipped_records
from hetmem.profiling.sweep import ShapeSweep, get_shape

# the contextual-memory methods' sizes are options too (each applies to the methods that take it)
CONTEXTUAL_METHODS = ("memagent", "hmt", "lact")
CONTEXTUAL_OPTIONS = {"chunk_tokens", "memory_tokens", "segment_tokens", "memory_entries", "sensory_tokens",
                      "hmt_weights", "rank"}
RESUME_KEYS = ("mode", "model", "shape", "device", "dtype", "batch", "timing", "threads")


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*([km]?)", part)
        if not m:
            raise HetmemError(f"bad length '{part}' in --lengths: use numbers like 2048, 4k or 1m")
        n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2)]
        if n < 1:
            raise HetmemError(f"--lengths must be positive (got '{part}')")
        out.append(n)
    if not out:
        raise HetmemError("--lengths is empty: give a comma-separated list such as 2k,4k,8k")
    return sorted(set(out))


def register(subparsers, run_parser) -> None:
    p = subparsers.add_parser("profile", help="per-step time, op counts and memory-processing overhead, method x length")
    p.add_argument("--methods", required=True, help="comma-separated method names, e.g. dense,quest")
    p.add_argument("--lengths", required=True, help="comma-separated context lengths, e.g. 2k,4k,16k,64k")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="real-model mode: smollm2, qwen2.5-coder-0.5b, or a local HF model directory")
    src.add_argument("--shape", help="kernel-sweep mode: llama3-8b, llama3-70b, qwen2.5-7b, qwen2.5-0.5b, "
                                     "smollm2-135m, or a .json shape file")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16")
    p.add_argument("--out", required=True, help="output directory (resumed if it holds a profile of the same settings)")
    p.add_argument("--decode-tokens", type=int, default=4, help="timed decode steps per method x length (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed decode steps first (sweep mode, default 1)")
    p.add_argument("--budget", type=int, default=None, help="token budget for sparse methods")
    p.add_argument("--page-size", type=int, default=None, help="tokens per page")
    add_method_options(p, methods=CONTEXTUAL_METHODS, only=CONTEXTUAL_OPTIONS)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 gives steadier times on a busy machine)")
    p.add_argument("--recalibrate", action="store_true", help="measure the device peaks again (ignore the cache)")
    p.add_argument("--roofline-devices", default="",
                   help="also draw these catalogue devices' datasheet roofs on roofline.png, e.g. u55c,h100 "
                        "(`hetmem devices` lists them)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_profile)


def _methods(args):
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise HetmemError("--methods is empty: give a comma-separated list such as dense,quest")
    params = {"budget": args.budget, "page_size": args.page_size,
              **{k: getattr(args, k, None) for k in CONTEXTUAL_OPTIONS}}
    params = {k: v for k, v in params.items() if v is not None}
    out = []
    for n in dict.fromkeys(names):  # --budget/--page-size apply to the methods that take them
        takes = {s.name for s in param_specs(REGISTRY[n])} if n in REGISTRY else set()
        out.append(get_method(n, **{k: v for k, v in params.items() if k in takes}))
    return out


def _roofline_devices(text: str, dtype: str) -> list[dict]:
    """Datasheet roofs (memory bandwidth, peak at ``dtype``) of catalogue devices, for roofline.png only."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        return []
    cat = Catalog(calibrate_host=False)
    out = []
    for n in dict.fromkeys(names):
        dev = cat.device(n)
        out.append({"name": dev.name, "kind": dev.kind, "dtype": dtype, "mem_bw_gbs": dev.mem_bw_gbs,
                    "peak_gflops": dev.peak(dtype) / 1e9, "source": f"datasheet ({dev.path})"})
    return out


def _present_steps(method, layers: int) -> list[str]:
    """The steps the method has in any layer (for the records of a skipped run)."""

    have: set[str] = set()
    try:
        for i in range(layers):
            pipe = method.pipeline("cpu", StepTimer(enabled=False), layer_idx=i)
            have |= {s for s in STEP_NAMES if getattr(pipe, s, None) is not None}
    except Exception:
        pass
    return [s for s in STEP_NAMES if s in have] + ["total"]


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower() or "can't allocate" in str(exc).lower())


def cmd_profile(args) -> int:
    import torch
    from tqdm.auto import tqdm


    if args.decode_tokens < 1:
        raise HetmemError("--decode-tokens must be at least 1")
    if args.warmup < 0:
        raise HetmemError("--warmup must be 0 or more")
    if args.threads is not None:
        if args.threads < 1:
            raise HetmemError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    lengths = parse_lengths(args.lengths)
    methods = _methods(args)
    device = args.device

    td = parse_dtype(args.dtype, device)
    dtype_name = str(td).replace("torch.", "")
    out = check_out_dir(args.out, "--out", ("profile.json",))

    roof_devs = _roofline_devices(args.roofline_devices, dtype_name)
    show = not args.no_progress
    if args.shape:
        shape = get_shape(args.shape)
        runner = ShapeSweep(shape, device, td, decode_tokens=args.decode_tokens, warmup=args.warmup)
        mode, model_name, shape_d = "sweep", None, shape.as_dict()
    else:
        lm = load_model(args.model, dtype=dtype_name, device=device)
        runner = ModelRunner(lm, decode_tokens=args.decode_tokens)
        mode, model_name, shape_d = "model", lm.name, runner.shape
    # contextual-memory methods (memagent, hmt, lact) run whole, in one phase 'context' (profiling/contextual.py)
    ctx_runner = ContextualRunner(shape_d, device, td, lm=lm if mode == "model" else None,
                                  answer_tokens=args.decode_tokens)

    print(f"[hetmem] calibrating {device} at {dtype_name} (cached per machine, cores, torch and threads) ...",
          file=sys.stderr, flush=True)
    cal = calibrate(device, dtype_name, force=args.recalibrate)
    print(f"[hetmem] {artifacts.calibration_line(cal)}", file=sys.stderr, flush=True)
    meta = {
        "hetmem_version": getattr(hetmem, "__version__", "0"),
        "mode": mode, "model": model_name, "shape": shape_d, "device": device, "dtype": dtype_name, "batch": 1,
        "threads": torch.get_num_threads(),
        "machine": {k: v for k, v in machine_info(device).items()},
        "calibration": cal,
        "roofline_devices": roof_devs,
        "timing": {"decode_tokens": args.decode_tokens, "warmup": args.warmup if mode == "sweep" else 0},
        "settings": {"methods": {m.name: m.params() for m in methods}, "lengths": lengths,
                     "decode_tokens": args.decode_tokens, "warmup": args.warmup if mode == "sweep" else 0,
                     "layers_timed": 1 if mode == "sweep" else shape_d["layers"]},
    }
    store = ProfileStore(out, meta, RESUME_KEYS)
    trace = _load_trace(out / "trace.json")
    pairs = [(L, m) for L in lengths for m in methods]
    todo = [(L, m) for L, m in pairs if not store.done(m.name, L)]
    if len(todo) < len(pairs):
        print(f"[hetmem] resuming {out}: {len(pairs) - len(todo)} of {len(pairs)} method x length runs already done",
              file=sys.stderr, flush=True)

    per_run = (args.warmup + args.decode_tokens) if mode == "sweep" else 1
    bar = tqdm(total=len(todo) * per_run, desc="profile", unit="tok" if mode == "sweep" else "run",
               file=sys.stderr, disable=not show or not todo)
    interrupted = False
    try:
        for L, m in todo:
            bar.set_postfix_str(f"{m.name} @ {L}")
            reason = None
            run_with = ctx_runner if is_contextual(m) else runner
            if is_contextual(m):
                reason = ctx_runner.check(m, L)
            elif m.family in RUNNERS:
                reason = f"method family '{m.family}' is not an in-model attention method (profile it with its own runner)"
            reason = reason or (None if is_contextual(m) else runner.check(L))
            # a length names the context: shortened (and said so) when the decode steps would overrun the window
            ctx, note = run_with.fit(L) if reason is None else (None, None)
            base = {"method": m.name, "params": m.params(), "model": model_name,
                    "shape": shape_d["name"] if mode == "sweep" else None, "length": L, "context_tokens": ctx,
                    "device": device, "dtype": dtype_name}
            phases, recs, events = None, None, None
            if reason is None:
                if note:
                    bar.write(f"[hetmem] {m.name} @ {L}: {note}", file=sys.stderr)
                try:
                    if is_contextual(m):
                        phases, recs, events = ctx_runner.run(m, ctx, base)
                        bar.update(per_run)
                    elif mode == "sweep":
                        phases, recs, events = runner.run(m, ctx, base, progress=lambda: bar.update(1))
                    else:
                        phases, recs, events = runner.run(m, ctx, base, progress=show)
                        bar.update(1)
                except Exception as exc:  # a step that cannot run here is recorded, the sweep goes on
                    msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                    if _is_oom(exc):
                        reason = f"out of memory: {msg}"
                    elif isinstance(exc, HetmemError):
                        reason = msg
                    elif os.environ.get("HETMEM_DEBUG"):
                        raise
                    else:  # e.g. a method that needs a real model's weights in sweep mode
                        reason = f"cannot run here: {type(exc).__name__}: {msg}"
                    if hasattr(runner, "release"):
                        runner.release()
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
            if reason is not None:
                base_l = dict(base, layers=shape_d["layers"])
                store.add({"method": m.name, "params": m.params(), "length": L, "context_tokens": None, "note": None,
                           "status": "skipped", "reason": reason, "phases": {}},
                          skipped_records(base_l, _present_steps(m, shape_d["layers"]), reason,
                                          phase="context" if is_contextual(m) else "decode"))
                bar.write(f"[hetmem] {m.name} @ {L}: skipped ({reason})", file=sys.stderr)
                if mode == "sweep":
                    bar.update(per_run)
                continue
            store.add({"method": m.name, "params": m.params(), "length": L, "context_tokens": ctx, "note": note,
                       "status": "ok", "reason": None, "phases": phases}, recs)
            if events:
                pid = 1 + max([e.get("pid", 0) for e in trace] + [0])
                trace += artifacts.trace_events(f"{m.name} @ {ctx} tokens", pid, events, events[0][2] if events else 0.0)
                _save_trace(out / "trace.json", trace)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if hasattr(runner, "release"):
        runner.release()
    if not store.doc["runs"]:
        if interrupted:
            print("hetmem: interrupted before any run finished", file=sys.stderr)
            return 130
        raise HetmemError("nothing was profiled")
    store.save()
    paths = artifacts.write_all(store.doc, out, trace)
    _print_table(store.doc)
    print(f"wrote {out / 'profile.json'}, " + ", ".join(str(p) for p in paths))
    if interrupted:
        print("hetmem: interrupted; rerun the same command to resume (finished runs are kept)", file=sys.stderr)
        return 130
    return 0


def _load_trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return list(json.loads(path.read_text()).get("traceEvents", []))
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def _save_trace(path: Path, trace: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"traceEvents": trace, "displayTimeUnit": "ms"}, indent=None)


def _print_table(doc: dict) -> None:
    src = "measured" if doc["mode"] == "model" else f"measured, one layer of each kind timed, scaled to {doc['shape']['layers']}"
    print(f"memory-processing overhead per decode token ({src}; {doc['device']} {doc['dtype']})")
    print(f"{'method':<10} {'length':>8} {'ms/token':>10} {'overhead':>9} {'incl.apply':>10}  status")
    for r in sorted(doc["runs"], key=lambda r: (r["length"], r["method"])):
        if r["status"] != "ok":
            print(f"{r['method']:<10} {r['length']:>8} {'':>10} {'':>9} {'':>10}  skipped: {r['reason']}")
            continue
        d = r["phases"].get("decode") or r["phases"].get("context", {})
        per_tok = "decode" in r["phases"]
        print(f"{r['method']:<10} {r['length']:>8} {(d.get('ms_per_token') if per_tok else d.get('total_ms')) or 0:>10.1f} "
              f"{100 * (d.get('overhead') or 0):>8.1f}% {100 * (d.get('overhead_incl_apply') or 0):>9.1f}%  ok"
              + (f" (context {r['context_tokens']}: shortened to fit the window)" if r.get("note") else "")
              + ("" if per_tok else " (whole run, ms; phase 'context')"))
