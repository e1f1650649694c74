"""The profiler's op counting: ``StepCounter`` wraps a pipeline's steps and, on every call, asks the step
what that call costs (its ``op_counts(*args)``, built from the analytic formulas in ``hetmem.ops.counts``).
A step without ``op_counts`` is listed as uncounted. Nothing here is measured: counts are analytic.
"""

from __future__ import annotations

from typing import Callable

from hetmem.ops.counts import OpCount


def counter_for(step) -> Callable | None:
    own = getattr(step, "op_counts", None)
    if own is not None:
        return lambda _step, *args: own(*args)
    return None


class StepCounter:
    """Accumulates analytic counts per (step, phase), reading the phase from the timer.

    ``totals[(step, phase)] = [flops, bytes_read, bytes_written, calls]``; ``ops[(step, phase)]`` keeps the
    per-op breakdown of the last call (the per-call picture the profile reports). Steps with no counter
    are listed in ``uncounted``.
    """

    def __init__(self, timer, enabled: bool = True):
        self.timer = timer
        self.enabled = enabled
        self.totals: dict[tuple[str, str], list[float]] = {}
        self.ops: dict[tuple[str, str], list[OpCount]] = {}
        self.uncounted: set[str] = set()

    def add(self, counts: dict[str, list[OpCount]], phase: str | None = None) -> None:
        phase = phase or self.timer.phase
        for name, cs in counts.items():
            t = self.totals.setdefault((name, phase), [0.0, 0.0, 0.0, 0])
            for c in cs:
                t[0] += c.flops
                t[1] += c.bytes_read
                t[2] += c.bytes_written
            t[3] += 1
            self.ops[(name, phase)] = cs

    def reset(self) -> None:
        self.totals.clear()
        self.ops.clear()

    def wrap(self, pipeline):
        """Wrap the pipeline's step objects (in place) so every call is counted from its inputs."""
        if not self.enabled:
            return pipeline
        for attr in ("prepare", "relevancy", "retrieval", "apply"):
            step = getattr(pipeline, attr)
            if step is None:
                continue
            fn = counter_for(step)
            if fn is None:
                self.uncounted.add(attr)
                continue
            setattr(pipeline, attr, _Counted(step, fn, self, attr))
        return pipeline


class _Counted:
    """Proxy for a step object: same name/device/attributes; counts each call, then delegates."""

    def __init__(self, inner, fn, counter: StepCounter, kind: str):
        self.__dict__.update(_inner=inner, _fn=fn, _counter=counter)
        method = {"prepare": "prepare", "relevancy": "score", "retrieval": "select", "apply": "apply"}[kind]

        def call(*args):
            counter.add(fn(inner, *args))
            return getattr(inner, method)(*args)

        self.__dict__[method] = call

    def __getattr__(self, item):
        return getattr(self.__dict__["_inner"], item)
