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

from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.ops import fpga_emu


@dataclass
class ModelLedger:
    """Modelled time per (step, phase), and the calls it covers."""

    device: object = None  # hw Device of the FPGA (u55c by default)
    us: dict = field(default_factory=lambda: defaultdict(float))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    cycles: dict = field(default_factory=lambda: defaultdict(float))

    def charge(self, step: str, phase: str, cyc: fpga_emu.FpgaCycles) -> None:
        self.us[(step, phase)] += fpga_emu.modelled_us(cyc, self.device)
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
        n = memory.n_units
        r = self.inner
        lo = min(r.sink_pages, n)
        hi = max(lo, n - r.recent_pages)
        if r.budget_pages >= n:
            hi = lo
        kmin = memory.tensors["kmin"][:, :, lo:hi].float().cpu()
        kmax = memory.tensors["kmax"][:, :, lo:hi].float().cpu()
        q = query.vectors.float().cpu()
        if hi > lo:
            ub, scale, cyc = fpga_emu.quest_upper_bound_int16(q, kmin, kmax)
        else:
            ub, scale, cyc = torch.zeros(*kmin.shape[:2], 0, dtype=torch.int64), 1.0, fpga_emu.FpgaCycles()
        self.ledger.charge("relevancy", self.timer.phase, cyc)
        return Scores(ub.to(query.vectors.device), offset=lo)


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
