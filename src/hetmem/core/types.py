"""The typed data that flows between the four steps.

    Prepare Memory -> Memory
    Compute Relevancy (Memory, Query) -> Scores
    Retrieval (Scores) -> Selection
    Apply to Inference (raw data, Selection, target) -> target
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Memory:
    """Prepared memory: the compact per-unit summaries relevancy is computed against.

    ``kind`` names the summary (``"page-minmax"``, ``"bm25"``, ...), ``tensors`` holds its arrays and
    ``n_units``/``unit_size`` describe how the raw data is partitioned (pages of tokens, documents).
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    n_units: int = 0
    unit_size: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Query:
    """What relevancy is computed for: query vectors (per head) or text."""

    vectors: torch.Tensor | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scores:
    """Relevancy of every unit: ``values[..., u]`` scores unit ``offset + u``."""

    values: torch.Tensor
    offset: int = 0  # index of the unit that values[..., 0] refers to

    @property
    def n_units(self) -> int:
        return self.values.shape[-1]


@dataclass
class Selection:
    """Which units to apply: sorted top-k ``indices`` or a threshold ``bitmap`` (one bool per unit).

    Both forms carry absolute unit ids. ``n_units`` is the number of units that exist; ``length`` is
    the number of valid raw elements (tokens), so the last unit may be partial. ``start`` is the first
    element that may be attended (a sliding-window layer's window start; 0 otherwise): units are
    selected only from the one holding it on, and Apply leaves out the elements before it.
    """

    indices: torch.Tensor | None = None
    bitmap: torch.Tensor | None = None
    n_units: int = 0
    unit_size: int = 1
    length: int = 0
    start: int = 0

    def __post_init__(self) -> None:
        if (self.indices is None) == (self.bitmap is None):
            raise ValueError("a Selection holds exactly one of indices or bitmap")

    @property
    def form(self) -> str:
        return "topk" if self.indices is not None else "bitmap"

    def to_bitmap(self) -> torch.Tensor:
        if self.bitmap is not None:
            return self.bitmap
        shape = (*self.indices.shape[:-1], self.n_units)
        out = torch.zeros(shape, dtype=torch.bool, device=self.indices.device)
        return out.scatter_(-1, self.indices, True)

    def to_indices(self) -> list[torch.Tensor] | torch.Tensor:
        """Sorted unit ids. A bitmap may select a different count per row, so it yields a flat list per row."""
        if self.indices is not None:
            return self.indices
        flat = self.bitmap.reshape(-1, self.bitmap.shape[-1])
        return [row.nonzero().flatten() for row in flat]

    @property
    def selected_tokens(self) -> int:
        """Tokens covered per row (the maximum over rows for a bitmap)."""
        if self.indices is not None:
            k = self.indices.shape[-1]
            ids = self.indices
        else:
            k = int(self.bitmap.sum(-1).max())
            ids = None
        full = k * self.unit_size
        last = self.n_units - 1
        has_last = bool((ids == last).any()) if ids is not None else bool(self.bitmap[..., last].any())
        if has_last:
            full -= self.n_units * self.unit_size - self.length
        first = self.start // self.unit_size
        has_first = bool((ids == first).any()) if ids is not None else bool(self.bitmap[..., first].any())
        if self.start and has_first:
            full -= self.start - first * self.unit_size
        return full


@dataclass
class PrefillTarget:
    """What Apply acts on in prefill (or any multi-token step): the chunk's causal attention. ``dense`` computes
    it exactly as the model's own attention would (the model side provides it: soft-capping, sinks, sliding
    windows included); a method's Apply step may compute it otherwise."""

    dense: Any  # () -> the attention output of the chunk, as the model's attention function returns it


@dataclass
class DecodeTarget:
    """What sparse attention's Apply acts on in one decode step: grouped queries, the softmax scale and
    what else the model's own attention applies (logit soft-capping, per-head sink logits)."""

    q: torch.Tensor  # [B, H_kv, G, D]
    scale: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [H_kv, G]
