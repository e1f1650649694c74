"""Every selecting method, exactly: its Apply output is dense attention restricted to what it selected.

On tiny random models (hetmem.testing), prefill (in chunks) then several decode steps at a budget well
below the context, so the no-gather fast paths are never taken. A recorder wraps each layer's Apply step
and keeps, for every decode call: the query, the layer's stored K/V, the original position of every
stored token, the Selection, and the output. The test then recomputes, in float64, attention of that
query over *every token the layer has seen* (the K/V as first written, at its original position),
masked to exactly the selected tokens:

* sparse attention (quest, seer top-k and threshold, dsa, oracle): the selected pages/tokens;
* compressed KV (streaming, h2o, snapkv): the tokens kept, with their original positions (the recorder
  follows every eviction and checks that the stored K/V are the ones first written at those positions).

While Apply runs, every stored token it did not select is overwritten with NaN (and restored after), so an
Apply that reads one unselected key or value (a dense fallback, a masked instead of gathered attention)
turns the output into NaN. Nothing here touches the hot path: the recorder exists only in this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from hetmem.core.types import Selection
from hetmem.llm.generate import generate
from hetmem.methods import get_method
from hetmem.testing import tiny_model

PROMPT, NEW, CHUNK = 100, 6, 48  # chunks of 48, 48, 4; then NEW - 1 = 5 decode forward passes

METHODS = {
    "quest": dict(budget=32, page_size=8, dense_layers=0),
    "seer-topk": dict(budget=32, page_size=8),
    "seer-threshold": dict(threshold=0.1, page_size=8),
    "dsa": dict(budget=24, recent=4, index_heads=2),
    "oracle": dict(budget=20),
    "streaming": dict(budget=32, sink=4),
    "h2o": dict(budget=32),
    "snapkv": dict(budget=40, window=8, kernel=3),
}
COMPRESSED = {"streaming", "h2o", "snapkv"}


@dataclass
class ApplyCall:
    layer: int
    q: torch.Tensor  # [B, H_kv, G, D]
    scale: float
    hist_k: torch.Tensor  # [B, H_kv, seen, D]: every token's K as first written, by original position
    hist_v: torch.Tensor
    pos: torch.Tensor  # [B, H_kv, L]: original position of each stored token
    selected: torch.Tensor  # [B, H_kv, L] bool: which stored tokens the Selection covers
    selection: Selection | None
    out: torch.Tensor
    stored_after: int


def selected_tokens(sel: Selection | None, shape, L: int) -> torch.Tensor:
    """Bool ``[B, H_kv, L]`` from a Selection, written out unit by unit (independent of hetmem's helpers)."""
    B, H = shape
    mask = torch.zeros(B, H, L, dtype=torch.bool)
    if sel is None:
        return mask | True
    assert sel.length == L, "a selection must cover the layer's stored tokens"
    P = sel.unit_size
    for b in range(B):
        for h in range(H):
            if sel.indices is not None:
                ids = sel.indices.expand(B, H, -1)[b, h].tolist()
                assert len(ids) == len(set(ids)), "duplicate unit ids in a selection"
            else:
                ids = sel.bitmap[b, h].nonzero().flatten().tolist()
            for u in ids:
                assert 0 <= u < sel.n_units
                mask[b, h, u * P : min((u + 1) * P, L)] = True
    return mask


class RecordingApply:
    """Wraps one layer's Apply step (same name and device); records each call, poisons what it must not read."""

    def __init__(self, inner, layer_idx: int, log: list):
        self.inner, self.layer, self.log = inner, layer_idx, log
        self.name, self.device = inner.name, inner.device
        self.hist_k = self.hist_v = self.pos = None
        self.seen = 0

    def apply(self, raw, selection, target):
        L, seen = raw.length, raw.seen
        B, H = raw.buf_k.shape[:2]
        k_now, v_now = raw.buf_k[:, :, :L].clone(), raw.buf_v[:, :, :L].clone()
        if self.hist_k is None:  # first decode call: the prompt is stored whole (nothing evicted in prefill)
            assert L == seen
            self.hist_k, self.hist_v = k_now.clone(), v_now.clone()
            self.pos = torch.arange(L).expand(B, H, L).clone()
        else:  # the tokens appended since the last call sit at the end of the stored ones
            new = seen - self.seen
            self.hist_k = torch.cat([self.hist_k, k_now[:, :, L - new :]], 2)
            self.hist_v = torch.cat([self.hist_v, v_now[:, :, L - new :]], 2)
            self.pos = torch.cat([self.pos, torch.arange(self.seen, seen).expand(B, H, new)], 2)
        self.seen = seen
        assert self.pos.shape[-1] == L
        idx = self.pos.unsqueeze(-1).expand(-1, -1, -1, k_now.shape[-1])
        # the stored K/V are exactly those first written at the tracked original positions
        assert torch.equal(k_now, self.hist_k.gather(2, idx)) and torch.equal(v_now, self.hist_v.gather(2, idx))

        sel_mask = selected_tokens(selection, (B, H), L)
        pos = self.pos
        poison = ~sel_mask
        raw.buf_k[:, :, :L][poison] = float("nan")
        raw.buf_v[:, :, :L][poison] = float("nan")
        out = self.inner.apply(raw, selection, target)
        assert torch.isfinite(out).all(), f"layer {self.layer}: Apply read a key or value it did not select"
        if raw.length == L:  # nothing evicted: put the unselected K/V back
            raw.buf_k[:, :, :L][poison] = k_now[poison]
            raw.buf_v[:, :, :L][poison] = v_now[poison]
        else:  # evicted: the stored tokens are now the kept ones (compacted in order, or h2o's moved in place)
            n = raw.length
            assert selection is not None and bool((sel_mask.sum(-1) == n).all())
            kept_pos = pos.masked_select(sel_mask).reshape(B, H, n)
            cand = self.hist_k.gather(2, kept_pos.unsqueeze(-1).expand(-1, -1, -1, k_now.shape[-1]))
            match = (raw.buf_k[:, :, :n].unsqueeze(3) == cand.unsqueeze(2)).all(-1)  # [B, H, slot, kept]
            assert bool((match.sum(-1) == 1).all()) and bool((match.sum(-2) == 1).all()), "not the kept tokens"
            self.pos = kept_pos.gather(2, match.int().argmax(-1))
            kept = self.pos.unsqueeze(-1).expand(-1, -1, -1, k_now.shape[-1])
            assert torch.equal(raw.buf_k[:, :, : raw.length], self.hist_k.gather(2, kept))
            assert torch.equal(raw.buf_v[:, :, : raw.length], self.hist_v.gather(2, kept))
        self.log.append(ApplyCall(self.layer, target.q.clone(), target.scale, self.hist_k, self.hist_v, pos,
                                  sel_mask, selection, out.clone(), raw.length))
        return out


def record(method):
    """Wrap ``method.pipeline`` so that every layer's Apply step is a RecordingApply; returns the call log."""
    log: list[ApplyCall] = []
    make = method.pipeline

    def pipeline(device, timer, layer_idx: int = 0):
        pipe = make(device, timer, layer_idx=layer_idx)
        pipe.apply = RecordingApply(pipe.apply, layer_idx, log)
        return pipe

    method.pipeline = pipeline
    return log


def reference(call: ApplyCall, masked: bool = True) -> torch.Tensor:
    """Float64 attention of the query over every token seen, masked to the selected ones (by original position)."""
    q, k, v = call.q.double(), call.hist_k.double(), call.hist_v.double()
    logits = (q @ k.transpose(-1, -2)) * call.scale  # [B, H_kv, G, seen]
    if masked:
        allowed = torch.zeros(k.shape[:3], dtype=torch.bool)
        allowed.scatter_(2, call.pos, call.selected)
        logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    return torch.softmax(logits, -1) @ v


def build(name: str):
    params = dict(METHODS[name])
    return get_method(name.split("-")[0], **params)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


def prompt(n=PROMPT, seed=5):
    return torch.randint(3, 100, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(METHODS))
def test_apply_is_dense_attention_over_exactly_the_selection(model, name):
    method = build(name)
    log = record(method)
    res = generate(model, prompt(), method, NEW, progress=False, prefill_chunk=CHUNK)
    n_layers = model.config.num_hidden_layers
    assert len(res.token_ids) == NEW
    assert len(log) == (NEW - 1) * n_layers  # one Apply per layer per decode step, none in prefill
    evictions, differs = 0, 0.0
    for call in log:
        L = call.pos.shape[-1]
        assert torch.isfinite(call.out).all(), f"{name}: Apply read a K/V it did not select"
        ref = reference(call)
        torch.testing.assert_close(call.out.double(), ref, rtol=1e-6, atol=1e-6)
        differs = max(differs, float((ref - reference(call, masked=False)).abs().max()))
        n_sel = call.selected.sum(-1)
        if name in COMPRESSED:
            if call.selection is not None:
                evictions += 1
                assert call.stored_after == METHODS[name]["budget"] < L
            assert call.stored_after <= METHODS[name]["budget"] + NEW
        else:  # a real selection every step: fewer tokens than stored (the no-gather fast path is not taken)
            assert call.selection is not None and bool((n_sel < L).all()), (name, n_sel.tolist(), L)
    assert differs > 1e-3  # the restriction matters: attending to everything would fail the comparison
    if name in COMPRESSED:
        assert evictions >= n_layers  # every layer evicted at least once
    if name == "seer-threshold":  # the bitmap holds ranked blocks besides the sink and the recent ones
        assert any(bool(c.selection.bitmap[..., 1:-1].any()) for c in log)
    if name in ("quest", "seer-topk"):  # exactly the budget in pages: sink, 2 ranked, and the partial recent
        P, bp = METHODS[name]["page_size"], METHODS[name]["budget"] // METHODS[name]["page_size"]
        for call in log:
            L = call.pos.shape[-1]
            assert bool((call.selected.sum(-1) == (bp - 1) * P + (L - (-(-L // P) - 1) * P)).all())
    if name in ("oracle", "dsa"):
        assert all(bool((c.selected.sum(-1) == METHODS[name]["budget"]).all()) for c in log)


def kept_positions(log, n_layers):
    """Per layer: the original positions SnapKV kept at its one eviction."""
    first = {}
    for c in log:
        if c.selection is not None and c.layer not in first:
            first[c.layer] = c.pos.gather(2, c.selection.indices)
    assert sorted(first) == list(range(n_layers))
    return [first[i] for i in range(n_layers)]


@pytest.mark.parametrize("n,chunk", [(98, 96), (97, 96), (100, 48), (75, 16)])
def test_snapkv_observation_window_spans_prefill_chunks(model, n, chunk):
    """The last ``window`` prompt queries vote, however the prefill is chunked: the kept tokens and the
    generation equal a single-chunk prefill's (the prompt length is not a multiple of the chunk)."""
    ids = prompt(n, seed=n)
    runs = []
    for c in (4096, chunk):
        method = get_method("snapkv", budget=48, window=32, kernel=7)
        log = record(method)
        res = generate(model, ids, method, NEW, progress=False, prefill_chunk=c, keep_logits=True)
        runs.append((res, kept_positions(log, model.config.num_hidden_layers)))
    (one, kept_one), (chunked, kept_chunked) = runs
    for a, b in zip(kept_one, kept_chunked):
        assert torch.equal(a, b)
    assert one.token_ids == chunked.token_ids
    for a, b in zip(one.logits, chunked.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_one_token_last_prefill_chunk_is_prefill(model):
    """A prompt one token longer than a multiple of the chunk: its last token is prefilled densely (no
    selection runs in prefill), exactly as in a single-chunk prefill."""
    ids = prompt(49, seed=1)
    runs = [generate(model, ids, get_method("quest", budget=16, page_size=8, dense_layers=0), 3, progress=False,
                     prefill_chunk=c, keep_logits=True) for c in (4096, 48)]
    for res in runs:
        steps = res.timer.summary()
        assert steps["relevancy"]["phases"].get("prefill", {}).get("calls", 0) == 0
        assert steps["relevancy"]["phases"]["decode"]["calls"] == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(runs[0].logits[0], runs[1].logits[0], rtol=1e-4, atol=1e-4)
