"""Method registry: a method is a named choice of four step objects plus its parameters."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from hetmem.core.pipeline import MemoryPipeline
from hetmem.errors import HetmemError
from hetmem.core.timer import StepTimer

REGISTRY: dict[str, type["Method"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Method:
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise HetmemError for parameter values that cannot work."""

    def pipeline(self, device: str, timer: StepTimer, layer_idx: int = 0) -> MemoryPipeline:
        """The four steps for one attention layer (methods may treat some layers differently)."""
        raise NotImplementedError

    def bind(self, model) -> None:
        """Called once per generation before ``pipeline``: methods with per-layer weights size/load them here."""

    def report(self, cache) -> dict | None:
        """Extra measured facts about the method's memory after a run (evictions, quantisation error)."""
        return None

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def get_method(name: str, **params) -> Method:
    if name not in REGISTRY:
        raise HetmemError(f"unknown method '{name}': use one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    allowed = {f.name for f in fields(cls)}
    method = cls(**{k: v for k, v in params.items() if k in allowed and v is not None})
    method.validate()
    return method
