"""Wall-clock timing of step calls, split by step and by phase (prefill/decode).

All figures recorded here are *measured* on this machine. On CUDA the device is synchronised
before and after each timed call, so queued kernels are charged to the step that launched them
(not to whichever later step happens to wait for them).

A step may time a part of itself with ``substep("gather")``: inside ``timer.step("apply")`` that
records ``apply.gather`` (its time is also inside ``apply``'s). Outside any timed step it is a no-op,
so step code can call it unconditionally.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from contextvars import ContextVar

import torch

from hetmem.core.steps import STEP_NAMES

# The step being timed right now: (timer, step name, device), or None.
_ACTIVE: ContextVar[tuple | None] = ContextVar("hetmem_timed_step", default=None)
_NULL = nullcontext()


class _Timed:
    __slots__ = ("timer", "name", "device", "cuda", "t0", "token")

    def __init__(self, timer: "StepTimer", name: str, device: str):
        self.timer, self.name, self.device = timer, name, device
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.token = _ACTIVE.set((self.timer, self.name, self.device))
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        _ACTIVE.reset(self.token)
        tm = self.timer
        key = (self.name, tm.phase)
        tm.ms[key] += (t1 - self.t0) * 1e3
        tm.calls[key] += 1
        tm.devices[self.name] = self.device
        if tm.events is not None:
            tm.events.append((self.name, tm.phase, self.t0, t1, self.device))
        return False


class StepTimer:
    """Sums measured wall ms and calls per (step, phase). ``trace=True`` also keeps every call's span."""

    def __init__(self, enabled: bool = True, trace: bool = False):
        self.enabled = enabled
        self.phase = "prefill"
        self.ms: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.devices: dict[str, str] = {}
        # (name, phase, t0, t1, device) per call, perf_counter seconds; None when not tracing.
        self.events: list[tuple] | None = [] if trace else None

    def step(self, name: str, device: str = "cpu"):
        if not self.enabled:
            return _NULL
        return _Timed(self, name, device)

    def add(self, name: str, device: str, ms: float) -> None:
        """Charge ``ms`` measured elsewhere (a share of a call made for several sequences at once) as one call."""
        if not self.enabled:
            return
        key = (name, self.phase)
        self.ms[key] += ms
        self.calls[key] += 1
        self.devices[name] = device

    def reset(self) -> None:
        self.ms.clear()
        self.calls.clear()
        if self.events is not None:
            self.events.clear()

    def phase_ms(self, name: str, phase: str) -> float:
        return self.ms.get((name, phase), 0.0)

    def phase_calls(self, name: str, phase: str) -> int:
        return self.calls.get((name, phase), 0)

    def names(self) -> list[str]:
        """Every step and sub-step name that was timed (``apply.gather`` included)."""
        return sorted({n for (n, _) in self.calls})

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


def substep(part: str, device: str | None = None):
    """Time a part of the step being timed, as ``<step>.<part>`` on the same timer (no-op outside one)."""
    cur = _ACTIVE.get()
    if cur is None:
        return _NULL
    timer, parent, dev = cur
    return timer.step(f"{parent}.{part}", device or dev)
