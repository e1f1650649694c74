"""Where a run came from: the command, the code's commit, the date, the CPU and its threads."""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from hetmem.hw.calibrate import cpu_model


def _git(*args: str) -> str | None:
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_info(argv: list[str] | None = None, prog: str = "hetmem eval") -> dict:
    import transformers

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "command": prog + (" " + shlex.join(argv) if argv else ""),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
