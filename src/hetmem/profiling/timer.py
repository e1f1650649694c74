"""Wall-clock timing of step calls, split by step and by phase (prefill/decode).

All figures recorded here are *measured* on this machine. On CUDA the device is synchronised
before reading the clock so queued kernels are charged to the step that launched them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from hetmem.core.steps import STEP_NAMES


class StepTimer:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.phase = "prefill"
        self.ms: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.devices: dict[str, str] = {}

    @contextmanager
    def step(self, name: str, device: str = "cpu"):
        if not self.enabled:
            yield
            return
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            key = (name, self.phase)
            self.ms[key] += (time.perf_counter() - t0) * 1e3
            self.calls[key] += 1
            self.devices[name] = device

    def reset(self) -> None:
        self.ms.clear()
        self.calls.clear()

    def summary(self) -> dict[str, dict]:
        """{step: {ms, calls, device, source, phases: {phase: {ms, calls}}}} for the four steps."""
        out = {}
        for name in STEP_NAMES:
            phases = {
                ph: {"ms": round(self.ms[(n, ph)], 3), "calls": self.calls[(n, ph)]}
                for (n, ph) in sorted(self.calls)
                if n == name
            }
            out[name] = {
                "ms": round(sum(p["ms"] for p in phases.values()), 3),
                "calls": sum(p["calls"] for p in phases.values()),
                "device": self.devices.get(name),
                "source": "measured",
                "phases": phases,
            }
        return out
