"""One machine-readable record per benchmark run, appended to ``benchmarks/results/<bench>.jsonl``.

Every benchmark builds a :class:`Record` when it starts, names each figure it measures (or models)
with its unit, and calls :meth:`Record.write` at the end. The record says exactly what ran and where:
the command line, the git commit (and whether the tree had uncommitted changes), the UTC date, the
machine (``hetmem.hw.calibrate.machine_info``: CPU model, core count, torch version), the cores
this process may use (``os.sched_getaffinity``), the torch thread count, the torch / transformers /
hetmem versions, and the 1-minute load average at start and end (the machines are shared: a figure
measured under load says so). ``benchmarks/make_results.py`` renders RESULTS.md and the generated
blocks of README.md and docs/*.md from these files; nothing in them is typed by hand.

Set ``HETMEM_RESULTS_DIR`` to write records elsewhere (e.g. for a trial run that should not land in
the repository's results).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "hetmem.bench-record/1"
ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SOURCES = ("measured", "modelled")


def results_dir() -> Path:
    return Path(os.environ.get("HETMEM_RESULTS_DIR") or RESULTS_DIR)


def git_state(root: Path = ROOT) -> dict:
    """Commit and dirty state of the tree the benchmark ran from; the records themselves do not count."""

    def git(*a):
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip() or None
        changed = [ln[3:] for ln in git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "changed": []}
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:20]}


def command_line(argv: list[str]) -> str:
    """``python benchmarks/x.py ARGS`` as one would type it in the repository root."""
    if not argv:
        return ""
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *argv[1:]])


def _load1() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # not installed: say so, do not fail the benchmark
        return None


class Record:
    """The record of one benchmark run. ``bench`` defaults to the running script's name."""

    def __init__(self, bench: str | None = None, argv: list[str] | None = None):
        self.bench = bench or Path(sys.argv[0]).stem
        self.argv = list(sys.argv if argv is None else argv)
        self.started = datetime.now(timezone.utc)
        self._t0 = time.perf_counter()
        self.load_start = _load1()
        self.git = git_state()  # the code that runs is the code at the start
        self.settings: dict = {}
        self.figures: dict[str, dict] = {}
        self.details: dict = {}

    def setting(self, **kw) -> "Record":
        """The run's parameters (argparse values, sizes), as they were used."""
        self.settings.update(kw)
        return self

    def figure(self, name: str, value, unit: str, source: str = "measured", note: str | None = None) -> "Record":
        """One named figure: a number (or None when it could not be measured) with its unit and source."""
        if source not in SOURCES:
            raise ValueError(f"figure {name}: source must be one of {SOURCES}, not {source!r}")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"figure {name}: value must be a number, not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"figure {name}: value {value} is not finite")
        if name in self.figures:
            raise ValueError(f"figure {name} recorded twice")
        self.figures[name] = {"value": value, "unit": unit, "source": source, **({"note": note} if note else {})}
        return self

    def detail(self, key: str, value) -> "Record":
        """Anything else worth keeping (JSON-serialisable): per-query rows, answers, a run's full record."""
        self.details[key] = value
        return self

    def as_dict(self, ok: bool | None = None) -> dict:
        import torch

        from hetmem.hw.calibrate import machine_info

        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count()
        mi = machine_info()
        return {
            "schema": SCHEMA,
            "bench": self.bench,
            "argv": self.argv,
            "command": command_line(self.argv),
            "git": self.git,
            "date": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "wall_s": round(time.perf_counter() - self._t0, 1),
            "machine": {"cpu": mi["cpu"], "cpu_count": mi["cpu_count"], "cores_available": cores,
                        "hostname": mi["hostname"], "platform": mi["platform"], "cuda_device": mi["cuda_device"]},
            "torch_threads": torch.get_num_threads(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": _version("transformers"), "hetmem": _version("hetmem")},
            "load1": {"start": self.load_start, "end": _load1()},
            "ok": ok,
            "settings": self.settings,
            "figures": self.figures,
            "details": self.details,
        }

    def write(self, ok: bool | None = None) -> Path:
        """Append the record as one JSON line to ``<results>/<bench>.jsonl``; returns the file."""
        rec = self.as_dict(ok)
        line = json.dumps(rec, sort_keys=False, allow_nan=False)
        d = results_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.bench}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(f"record appended to {path} (commit {str(rec['git']['commit'])[:10]}"
              f"{', dirty tree' if rec['git']['dirty'] else ''}; load {rec['load1']['start']} -> {rec['load1']['end']})",
              file=sys.stderr)
        return path


def read_records(path: Path) -> list[dict]:
    """All records of one results file, oldest first."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON record ({exc})") from None
            if not isinstance(rec, dict) or rec.get("schema") != SCHEMA:
                raise ValueError(f"{path}:{i}: not a {SCHEMA} record")
            out.append(rec)
    return out
