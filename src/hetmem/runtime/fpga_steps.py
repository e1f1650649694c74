"""fpga-emu step objects: a method's Relevancy / Retrieval run by the emulated FPGA kernels.

Each replaces the method's own step of the same role, keeps its semantics (candidate pages, sink and
recent window) and charges the *modelled* FPGA time of the call (from the emulator's cycle count and
``hw/data/devices/u55c.json``) to a ``ModelLedger``. ``FPGA_STEPS`` maps a method's step class name to
its fpga-emu class; a method without an entry cannot place that step on an FPGA.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from hetmem.ops.topk import candidate_range
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.hw.cost import fpga_modelled_us
from hetmem.ops import fpga_emu
from hetmem.methods.dsa import indexer_query


@dataclass
class ModelLedger:
    """Modelled time per (step, phase), and the calls it covers."""

    device: object = None  # hw Device of the FPGA (u55c by default)
    us: dict = field(default_factory=lambda: defaultdict(float))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    cycles: dict = field(default_factory=lambda: defaultdict(float))

    fused: bool = False  # relevancy streams into retrieval on the FPGA (the placement says so)
    _last_rel_body: float = 0.0

    def charge(self, step: str, phase: str, cyc: fpga_emu.FpgaCycles) -> None:
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
        self.cycles[(step, phase)] += cyc.cycles


@dataclass
class FpgaQuestRelevancy:
    """Quest upper bound over the candidate pages with int16 operands (emulated FPGA)."""

    inner: object  # the method's QuestRelevancy (its sink/recent/budget rules)
    ledger: ModelLedger
    timer: object
    device: str = "fpga-emu"
    name: str = "quest-upper-bound-int16"

    def score(self, memory: Memory, query: Query) -> Scores:
        r = self.inner
        n = memory.n_units
        lo, hi = candidate_range(n, r.sink_pages, r.recent_pages, r.budget_pages)
        kmin = memory.tensors["kmin"][:, :, lo:hi].float().cpu()
        kmax = memory.tensors["kmax"][:, :, lo:hi].float().cpu()
        q = query.vectors.float().cpu()
        if hi > lo:
            ub, scale, cyc = fpga_emu.quest_upper_bound_int16(q, kmin, kmax)
        else:
            ub, scale, cyc = torch.zeros(*kmin.shape[:2], 0, dtype=torch.int64), 1.0, fpga_emu.FpgaCycles()
        self.ledger.charge("relevancy", self.timer.phase, cyc)
        return Scores(_dequant(ub, scale, query.vectors.device), offset=lo)


@dataclass
class FpgaPageBudgetTopK:
    """Sink + streaming top-k of the candidates + recent window (emulated FPGA top-k unit)."""

    inner: object  # the method's PageBudgetTopK
    ledger: ModelLedger
    timer: object
    device: str = "fpga-emu"
    name: str = "page-streaming-topk"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        r = self.inner
        n = memory.n_units
        dev = scores.values.device
        vals = scores.values.cpu()
        lead = vals.shape[:-1]
        cyc = fpga_emu.FpgaCycles()
        if r.budget_pages >= n:
            idx = torch.arange(n).expand(*lead, n)
        else:
            recent = min(r.recent_pages, n, r.budget_pages)
            sink = min(r.sink_pages, n - recent, r.budget_pages - recent)
            k = r.budget_pages - recent - sink
            parts = []
            if sink:
                parts.append(torch.arange(sink).expand(*lead, sink))
            if k > 0:
                top, cyc = fpga_emu.streaming_topk(vals, k)
                parts.append(top + scores.offset)
            parts.append(torch.arange(n - recent, n).expand(*lead, recent))
            idx = torch.cat(parts, dim=-1)
        self.ledger.charge("retrieval", self.timer.phase, cyc)
        return Selection(indices=idx.to(dev), n_units=n, unit_size=memory.unit_size, length=memory.meta["length"])


# method step class name -> (role, fpga-emu class)
FPGA_STEPS = {
    "QuestRelevancy": ("relevancy", FpgaQuestRelevancy),
    "PageBudgetTopK": ("retrieval", FpgaPageBudgetTopK),
}


def _dequant(ints: torch.Tensor, scale: float, device) -> torch.Tensor:
    """Scores leave the FPGA as integers x one scale; float64 keeps their order exactly for downstream steps."""
    return (ints.double() * scale).to(device)


def _budget_topk(vals: torch.Tensor, offset: int, n: int, budget: int, sink: int, recent_n: int):
    """ops.topk.budget_page_indices with the streaming top-k unit for the ranked part."""
    lead = vals.shape[:-1]
    cyc = fpga_emu.FpgaCycles()
    if budget >= n:
        return torch.arange(n).expand(*lead, n), cyc
    recent = min(recent_n, n, budget)
    sink = min(sink, n - recent, budget - recent)
    k = budget - recent - sink
    parts = []
    if sink:
        parts.append(torch.arange(sink).expand(*lead, sink))
    if k > 0:
        top, cyc = fpga_emu.streaming_topk(vals, k)
        parts.append(top + offset)
    parts.append(torch.arange(n - recent, n).expand(*lead, recent))
    return torch.cat(parts, dim=-1), cyc


@dataclass
class FpgaIndexerRelevancy:
    """DSA's lightning indexer with int16 operands (emulated FPGA). The index query and head weights are
    projected from the decode token's hidden state where the model runs; the FPGA scores every key."""

    inner: object  # methods.dsa.LightningIndexerRelevancy
    ledger: ModelLedger
    timer: object
    device: str = "fpga-emu"
    name: str = "lightning-indexer-int16"

    def score(self, memory: Memory, query: Query) -> Scores:
        r = self.inner
        L = memory.n_units
        hi = max(0, L - r.recent) if r.budget < L else 0
        h = query.meta["hidden"][:, -1].float()
        q, w = indexer_query(r.weights, h, r.index_heads)
        k = memory.tensors["kidx"][:, 0, :hi].float().cpu()
        if hi:
            s, scale, cyc = fpga_emu.index_scores_int16(q.cpu(), w.cpu(), k)
        else:
            s, scale, cyc = torch.zeros(k.shape[0], 0, dtype=torch.int64), 1.0, fpga_emu.FpgaCycles()
        self.ledger.charge("relevancy", self.timer.phase, cyc)
        return Scores(_dequant(s, scale, h.device))


@dataclass
class FpgaSharedTokenTopK:
    """DSA's top-``budget`` tokens (recent window forced) by the streaming top-k unit."""

    inner: object  # methods.dsa.SharedTokenTopK
    ledger: ModelLedger
    timer: object
    device: str = "fpga-emu"
    name: str = "token-streaming-topk"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        r = self.inner
        L = memory.n_units
        idx, cyc = _budget_topk(scores.values.cpu(), 0, L, r.budget, 0, r.recent)
        self.ledger.charge("retrieval", self.timer.phase, cyc)
        idx = idx.to(scores.values.device)
        idx = idx.unsqueeze(1).expand(idx.shape[0], memory.meta["n_kv"], idx.shape[-1])
        return Selection(indices=idx, n_units=L, unit_size=1, length=L)


@dataclass
class FpgaGateRelevancy:
    """SeerAttention-R: gated query . gated block summaries as an int16 GEMV (emulated FPGA). The query-side
    gate (a D x D projection of one vector) runs where the query is produced."""

    inner: object  # methods.seer.GateRelevancy
    ledger: ModelLedger
    timer: object
    device: str = "fpga-emu"
    name: str = "gate-score-int16"

    def score(self, memory: Memory, query: Query) -> Scores:
        r = self.inner
        n = memory.n_units
        lo, hi = candidate_range(n, r.sink_pages, r.recent_pages, r.budget_pages)
        q = query.vectors.float().mean(dim=2)
        qg = torch.einsum("bhd,hde->bhe", q, r.wq.to(q.device)).cpu()
        kg = memory.tensors["kgated"][:, :, lo:hi].float().cpu()
        if hi > lo:
            s, scale, cyc = fpga_emu.gemv_int16(qg, kg)  # [B, H_kv, N]
        else:
            s, scale, cyc = torch.zeros(*kg.shape[:2], 0, dtype=torch.int64), 1.0, fpga_emu.FpgaCycles()
        self.ledger.charge("relevancy", self.timer.phase, cyc)
        return Scores(_dequant(s, scale * qg.shape[-1] ** -0.5, query.vectors.device), offset=lo)


@dataclass
class FpgaBlockBudgetOrThreshold:
    """SeerAttention-R retrieval on the FPGA: streaming top-k under the budget, or the threshold bitmap in
    128-key words. The gate-probability threshold p becomes a score threshold log(p) + logsumexp(scores)
    (one extra pass over the scores, 16 per cycle)."""

    inner: object  # methods.seer.BlockBudgetOrThreshold
    ledger: ModelLedger
    timer: object
    device: str = "fpga-emu"
    name: str = "block-select-fpga"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        import math

        r = self.inner
        n, L, P = memory.n_units, memory.meta["length"], memory.unit_size
        vals = scores.values.cpu()
        dev = scores.values.device
        if r.threshold <= 0:
            idx, cyc = _budget_topk(vals, scores.offset, n, r.budget_pages, r.sink_pages, r.recent_pages)
            self.ledger.charge("retrieval", self.timer.phase, cyc)
            return Selection(indices=idx.to(dev), n_units=n, unit_size=P, length=L)
        lead = vals.shape[:-1]
        bitmap = torch.zeros(*lead, n, dtype=torch.bool)
        cyc = fpga_emu.FpgaCycles()
        if scores.n_units:
            thr = (math.log(r.threshold) + torch.logsumexp(vals, dim=-1, keepdim=True))
            _, bits, cyc = fpga_emu.threshold_bitmap_128(vals - thr, 0.0)
            cyc.cycles += vals.numel() / fpga_emu.LANES  # the logsumexp pass
            bitmap[..., scores.offset : scores.offset + scores.n_units] = bits
        bitmap[..., : min(r.sink_pages, n)] = True
        bitmap[..., max(0, n - r.recent_pages) :] = True
        self.ledger.charge("retrieval", self.timer.phase, cyc)
        return Selection(bitmap=bitmap.to(dev), n_units=n, unit_size=P, length=L)


FPGA_STEPS.update({
    "LightningIndexerRelevancy": ("relevancy", FpgaIndexerRelevancy),
    "SharedTokenTopK": ("retrieval", FpgaSharedTokenTopK),
    "GateRelevancy": ("relevancy", FpgaGateRelevancy),
    "BlockBudgetOrThreshold": ("retrieval", FpgaBlockBudgetOrThreshold),
})
