"""One protocol per step. A method is a choice of four step objects; each carries its device.

Every step class also has, as class attributes:

- ``role``: which step it is, one of ``STEP_NAMES`` (the protocol below it implements);
- ``kind``: what it computes (``page-minmax``, ``quest-score``, ``page-topk``, ``gather-attention``,
  ``bm25-score``...). Implementations of one kind are interchangeable: same inputs, same outputs.

Both are declared with ``hetmem.core.registry.register_impl(kind, role=...)``, which also makes the
class the default implementation of its kind on ``cpu`` and ``cuda``. An implementation of a kind for
another device (an emulated FPGA kernel, ``runtime/fpga_steps.py``) is registered for that device and
is built by the placement executor from the method's own step:

    impl(inner, ledger, timer)

``inner`` is the method's step (the implementation keeps its parameters and semantics: candidate
range, sink and recent window, budget), ``ledger`` collects the modelled time and transfers of the
device, and ``timer.phase`` says whether a call is in prefill or decode. Its ``device`` names the
backend (``"fpga-emu"``) and its ``name`` the kernel (``"quest-upper-bound-int16"``).

A step may also have ``op_counts(...)`` (same arguments as its main method): what one call costs,
``{step or step.substep: [ops.counts.OpCount]}``, for the profiler and the planner.
"""

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
class PrefillApply(Protocol):
    """An Apply step's prefill entry point: the hook calls ``prefill(layer, PrefillTarget)`` for every
    multi-token step, timed as ``apply`` (``MemoryPipeline.prefill_apply``)."""

    def prefill(self, raw: Any, target: Any) -> Any: ...


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
