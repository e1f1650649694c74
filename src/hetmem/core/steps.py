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


@runtime_checkable
class ObservingPrepare(Protocol):
    """A Prepare step that also learns from prefill queries (H2O's and SnapKV's attention votes).

    The attention hook calls ``observe`` after each prefill chunk's attention, timed as ``prepare``.
    A step whose memory depends only on the *last* prefill chunk's queries (each call replaces what the
    previous one left, as SnapKV's observation window does) says so with a class attribute
    ``observes_last_chunk = True``: a shared prefill then reruns only that chunk for it (``llm.generate``).
    """

    def observe(self, layer: Any, query: Any, scale: float) -> None: ...


@runtime_checkable
class MemoryMethod(Protocol):
    """Everything the model side (``hetmem.llm``) calls on a method. ``hetmem.methods.base.Method`` implements
    it; llm depends on this protocol, never on ``hetmem.methods``.

    Optional class attributes the model side reads with their defaults:

    - ``page_size`` (16): tokens per page of the paged KV cache;
    - ``cache_layer`` (None): a ``PagedKVLayer`` subclass that stores this method's KV (kvquant's packed cache);
    - ``needs_hidden`` (False): the attention input hidden states are captured into ``layer.hidden`` for
      Prepare/Relevancy (DSA's indexer).

    A pipeline's ``prepare`` step may implement ``ObservingPrepare``.
    """

    name: str
    family: str

    def bind(self, model: Any) -> None: ...

    def pipeline(self, device: str, timer: Any, layer_idx: int = 0) -> Any: ...

    def report(self, cache: Any) -> dict | None: ...

    def params(self) -> dict: ...
