"""Device peaks, measured: copy bandwidth and matmul throughput at a dtype, cached per machine.

The roofline and the overhead analysis use these *measured* figures, never datasheet numbers. The
cache lives in ``<hetmem cache>/calibration.json``, one entry per calibration key
(``calibration_key``): host, CPU model, the cores this process may run on (``os.sched_getaffinity``),
torch version, torch threads, GPU name, device and dtype. A cached entry is reused only when its whole
key equals the current one, so a change of machine, CPU affinity, torch or thread count re-measures
instead of reusing stale figures; ``force=True`` re-measures. Every entry carries its key and
``measured_at``, and the profile records both.
"""

from __future__ import annotations

import hashlib
import json
import sys
import math
import os
import platform
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hetmem.core.device import DTYPES, sync
from hetmem.errors import HetmemError
from hetmem.files import write_json_atomic
from hetmem.settings import cache_dir

CALIBRATED_DTYPES = ("float32", "bfloat16", "float16")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores_available() -> int:
    """CPU cores this process may run on (its affinity mask), which can be fewer than the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover (not Linux)
        return os.cpu_count() or 1


def _cuda_name(device: str) -> str | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return None


def machine_info(device: str = "cpu") -> dict:
    cuda = _cuda_name(device)
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": cores_available(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda,
    }
    # keyed by the cores this process may use (as calibration_key), not the machine's count: a fit or figure
    # made under another affinity mask is not this one's
    ident = json.dumps({k: info[k] for k in ("hostname", "cpu", "cores_available", "torch", "cuda_device")},
                       sort_keys=True)
    info["key"] = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return info


def cache_path() -> Path:
    return cache_dir() / "calibration.json"


CACHE_SCHEMA = "hetmem.calibration/2"


def calibration_key(device: str = "cpu", dtype: str = "float32") -> dict:
    """What a calibration depends on: the machine (host, CPU model, cores available to this process, GPU),
    the software (torch version, torch threads) and what is measured (device, dtype)."""
    return {"hostname": socket.gethostname(), "cpu": cpu_model(), "cores_available": cores_available(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cuda_device": _cuda_name(device),
            "device": device, "dtype": dtype}


def key_id(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _best_seconds(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(device: str = "cpu", dtype: str = "float32", quick: bool = False) -> dict:
    """Measure copy bandwidth (GB/s, read+write) and square-matmul throughput (GFLOP/s) now."""
    if dtype not in CALIBRATED_DTYPES:
        raise HetmemError(f"cannot calibrate dtype '{dtype}': use one of {', '.join(CALIBRATED_DTYPES)}")
    td = DTYPES[dtype]
    cuda = device.startswith("cuda")
    copy_bytes = (1 << 30 if cuda else 1 << 28) >> (3 if quick else 0)
    n = (8192 if cuda else (1024 if td == torch.float32 else 512)) >> (1 if quick else 0)
    repeats = 3 if quick else 5
    src = torch.empty(copy_bytes // torch.empty(0, dtype=td).element_size(), dtype=td, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = _best_seconds(lambda: dst.copy_(src), device, repeats)
    del src, dst
    a = torch.randn(n, n, device=device).to(td)
    b = torch.randn(n, n, device=device).to(td)
    t_mm = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    copy_gbps = 2 * copy_bytes / t_copy / 1e9
    gflops = 2 * n**3 / t_mm / 1e9
    return {
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "source": "measured",
        "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "copy_gbps": round(copy_gbps, 3),
        "matmul_gflops": round(gflops, 3),
        "ridge_flop_per_byte": round(gflops / copy_gbps, 3),
        "details": {"copy_bytes": copy_bytes, "matmul_n": n, "repeats": repeats, "statistic": "best of repeats"},
    }


# What a measured calibration can plausibly be (anything outside is a damaged or hand-edited cache entry).
PLAUSIBLE = {"copy_gbps": (0.05, 1e5), "matmul_gflops": (0.1, 1e7)}


def entry_problem(entry: dict) -> str | None:
    """Why a cached calibration entry cannot be used, or None."""
    for name, (lo, hi) in PLAUSIBLE.items():
        x = entry.get(name)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return f"{name} is {x!r}, not a number"
        if not lo <= x <= hi:
            return f"{name} {x} is outside the plausible {lo}..{hi}"
    return None


def _note(msg: str) -> None:
    print(f"[hetmem] {msg}", file=sys.stderr, flush=True)


def calibrate(device: str = "cpu", dtype: str = "float32", force: bool = False, quick: bool = False) -> dict:
    """Calibration for this machine at ``device:dtype``: the cached entry whose key equals the current
    ``calibration_key``, else (or with ``force``) measured now and cached. The result carries ``key``,
    ``key_id``, ``measured_at`` and ``cached`` (True when reused from the cache)."""
    key = calibration_key(device, dtype)
    kid = key_id(key)
    path = cache_path()
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:  # binary, truncated or not JSON: re-measured, not fatal
            _note(f"calibration cache {path} is unreadable ({type(exc).__name__}); measuring again")
            data = {}
    if not isinstance(data, dict):
        _note(f"calibration cache {path} is not a JSON object; measuring again")
        data = {}
    entries = data.get("entries") if data.get("schema") == CACHE_SCHEMA else None
    entries = entries if isinstance(entries, dict) else {}
    entry = entries.get(kid)
    if entry is not None and not force and isinstance(entry, dict) and entry.get("key") == key:
        problem = entry_problem(entry)
        if problem is None:
            return dict(entry, cached=True)
        _note(f"calibration cache {path}: the entry for this machine is unusable ({problem}); measuring again")
    entry = dict(measure(device, dtype, quick=quick), key=key, key_id=kid)
    entries[kid] = entry
    data.update(schema=CACHE_SCHEMA, entries=entries)  # other top-level keys (older layouts) are kept
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data)
    return dict(entry, cached=False)
