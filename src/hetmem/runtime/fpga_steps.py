"""fpga-emu implementations of step kinds: a method's Relevancy / Retrieval run by the emulated FPGA kernels.

Each class is registered (``hetmem.core.registry``) as the implementation of one kind on the device
``fpga-emu``. The executor builds it from the method's own step of that kind (``inner``): it keeps
the inner step's semantics (candidate pages, sink and recent window, budget), runs the kernel of
``ops.fpga_emu`` and charges to a ``ModelLedger`` the call's *modelled* FPGA time (from the
kernel's counts and the FPGA's device file) and the host<->FPGA transfers of its inputs and
outputs (over the catalogue's link). A kind with no fpga-emu implementation cannot be placed on an
FPGA.

Transfers (bytes as they cross; none between two steps that are both on the FPGA):
    relevancy  in: the Memory tensors its kernel reads, as Prepare writes them (the units changed since
               the last Prepare call: prefill sends the whole prompt's, each decode step its last unit),
               and the query side it scores with; out: its int32 scores
    retrieval  in: the scores; out: the selection (int32 ids, or the packed 128-bit bitmap words)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.hw.catalog import Catalog
from hetmem.hw.cost import fpga_cycles, fpga_modelled_us
from hetmem.methods.dsa import indexer_query
from hetmem.ops import fpga_emu
from hetmem.ops.topk import budget_page_indices, candidate_range

DEVICE = "fpga-emu"
SCORE_BYTES = 4  # the scoring kernels' int32 accumulators leave the FPGA as they are
ID_BYTES = 4  # selected unit ids as int32


@dataclass
class ModelLedger:
    """Modelled FPGA time per (step, phase), the calls it covers, and the host<->FPGA transfers."""

    device: object = None  # hw Device of the FPGA (u55c by default)
    us: dict = field(default_factory=lambda: defaultdict(float))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    cycles: dict = field(default_factory=lambda: defaultdict(float))

    fused: bool = False  # relevancy streams into retrieval on the FPGA (the placement says so)
    _last_rel_body: float = 0.0

    on_fpga: frozenset = frozenset()  # the steps placed on the FPGA: what passes between them stays on chip
    link: tuple | None = None  # (hw Link, forward: host -> FPGA is its a -> b); None: transfers not modelled
    link_info: dict | None = None  # what the run record says about the link (name, system, source)
    xfer_us: dict = field(default_factory=lambda: defaultdict(float))
    xfer_bytes: dict = field(default_factory=lambda: defaultdict(float))
    xfers: dict = field(default_factory=lambda: defaultdict(int))

    def charge(self, step: str, phase: str, cyc: fpga_emu.FpgaCycles) -> None:
        if self.device is None:
            self.device = Catalog(calibrate_host=False).device("u55c")
        t = fpga_modelled_us(cyc, self.device)
        if self.fused:
            lat = fpga_modelled_us(fpga_emu.FpgaCycles(), self.device)
            if step == "relevancy":
                self._last_rel_body = t - lat
            elif step == "retrieval":
                # the top-k overlaps the scoring it is fed by: it adds only what it takes beyond it, no latency
                t = max(0.0, (t - lat) - self._last_rel_body)
        self.us[(step, phase)] += t
        self.calls[(step, phase)] += 1
        self.cycles[(step, phase)] += fpga_cycles(cyc, self.device)

    def move(self, step: str, phase: str, nbytes: float, peer: str, to_fpga: bool) -> None:
        """``step`` (on the FPGA) receives ``nbytes`` from, or sends them to, ``peer``: a step, or ``"model"``
        (the inference device). Nothing moves when the peer is on the FPGA too."""
        if nbytes <= 0 or peer in self.on_fpga:
            return
        self.xfer_bytes[(step, phase)] += nbytes
        self.xfers[(step, phase)] += 1
        if self.link is not None:
            link, forward = self.link
            self.xfer_us[(step, phase)] += link.transfer_us(nbytes, forward == to_fpga)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class FpgaStep:
    """An fpga-emu implementation of the inner step's kind (see core/steps.py)."""

    inner: object  # the method's own step of the same kind
    ledger: ModelLedger
    timer: object
    device: str = DEVICE

    def charge(self, cyc: fpga_emu.FpgaCycles) -> None:
        self.ledger.charge(self.role, self.timer.phase, cyc)

    def move(self, n: float, peer: str, to_fpga: bool) -> None:
        self.ledger.move(self.role, self.timer.phase, n, peer, to_fpga)


@dataclass
class FpgaRelevancy(FpgaStep):
    """Scoring on the FPGA: ``memory_tensors`` are the Memory tensors the kernel reads (units on dim 2)."""

    memory_tensors: ClassVar[tuple[str, ...]] = ()

    def memory_sync_bytes(self, memory: Memory, prev_length: int) -> int:
        """Bytes of the kernel's Memory tensors in the units written since ``prev_length`` tokens."""
        u0 = prev_length // max(1, memory.unit_size)
        return sum(nbytes(memory.tensors[t][:, :, u0 : memory.n_units]) for t in self.memory_tensors)

    def run(self, kernel, args: tuple, lead, nonempty: bool) -> tuple[torch.Tensor, float]:
        """The kernel's integer scores ``[*lead, N]`` and scale (no call, and no time, when nothing is scored)."""
        if nonempty:
            out, scale, cyc = kernel(*args)
        else:
            out, scale, cyc = torch.zeros(*lead, 0, dtype=torch.int64), 1.0, fpga_emu.FpgaCycles()
        self.charge(cyc)
        self.move(out.numel() * SCORE_BYTES, "retrieval", to_fpga=False)
        return out, scale


@register_impl("quest-score", DEVICE, role="relevancy")
@dataclass
class FpgaQuestRelevancy(FpgaRelevancy):
    """Quest upper bound over the candidate pages with int16 operands (emulated FPGA)."""

    name: str = "quest-upper-bound-int16"
    memory_tensors: ClassVar[tuple[str, ...]] = ("kmin", "kmax")

    def score(self, memory: Memory, query: Query) -> Scores:
        r = self.inner
        lo, hi = candidate_range(memory.n_units, r.sink_pages, r.recent_pages, r.budget_pages)
        kmin = memory.tensors["kmin"][:, :, lo:hi].float().cpu()
        kmax = memory.tensors["kmax"][:, :, lo:hi].float().cpu()
        self.move(nbytes(query.vectors), "model", to_fpga=True)
        ub, scale = self.run(fpga_emu.quest_upper_bound_int16, (query.vectors.float().cpu(), kmin, kmax),
                             kmin.shape[:2], hi > lo)
        return Scores(_dequant(ub, scale, query.vectors.device), offset=lo)


@register_impl("lightning-indexer", DEVICE, role="relevancy")
@dataclass
class FpgaIndexerRelevancy(FpgaRelevancy):
    """DSA's lightning indexer with int16 operands (emulated FPGA). The index query and head weights are
    projected from the decode token's hidden state where the model runs; the FPGA scores every key."""

    name: str = "lightning-indexer-int16"
    memory_tensors: ClassVar[tuple[str, ...]] = ("kidx",)

    def score(self, memory: Memory, query: Query) -> Scores:
        r = self.inner
        L = memory.n_units
        hi = max(0, L - r.recent) if r.budget < L else 0
        h = query.meta["hidden"][:, -1].float()
        q, w = indexer_query(r.weights, h, r.index_heads)
        k = memory.tensors["kidx"][:, 0, :hi].float().cpu()
        self.move(nbytes(q) + nbytes(w), "model", to_fpga=True)
        s, scale = self.run(fpga_emu.index_scores_int16, (q.cpu(), w.cpu(), k), k.shape[:1], hi > 0)
        return Scores(_dequant(s, scale, h.device))


@register_impl("gate-score", DEVICE, role="relevancy")
@dataclass
class FpgaGateRelevancy(FpgaRelevancy):
    """SeerAttention-R: gated query . gated block summaries as an int16 GEMV (emulated FPGA). The query-side
    gate (a D x D projection of one vector) runs where the query is produced."""

    name: str = "gate-score-int16"
    memory_tensors: ClassVar[tuple[str, ...]] = ("kgated",)

    def score(self, memory: Memory, query: Query) -> Scores:
        r = self.inner
        lo, hi = candidate_range(memory.n_units, r.sink_pages, r.recent_pages, r.budget_pages)
        q = query.vectors.float().mean(dim=2)
        qg = torch.einsum("bhd,hde->bhe", q, r.wq.to(q.device)).cpu()
        kg = memory.tensors["kgated"][:, :, lo:hi].float().cpu()
        self.move(nbytes(qg), "model", to_fpga=True)
        s, scale = self.run(fpga_emu.gemv_int16, (qg, kg), kg.shape[:2], hi > lo)  # [B, H_kv, N]
        return Scores(_dequant(s, scale * qg.shape[-1] ** -0.5, query.vectors.device), offset=lo)


class StreamingTopK:
    """The FPGA's streaming top-k unit as the ``topk`` of ``ops.topk.budget_page_indices``; keeps its cycles."""

    def __init__(self):
        self.cycles = fpga_emu.FpgaCycles()

    def __call__(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        top, cyc = fpga_emu.streaming_topk(scores, k)
        self.cycles += cyc
        return top


@dataclass
class FpgaRetrieval(FpgaStep):
    def budget_topk(self, scores: Scores, n: int, budget: int, sink: int, recent: int) -> torch.Tensor:
        """Sink + streaming top-k of the candidates + recent window (``ops.topk.budget_page_indices``), on the host."""
        self.move(nbytes(scores.values), "relevancy", to_fpga=True)
        unit = StreamingTopK()
        idx = budget_page_indices(scores.values.cpu(), scores.offset, n, budget, sink, recent, topk=unit)
        self.charge(unit.cycles)
        self.move(idx.numel() * ID_BYTES, "apply", to_fpga=False)
        return idx


@register_impl("page-topk", DEVICE, role="retrieval")
@dataclass
class FpgaPageBudgetTopK(FpgaRetrieval):
    """Sink + streaming top-k of the candidates + recent window (emulated FPGA top-k unit)."""

    name: str = "page-streaming-topk"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        r = self.inner
        n = memory.n_units
        idx = self.budget_topk(scores, n, r.budget_pages, r.sink_pages, r.recent_pages)
        return Selection(indices=idx.to(scores.values.device), n_units=n, unit_size=memory.unit_size,
                         length=memory.meta["length"])


@register_impl("token-topk-shared", DEVICE, role="retrieval")
@dataclass
class FpgaSharedTokenTopK(FpgaRetrieval):
    """DSA's top-``budget`` tokens (recent window forced) by the streaming top-k unit."""

    name: str = "token-streaming-topk"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        r = self.inner
        L = memory.n_units
        idx = self.budget_topk(scores, L, r.budget, 0, r.recent).to(scores.values.device)
        idx = idx.unsqueeze(1).expand(idx.shape[0], memory.meta["n_kv"], idx.shape[-1])
        return Selection(indices=idx, n_units=L, unit_size=1, length=L)


@register_impl("block-select", DEVICE, role="retrieval")
@dataclass
class FpgaBlockBudgetOrThreshold(FpgaRetrieval):
    """SeerAttention-R retrieval on the FPGA: streaming top-k under the budget, or the threshold bitmap in
    128-key words. The gate-probability threshold p becomes a score threshold log(p) + logsumexp(scores)
    (one extra pass over the scores, 16 per cycle)."""

    name: str = "block-select-fpga"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        r = self.inner
        n, L, P = memory.n_units, memory.meta["length"], memory.unit_size
        dev = scores.values.device
        if r.threshold <= 0:
            idx = self.budget_topk(scores, n, r.budget_pages, r.sink_pages, r.recent_pages)
            return Selection(indices=idx.to(dev), n_units=n, unit_size=P, length=L)
        vals = scores.values.cpu()
        self.move(nbytes(scores.values), "relevancy", to_fpga=True)
        lead = vals.shape[:-1]
        bitmap = torch.zeros(*lead, n, dtype=torch.bool)
        cyc = fpga_emu.FpgaCycles()
        if scores.n_units:
            thr = (math.log(r.threshold) + torch.logsumexp(vals, dim=-1, keepdim=True))
            packed, bits, cyc = fpga_emu.threshold_bitmap_128(vals - thr, 0.0)
            cyc.cycles += vals.numel() / fpga_emu.LANES  # the logsumexp pass
            bitmap[..., scores.offset : scores.offset + scores.n_units] = bits
            self.move(packed.numel(), "apply", to_fpga=False)
        bitmap[..., : min(r.sink_pages, n)] = True
        bitmap[..., max(0, n - r.recent_pages) :] = True
        self.charge(cyc)
        return Selection(bitmap=bitmap.to(dev), n_units=n, unit_size=P, length=L)


def _dequant(ints: torch.Tensor, scale: float, device) -> torch.Tensor:
    """Scores leave the FPGA as integers x one scale; float64 keeps their order exactly for downstream steps."""
    return (ints.double() * scale).to(device)
