"""MemoryPipeline: the four steps composed, each call timed by a StepTimer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetmem.core.steps import ApplyStep, PrepareStep, RelevancyStep, RetrievalStep
from hetmem.core.types import Memory, PrefillTarget, Query
from hetmem.core.timer import StepTimer


@dataclass
class MemoryPipeline:
    """Prepare -> Relevancy -> Retrieval -> Apply.

    ``relevancy`` and ``retrieval`` may be None for methods that use all of memory (the dense
    baseline): ``query_and_apply`` then applies with no selection.
    """

    prepare: PrepareStep | None
    relevancy: RelevancyStep | None
    retrieval: RetrievalStep | None
    apply: ApplyStep
    timer: StepTimer = field(default_factory=StepTimer)

    @property
    def devices(self) -> dict[str, str | None]:
        return {
            "prepare": self.prepare.device if self.prepare else None,
            "relevancy": self.relevancy.device if self.relevancy else None,
            "retrieval": self.retrieval.device if self.retrieval else None,
            "apply": self.apply.device,
        }

    def build(self, raw: Any, memory: Memory | None = None) -> Memory | None:
        """Prepare Memory from raw data (or extend ``memory`` with new raw data)."""
        if self.prepare is None:
            return memory
        with self.timer.step("prepare", self.prepare.device):
            return self.prepare.prepare(raw, memory)

    def select(self, memory: Memory, query: Query):
        """Compute Relevancy then Retrieval; returns the Selection (None when the method selects nothing)."""
        if self.relevancy is None or self.retrieval is None:
            return None
        with self.timer.step("relevancy", self.relevancy.device):
            scores = self.relevancy.score(memory, query)
        with self.timer.step("retrieval", self.retrieval.device):
            return self.retrieval.select(scores, memory)

    def query_and_apply(self, memory: Memory | None, query: Query, raw: Any, target: Any) -> Any:
        """Answer one query against prepared memory: relevancy, retrieval, then apply to ``target``."""
        selection = self.select(memory, query) if memory is not None else None
        self.last_selection = selection  # kept for measurements (attention-mass recall)
        with self.timer.step("apply", self.apply.device):
            return self.apply.apply(raw, selection, target)

    def prefill_apply(self, raw: Any, target: PrefillTarget) -> Any:
        """Apply in prefill: the method's Apply step's ``prefill`` (plain causal attention for every in-model
        method so far, ``methods.shared.DensePrefill``), timed as ``apply``."""
        with self.timer.step("apply", self.apply.device):
            prefill = getattr(self.apply, "prefill", None)
            return prefill(raw, target) if prefill is not None else target.dense()

    def build_and_apply(self, raw: Any, query: Query, target: Any) -> Any:
        memory = self.build(raw)
        return self.query_and_apply(memory, query, raw, target)
