"""Where hetmem keeps things, and the environment variables it reads. Layer 1: imports nothing of hetmem.

    HETMEM_CACHE    converted models, calibration, fitted op classes (default: $XDG_CACHE_HOME/hetmem)
    HETMEM_HW_DIR   the user's own device/link/system files (default: ~/.config/hetmem/hw)
    HETMEM_KERNEL_DIR  compiled kernels (default: $HETMEM_CACHE/ops)
    HETMEM_KERNELS  set to torch to skip the compiled kernels
    HETMEM_DEBUG    set to 1 to see a traceback on an internal error

Torch threads default to the cores this process may use (``default_threads``); every subcommand takes
``--threads N``.
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


def kernel_dir() -> Path:
    """Where compiled kernels are built (``ops.fast``): ``$HETMEM_KERNEL_DIR``, else ``<cache dir>/ops``. Kept
    apart so a process that points ``HETMEM_CACHE`` elsewhere (tests do) need not compile them again."""
    env = os.environ.get("HETMEM_KERNEL_DIR")
    return Path(env).expanduser() if env else cache_dir() / "ops"


def hw_user_dir() -> Path:
    return Path(os.environ.get("HETMEM_HW_DIR") or Path.home() / ".config" / "hetmem" / "hw")


def default_threads() -> int:
    """Torch threads to use by default: the cores this process may run on (its CPU affinity), not the
    machine's core count, so a process pinned to fewer cores does not oversubscribe them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def debug() -> bool:
    return bool(os.environ.get("HETMEM_DEBUG"))
