"""Implementations of step kinds, per device.

Every step class has a ``role`` (which of the four steps it is: prepare, relevancy, retrieval, apply)
and a ``kind`` (what it computes: ``page-minmax``, ``quest-score``, ``page-topk``, ``bm25-score``...).
Two implementations of one kind are interchangeable: same inputs, same outputs, on different devices.

A method's own step class is the default implementation of its kind on ``cpu`` and ``cuda``; it
declares both with ``@register_impl(kind, role=...)`` above its ``@dataclass``. Another device
registers its kernels for the kinds it can run, e.g. ``runtime/fpga_steps.py``::

    @register_impl("quest-score", "fpga-emu", role="relevancy")
    class FpgaQuestRelevancy: ...

The placement executor (``runtime/executor.py``) looks up ``impl_for(step.kind, backend)`` for every
step it places: adding a device means registering its kernels here, not editing the executor. What
an implementation for a device other than the step's own must accept is in ``core/steps.py``.
"""

from __future__ import annotations

from hetmem.core.steps import STEP_NAMES

DEFAULT_DEVICES = ("cpu", "cuda")  # where a method's own step class runs

_IMPLS: dict[tuple[str, str], type] = {}
_ROLES: dict[str, str] = {}  # kind -> role (one role per kind)


def register_impl(kind: str, device: str | tuple[str, ...] = DEFAULT_DEVICES, *, role: str):
    """Class decorator: the class implements step ``kind`` (of ``role``) on ``device`` (one or several).

    Sets ``cls.kind`` and ``cls.role``. A kind has one role, and one class per (kind, device): a
    second class for the same pair is a programming error (two kinds would share a name).
    """
    devices = (device,) if isinstance(device, str) else tuple(device)
    if role not in STEP_NAMES:
        raise ValueError(f"register_impl({kind!r}): role must be one of {', '.join(STEP_NAMES)} (got {role!r})")
    if _ROLES.get(kind, role) != role:
        raise ValueError(f"register_impl({kind!r}): kind {kind!r} is a {_ROLES[kind]} step, not {role}")

    def deco(cls):
        for d in devices:
            prev = _IMPLS.get((kind, d))
            if prev is not None and _key(prev) != _key(cls):  # the same class re-imported is fine
                raise ValueError(f"{_key(cls)}: kind {kind!r} on {d!r} is already implemented by {_key(prev)}")
        cls.kind = kind
        cls.role = role
        _ROLES[kind] = role
        for d in devices:
            _IMPLS[(kind, d)] = cls
        return cls

    return deco


def impl_for(kind: str | None, device: str) -> type | None:
    """The class implementing ``kind`` on ``device`` (None when that device has no implementation)."""
    return _IMPLS.get((kind, device))


def kinds() -> dict[str, dict]:
    """Every registered kind: ``{kind: {"role": ..., "devices": {device: "module.Class"}}}``, sorted by kind."""
    out: dict[str, dict] = {}
    for (kind, dev), cls in sorted(_IMPLS.items()):
        out.setdefault(kind, {"role": _ROLES[kind], "devices": {}})["devices"][dev] = _key(cls)
    return out


def devices_for(kind: str | None) -> list[str]:
    """The devices that have an implementation of ``kind``."""
    return sorted(d for (k, d) in _IMPLS if k == kind)


def _key(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
