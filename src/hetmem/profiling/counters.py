"""The profiler's op counting: ``StepCounter`` wraps a pipeline's steps and, on every call, asks the step
what that call costs (its ``op_counts(*args)``, built from the analytic formulas in ``hetmem.ops.counts``).
A step without ``op_counts`` is listed as uncounted. Nothing here is measured: counts are analytic.
"""

from __future__ import annotations

from typing import Callable, Iterable

from hetmem.ops.counts import OpCount


def counter_for(step) -> Callable | None:
    own = getattr(step, "op_counts", None)
    if own is not None:
        return lambda _step, *args: own(*args)
    return None


class OpTally:
    """Per-op sums over many calls (every layer, every token): ``by_op[op] = [class, flops, bytes_read,
    bytes_written, calls]``, where ``calls`` counts the op's invocations."""

    def __init__(self, counts: Iterable[OpCount] = (), times: float = 1):
        self.by_op: dict[str, list] = {}
        self.add(counts, times)

    def add(self, counts: Iterable[OpCount], times: float = 1) -> "OpTally":
        """Add ``counts`` (the ops of one call) ``times`` times."""
        for c in counts:
            t = self.by_op.setdefault(c.op, [c.cls, 0.0, 0.0, 0.0, 0])
            t[1] += c.flops * times
            t[2] += c.bytes_read * times
            t[3] += c.bytes_written * times
            t[4] += times
        return self

    def merge(self, other: "OpTally", k: float = 1) -> "OpTally":
        """Add ``other``'s sums ``k`` times (sweep mode: one timed layer stands for ``k`` layers)."""
        for op, (cls, f, br, bw, n) in other.by_op.items():
            t = self.by_op.setdefault(op, [cls, 0.0, 0.0, 0.0, 0])
            t[1] += f * k
            t[2] += br * k
            t[3] += bw * k
            t[4] += n * k
        return self

    def total(self) -> tuple[float, float, float]:
        v = self.by_op.values()
        return sum(t[1] for t in v), sum(t[2] for t in v), sum(t[3] for t in v)

    def as_list(self, step_calls: float, scale: float = 1.0) -> list[dict]:
        """The profile's ``ops`` list: per op, its cost per *step call* averaged over every call of the step
        in the phase (all layers, all tokens: the entries sum to the record's ``per_call``), its invocation
        count and its sums over the phase (they sum to the record's totals). ``scale`` multiplies the sums."""
        per = max(step_calls, 1)
        out = []
        for op, (cls, f, br, bw, n) in self.by_op.items():
            f, br, bw = f * scale, br * scale, bw * scale
            out.append({"op": op, "class": cls, "flops": f / per, "bytes_read": br / per, "bytes_written": bw / per,
                        "calls": int(round(n * scale)),
                        "total": {"flops": f, "bytes_read": br, "bytes_written": bw}})
        return out


class StepCounter:
    """Accumulates analytic counts per (step, phase), reading the phase from the timer.

    ``totals[(step, phase)] = [flops, bytes_read, bytes_written, calls]``; ``ops[(step, phase)]`` is an
    ``OpTally``: the per-op sums over every call (every layer, every token). Steps with no counter are
    listed in ``uncounted``.
    """

    def __init__(self, timer, enabled: bool = True):
        self.timer = timer
        self.enabled = enabled
        self.totals: dict[tuple[str, str], list[float]] = {}
        self.ops: dict[tuple[str, str], OpTally] = {}
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
            self.ops.setdefault((name, phase), OpTally()).add(cs)

    def merge(self, other: "StepCounter", k: float = 1) -> None:
        """Add ``other``'s counts ``k`` times (sweep mode: one timed layer stands for ``k`` layers)."""
        for key, (f, br, bw, calls) in other.totals.items():
            t = self.totals.setdefault(key, [0.0, 0.0, 0.0, 0])
            t[0] += f * k
            t[1] += br * k
            t[2] += bw * k
            t[3] += calls * k
        for key, tally in other.ops.items():
            self.ops.setdefault(key, OpTally()).merge(tally, k)

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
