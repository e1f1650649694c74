"""Where hetmem keeps things, and the environment variables it reads. Layer 1: imports nothing of hetmem.

    HETMEM_CACHE    converted models, calibration, fitted op classes (default: $XDG_CACHE_HOME/hetmem)
    HETMEM_HW_DIR   the user's own device/link/system files (default: ~/.config/hetmem/hw)
    HETMEM_DEBUG    set to 1 to see a traceback on an internal error
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    env = os.environ.get("HETMEM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hetmem"


def hw_user_dir() -> Path:
    return Path(os.environ.get("HETMEM_HW_DIR") or Path.home() / ".config" / "hetmem" / "hw")


def debug() -> bool:
    return bool(os.environ.get("HETMEM_DEBUG"))
