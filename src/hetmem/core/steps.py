"""One protocol per step. A method is a choice of four step objects; each carries its device."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from hetmem.core.types import Memory, Query, Scores, Selection

STEP_NAMES = ("prepare", "relevancy", "retrieval", "apply")


@runtime_checkable
class PrepareStep(Protocol):
    """Prepare Memory: raw data -> Memory. With ``memory`` given, extend it in place with new raw data."""

    name: str
    device: str

    def prepare(self, raw: Any, memory: Memory | None = None) -> Memory: ...


@runtime_checkable
class RelevancyStep(Protocol):
    """Compute Relevancy: Memory + Query -> Scores."""

    name: str
    device: str

    def score(self, memory: Memory, query: Query) -> Scores: ...


@runtime_checkable
class RetrievalStep(Protocol):
    """Retrieval: Scores -> Selection (top-k indices or a threshold bitmap)."""

    name: str
    device: str

    def select(self, scores: Scores, memory: Memory) -> Selection: ...


@runtime_checkable
class ApplyStep(Protocol):
    """Apply to Inference: raw data + Selection + target -> new target."""

    name: str
    device: str

    def apply(self, raw: Any, selection: Selection | None, target: Any) -> Any: ...
