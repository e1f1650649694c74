import pytest
import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.core.timer import StepTimer


def test_selection_needs_exactly_one_form():
    with pytest.raises(ValueError):
        Selection()
    with pytest.raises(ValueError):
        Selection(indices=torch.tensor([0]), bitmap=torch.tensor([True]))


def test_selection_forms_round_trip():
    idx = torch.tensor([[0, 3, 5], [1, 2, 5]])
    sel = Selection(indices=idx, n_units=6, unit_size=16, length=90)
    bm = sel.to_bitmap()
    assert bm.tolist() == [[True, False, False, True, False, True], [False, True, True, False, False, True]]
    back = Selection(bitmap=bm, n_units=6, unit_size=16, length=90).to_indices()
    assert [r.tolist() for r in back] == idx.tolist()
    # the last page holds 90 - 5*16 = 10 tokens
    assert sel.selected_tokens == 16 + 16 + 10


class _Prep:
    name, device = "p", "cpu"

    def prepare(self, raw, memory=None):
        return Memory(kind="sum", tensors={"x": torch.tensor(raw).float()}, n_units=len(raw))


class _Rel:
    name, device = "r", "cpu"

    def score(self, memory, query):
        return Scores(memory.tensors["x"] * query.vectors)


class _Ret:
    name, device = "t", "cpu"

    def select(self, scores, memory):
        return Selection(indices=scores.values.topk(2).indices.sort().values, n_units=memory.n_units)


class _App:
    name, device = "a", "cpu"

    def apply(self, raw, selection, target):
        return target + sum(raw[i] for i in selection.indices.tolist())


def test_pipeline_runs_four_steps_and_times_each():
    timer = StepTimer()
    pipe = MemoryPipeline(_Prep(), _Rel(), _Ret(), _App(), timer)
    raw = [5, 1, 7, 3]
    out = pipe.build_and_apply(raw, Query(vectors=torch.tensor(1.0)), target=100)
    assert out == 112  # the two largest (5 and 7) were retrieved and applied
    summary = timer.summary()
    assert all(summary[s]["calls"] == 1 for s in ("prepare", "relevancy", "retrieval", "apply"))
    assert all(summary[s]["source"] == "measured" for s in summary)
    assert pipe.devices == {"prepare": "cpu", "relevancy": "cpu", "retrieval": "cpu", "apply": "cpu"}
