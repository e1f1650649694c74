"""H2O evicts in place: the same kept tokens and logits as the gather-based eviction it replaces, and a decode
step moves one token per KV head instead of re-gathering the kept cache."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Scores
from hetmem.llm.generate import generate
from hetmem.methods import get_method
from hetmem.methods.h2o import H2O, AccumulatedAttentionPrepare, H2OAttend
from hetmem.methods.compressed import EvictAttend, KeepSetRetrieval
from hetmem.ops.evict import eviction_scores, lightest_slots, move_last_into
from hetmem.llm.families import SUPPORTED_FAMILIES
from hetmem.testing import family_model, tiny_model


# -- the previous semantics: keep-set by stored order, compacted by a gather every step ---------------------------

@dataclass
class _SliceRelevancy:
    sink: int
    recent: int
    device: str = "cpu"
    name: str = "heavy-hitter-score"

    def score(self, memory, query):
        L = memory.n_units
        return Scores(memory.tensors["acc"][:, :, self.sink : max(self.sink, L - self.recent)], offset=self.sink)


@dataclass
class _GatherAttend(EvictAttend):
    def attend(self, memory, k, v, target):
        return H2OAttend.attend(self, memory, k, v, target)


class _Recorder:
    """Wraps an Apply step and records, after every decode step, the position of each kept slot (slot order)."""

    def __init__(self, inner, log):
        self.inner, self.log, self.device, self.name = inner, log, inner.device, inner.name

    def apply(self, raw, selection, target):
        out = self.inner.apply(raw, selection, target)
        if raw.memory is None:  # a sliding-window layer: h2o keeps its window whole, dense
            return out
        t = raw.memory.tensors
        self.log.append((t["pos"][:, :, : raw.length].clone(), t["acc"][:, :, : raw.length].clone()))
        return out


@dataclass
class _Recorded(H2O):
    log: list | None = None
    gather: bool = False  # True: the previous gather-every-step semantics

    def pipeline(self, device, timer, layer_idx=0):
        pipe = super().pipeline(device, timer, layer_idx)
        if self.gather and not self.window_layer(layer_idx):
            pipe = MemoryPipeline(AccumulatedAttentionPrepare(device), _SliceRelevancy(self.sink, self.recent),
                                  KeepSetRetrieval(self.budget, self.sink, self.recent), _GatherAttend(), timer)
        pipe.apply = _Recorder(pipe.apply, self.log)
        return pipe


FAMILIES = {f.id: f for f in SUPPORTED_FAMILIES}


@pytest.mark.parametrize("arch,prompt,budget,sink", [("llama", 30, 40, 0), ("qwen2", 90, 48, 4), ("llama", 60, 33, 2),
                                                     ("deepseek_v3", 60, 33, 2), ("gemma2", 60, 33, 2)])
def test_in_place_eviction_equals_gather_semantics(arch, prompt, budget, sink):
    """Also on an MLA latent cache (DeepSeek-V3: the value is a view of the key) and with sliding-window
    layers (Gemma2: those keep their window, eviction runs on the others; soft-capped logits)."""
    model = tiny_model(arch) if arch in ("llama", "qwen2") else family_model(FAMILIES[arch])
    ids = torch.randint(3, 100, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    runs = {}
    for gather in (False, True):
        log = []
        res = generate(model, ids, _Recorded(budget=budget, sink=sink, log=log, gather=gather), 30, progress=False,
                       keep_logits=True)
        runs[gather] = (res, log)
    (new, new_log), (old, old_log) = runs[False], runs[True]
    assert new.token_ids == old.token_ids
    for a, b in zip(new.logits, old.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    from hetmem.llm.arch import describe

    evicting = sum(w is None for w in describe(model).windows)
    assert len(new_log) == len(old_log) == 29 * evicting
    for (pa, acc_a), (pb, acc_b) in zip(new_log, old_log):
        # the same kept token set, every step, layer and KV head, with the same accumulated attention each
        oa, ob = pa.sort(-1), pb.sort(-1)
        assert torch.equal(oa.values, ob.values)
        torch.testing.assert_close(acc_a.gather(-1, oa.indices), acc_b.gather(-1, ob.indices), rtol=1e-5, atol=1e-6)
    assert new.memory["tokens_stored_max"] == budget
    n_layers = model.config.num_hidden_layers  # window layers evict nothing
    assert new.memory["tokens_evicted_per_layer_mean"] == round((prompt + 29 - budget) * evicting / n_layers, 2)
    # the gather kept slots in position order; in-place eviction did not (so it really ran)
    assert all(torch.equal(p, p.sort(-1).values) for p, _ in old_log)
    assert any(not torch.equal(p, p.sort(-1).values) for p, _ in new_log)


def test_steady_state_step_moves_one_token_not_the_kept_cache(monkeypatch):
    """After the first compression no decode step gathers the kept cache again."""
    import hetmem.llm.paged_cache as paged

    calls = []
    orig = paged.PagedKVLayer.compact
    monkeypatch.setattr(paged.PagedKVLayer, "compact", lambda self, keep: (calls.append(keep.shape[-1]), orig(self, keep)))
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 70), generator=torch.Generator().manual_seed(1))
    res = generate(model, ids, get_method("h2o", budget=40), 20, progress=False)
    # one compaction per layer (the prompt, at the first decode step); the other 18 steps evict in place
    assert calls == [40] * model.config.num_hidden_layers
    assert res.memory["tokens_evicted_per_layer_mean"] == 70 + 19 - 40


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 30), st.integers(0, 3), st.integers(1, 5), st.integers(1, 3), st.integers(0, 10**6))
def test_lightest_slot_is_the_true_minimum_of_the_evictable(L, sink, recent, n, seed):
    g = torch.Generator().manual_seed(seed)
    seen = L + int(torch.randint(0, 5, (1,), generator=g))
    pos = torch.stack([torch.randperm(seen, generator=g)[:L] for _ in range(2)]).unsqueeze(0).to(torch.int32)
    acc = torch.rand(1, 2, L, generator=g)
    s = eviction_scores(acc, pos, seen, sink, recent)
    evictable = (pos >= sink) & (pos < seen - recent)
    n = min(n, int(evictable.sum(-1).min()))
    if n == 0:
        return
    ev = lightest_slots(s, n)
    for h in range(2):
        cand = [(float(acc[0, h, i]), i) for i in range(L) if evictable[0, h, i]]
        want = sorted(i for _, i in sorted(cand)[:n])
        assert sorted(ev[0, h].tolist()) == want


def test_move_last_into_keeps_tensors_aligned():
    k = torch.arange(2 * 3 * 6 * 4, dtype=torch.float32).reshape(2, 3, 6, 4)
    acc = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6)
    k0, acc0 = k.clone(), acc.clone()
    slots = torch.tensor([[[1], [4], [5]], [[0], [2], [3]]])
    move_last_into([k, acc], slots, 5)
    for b in range(2):
        for h in range(3):
            s = int(slots[b, h, 0])
            assert torch.equal(k[b, h, s], k0[b, h, 5]) and acc[b, h, s] == acc0[b, h, 5]
            for j in range(5):
                if j != s:
                    assert torch.equal(k[b, h, j], k0[b, h, j]) and acc[b, h, j] == acc0[b, h, j]
