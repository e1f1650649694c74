"""kvquant after KIVI: packed 2/4/8-bit codes, keys per channel, values per token, an exact recent tail,
block-by-block dequantisation inside attention (bounded extra memory), opt-in error measurement."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.core.pipeline import MemoryPipeline
from hetmem.llm.generate import generate
from hetmem.llm.quant_cache import QuantKVLayer
from hetmem.methods import get_method
from hetmem.methods.kvquant import BlockDequantAttention, KiviPrepare
from hetmem.ops.quant import (dequantize_channels, dequantize_groups, pack_codes, peak_allocated_bytes,
                              quantize_channels, quantize_channels_reference, quantize_groups, quantize_reference,
                              quantized_attention_reference, quantized_decode_attention, unpack_codes)
from hetmem.testing import tiny_model

SETTINGS = settings(max_examples=30, deadline=None)
bits_st = st.sampled_from([2, 4, 8])


@SETTINGS
@given(bits_st, st.integers(1, 4), st.integers(0, 10**6))
def test_pack_round_trip_and_size(bits, n, seed):
    D = 8 * n
    codes = torch.randint(0, 2**bits, (2, 3, D), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == D * bits // 8  # really bits/8 bytes per value
    assert torch.equal(unpack_codes(packed, bits), codes)


@SETTINGS
@given(bits_st, st.sampled_from([2, 4, 8]), st.integers(1, 3), st.integers(0, 10**6))
def test_quantisers_match_loop_references(bits, g, ngroups, seed):
    x = torch.randn(1, 2, g * ngroups, 16, generator=torch.Generator().manual_seed(seed)) * 3
    kc, ks, kz = quantize_channels(x, bits, g)  # per channel over g tokens
    assert ks.shape == (1, 2, ngroups, 16) and ks.dtype == torch.float16
    torch.testing.assert_close(dequantize_channels(kc, ks, kz, bits, g), quantize_channels_reference(x, bits, g),
                               rtol=1e-5, atol=1e-5)
    vc, vs, vz = quantize_groups(x, bits, g)  # per token over g channels
    assert vs.shape == (1, 2, g * ngroups, 16 // g)
    torch.testing.assert_close(dequantize_groups(vc, vs, vz, bits, g), quantize_reference(x, bits, g),
                               rtol=1e-5, atol=1e-5)
    # every value is within half a step of its group (plus the fp16 rounding of zero and scale)
    step = ks.float().repeat_interleave(g, -2)
    assert ((dequantize_channels(kc, ks, kz, bits, g) - x).abs() <= 0.5 * step + 1e-2 * x.abs().amax()).all()


@SETTINGS
@given(bits_st, st.sampled_from([4, 8]), st.integers(0, 6), st.integers(0, 9), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 40), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 10**6))
def test_blockwise_attention_matches_plain_reference(bits, g, nq_groups, tail, block_groups, G, start, mla, softcap,
                                                     sinks, seed):
    """Any split into quantised part and tail, any window start (inside either), MLA's value-from-key,
    soft-capping and attention sinks: equal to the plain float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    nq = nq_groups * g
    L = nq + tail + 1
    start = start % L
    q, k, v = (torch.randn(1, 2, G, 16, generator=gen), torch.randn(1, 2, L, 16, generator=gen),
               torch.randn(1, 2, L, 16, generator=gen))
    cap = 2.0 if softcap else None
    sk = torch.randn(2, G, generator=gen) if sinks else None
    kc, ks, kz = quantize_channels(k[:, :, :nq], bits, g)
    if mla:  # the value is the keys' first 12 channels; no value codes
        vc = vs = vz = None
        v_tail, v_ref = k[:, :, nq:, :12], 12
    else:
        vc, vs, vz = quantize_groups(v[:, :, :nq], bits, g)
        v_tail, v_ref = v[:, :, nq:], v
    out = quantized_decode_attention(q, kc, ks, kz, vc, vs, vz, nq, k[:, :, nq:], v_tail, bits, g, 0.3,
                                     block=block_groups * g, start=start, softcap=cap, sinks=sk)
    ref = quantized_attention_reference(q, k, v_ref, nq, bits, g, 0.3, start=start, softcap=cap, sinks=sk)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def _layer(bits, g, residual, reserve=0, **kw):
    pipe = MemoryPipeline(KiviPrepare(bits, g, residual), None, None, BlockDequantAttention(block=2 * g))
    return QuantKVLayer(pipeline=pipe, reserve_tokens=reserve, **kw)


@SETTINGS
@given(bits_st, st.sampled_from([4, 8]), st.integers(0, 20), st.lists(st.integers(1, 23), min_size=1, max_size=6),
       st.integers(0, 10**6))
def test_cache_keeps_an_exact_tail_and_quantises_whole_groups(bits, g, residual, chunks, seed):
    """Any sequence of appends: the first tokens are quantised in whole groups exactly as the reference
    round trip; the last ``residual`` .. ``residual + g - 1`` stay exact; prefill gets the whole context."""
    gen = torch.Generator().manual_seed(seed)
    layer = _layer(bits, g, residual, reserve=7)
    ks, vs = [], []
    for n in chunks:
        k, v = torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
        nq_before = layer.memory.meta["n_quant"] if layer.memory is not None else 0
        ck, cv = layer.update(k, v)
        ks.append(k)
        vs.append(v)
        if n > 1:  # prefill: the quantised part dequantised, the exact tail and the new chunk as they are
            K, V = torch.cat(ks, 2), torch.cat(vs, 2)
            assert ck.shape == K.shape and cv.shape == V.shape
            torch.testing.assert_close(ck[:, :, nq_before:], K[:, :, nq_before:])
            torch.testing.assert_close(cv[:, :, nq_before:], V[:, :, nq_before:])
            if nq_before:
                torch.testing.assert_close(ck[:, :, :nq_before],
                                           quantize_channels_reference(K[:, :, :nq_before], bits, g), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cv[:, :, :nq_before], quantize_reference(V[:, :, :nq_before], bits, g),
                                           rtol=1e-5, atol=1e-5)
    K, V = torch.cat(ks, 2), torch.cat(vs, 2)
    L = K.shape[2]
    meta, t = layer.memory.meta, layer.memory.tensors
    nq, r = meta["n_quant"], meta["tail"]
    assert nq + r == L and nq == max(0, (L - residual) // g * g)  # whole groups; residual <= r < residual + g
    torch.testing.assert_close(t["k_tail"][:, :, :r], K[:, :, nq:])
    torch.testing.assert_close(t["v_tail"][:, :, :r], V[:, :, nq:])
    if nq:
        kh = dequantize_channels(t["k_codes"][:, :, :nq], t["k_scale"][:, :, : nq // g], t["k_zero"][:, :, : nq // g],
                                 bits, g)
        vh = dequantize_groups(t["v_codes"][:, :, :nq], t["v_scale"][:, :, :nq], t["v_zero"][:, :, :nq], bits, g)
        torch.testing.assert_close(kh, quantize_channels_reference(K[:, :, :nq], bits, g), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vh, quantize_reference(V[:, :, :nq], bits, g), rtol=1e-5, atol=1e-5)
    # storage: packed codes of bits/8 bytes per element, fp16 scale+zero, the exact tail buffer
    cap = t["k_codes"].shape[2]
    assert layer.kv_nbytes() == (2 * 2 * cap * 8 * bits // 8 + 2 * 2 * (cap // g) * 8 * 2 + 2 * 2 * cap * (8 // g) * 2
                                 + 2 * 2 * (residual + g) * 8 * 4)


def _round_trip(K, V, nq, bits, g):
    """K/V as the cache holds them: the first ``nq`` tokens quantised (keys per channel, values per token)."""
    K, V = K.clone(), V.clone()
    if nq == 0:
        return K, V
    K[:, :, :nq] = quantize_channels_reference(K[:, :, :nq], bits, g)
    V[:, :, :nq] = quantize_reference(V[:, :, :nq], bits, g)
    return K, V


@pytest.mark.parametrize("residual", [0, 5])
def test_sliding_window_layer_sees_transformers_window_and_drops_quantised_groups(residual):
    """A window layer: mask sizes and the keys a prefill chunk sees are transformers' DynamicSlidingWindowLayer's
    (dequantised where quantised), decode attends over the last W tokens only, and the quantised groups that
    fell out of the window are dropped (memory stays bounded)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from hetmem.core.types import DecodeTarget

    W, g, bits = 12, 4, 8
    layer = _layer(bits, g, residual, reserve=1000, sliding_window=W)
    ref = DynamicSlidingWindowLayer(W)
    gen = torch.Generator().manual_seed(0)
    keys, vals = torch.randn(1, 2, 100, 8, generator=gen), torch.randn(1, 2, 100, 8, generator=gen)
    spans = [(0, 7), (7, 30), (30, 31), (31, 50)] + [(t, t + 1) for t in range(50, 100)]
    dropped = 0
    for s, e in spans:
        assert layer.get_mask_sizes(e - s) == ref.get_mask_sizes(e - s)
        nq_abs = (layer.memory.meta["n_quant"] if layer.memory is not None else 0) + dropped
        k, v = layer.update(keys[:, :, s:e], vals[:, :, s:e])
        k_ref, v_ref = ref.update(keys[:, :, s:e], vals[:, :, s:e])
        if e - s > 1:  # prefill: the keys transformers' window layer shows, as the cache holds them
            K, V = _round_trip(keys[:, :, :e], vals[:, :, :e], nq_abs, bits, g)
            n = k_ref.shape[2]
            torch.testing.assert_close(k, K[:, :, e - n :], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, V[:, :, e - n :], rtol=1e-5, atol=1e-5)
        dropped = e - layer.length
        assert dropped % g == 0 and layer.length <= W + layer._trim_slack() + residual + g + (e - s)
        mem = layer.memory
        assert mem.meta["window_start"] == max(0, layer.length - W)
        if e - s == 1:  # decode: attention over exactly the last W tokens
            q = torch.randn(1, 2, 2, 8, generator=gen)
            K, V = _round_trip(keys[:, :, :e], vals[:, :, :e], mem.meta["n_quant"] + dropped, bits, g)
            want = torch.softmax(q.double() @ K[:, :, e - W : e].double().transpose(-1, -2) * 0.3, -1) @ V[:, :, e - W : e].double()
            out = layer.pipeline.apply.apply(layer, None, DecodeTarget(q=q, scale=0.3))
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert dropped > 0
    assert layer.capacity <= 2 * (W + layer._trim_slack() + layer.page_size + g)


def test_mla_latent_is_quantised_once():
    """An MLA layer stores the latent ``c_kv ++ k_rope`` once, as a key: no value codes or value tail, the value
    handed back (prefill) is the dequantised key's ``c_kv`` prefix."""
    layer = _layer(4, 4, 3, mla_rank=12)
    gen = torch.Generator().manual_seed(2)
    c_kv, k_rope = torch.randn(1, 1, 20, 12, generator=gen), torch.randn(1, 1, 20, 4, generator=gen)
    layer.update(c_kv[:, :, :13], k_rope[:, :, :13])
    nq = layer.memory.meta["n_quant"]  # 13 = 8 quantised + 5 exact (3 <= 5 < 3 + 4)
    a, b = layer.update(c_kv[:, :, 13:], k_rope[:, :, 13:])
    t = layer.memory.tensors
    assert set(t) == {"k_codes", "k_scale", "k_zero", "k_tail"}
    assert nq == 8 and layer.memory.meta["n_quant"] == 16 and t["k_codes"].shape[-1] == 16 * 4 // 8
    lat = quantize_channels_reference(torch.cat([c_kv, k_rope], -1)[:, :, :nq], 4, 4)
    torch.testing.assert_close(a[:, :, :nq], lat[..., :12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[:, :, :nq], lat[..., 12:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[:, :, nq:], c_kv[:, :, nq:])


def test_prefill_context_is_dequantised_prefix_plus_exact_tail_and_chunk():
    layer = _layer(4, 4, 6)
    gen = torch.Generator().manual_seed(3)
    k1, v1 = torch.randn(1, 2, 13, 8, generator=gen), torch.randn(1, 2, 13, 8, generator=gen)
    layer.update(k1, v1)
    assert layer.memory.meta["n_quant"] == 4  # 13 = 4 quantised + 9 exact (6 <= 9 < 6 + 4)
    k2, v2 = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    ck, cv = layer.update(k2, v2)
    torch.testing.assert_close(ck[:, :, :4], quantize_channels_reference(k1[:, :, :4], 4, 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cv[:, :, :4], quantize_reference(v1[:, :, :4], 4, 4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ck[:, :, 4:], torch.cat([k1[:, :, 4:], k2], 2))
    torch.testing.assert_close(cv[:, :, 4:], torch.cat([v1[:, :, 4:], v2], 2))


def test_decode_attention_extra_memory_is_one_block_not_the_cache():
    """Measured with the allocator's events: attending over 16k quantised tokens allocates about one block's
    float K and V, far below one float copy of the cache (what dequantising the whole cache would cost)."""
    B, H, G, D, L, g, block = 1, 2, 7, 64, 16384, 32, 512
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    kc, ks, kz = quantize_channels(k, 4, g)
    vc, vs, vz = quantize_groups(v, 4, g)
    q, tail = torch.randn(B, H, G, D, generator=gen), torch.zeros(B, H, 0, D)
    del k, v
    _, peak = peak_allocated_bytes(quantized_decode_attention, q, kc, ks, kz, vc, vs, vz, L, tail, tail, 4, g,
                                   0.125, block=block)
    one_block = 2 * B * H * block * D * 4  # float32 K and V of one block
    full_copy = 2 * B * H * L * D * 4
    assert peak < 3 * one_block < full_copy / 8
    # the whole-cache dequantisation this replaces really costs a full copy (the measurement can tell)
    _, peak_full = peak_allocated_bytes(lambda: (dequantize_channels(kc, ks, kz, 4, g), dequantize_groups(vc, vs, vz, 4, g)))
    assert peak_full >= full_copy


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 100), generator=torch.Generator().manual_seed(7))
    dense = generate(model, ids, get_method("dense"), 8, progress=False, keep_logits=True)
    return model, ids, dense


def test_residual_covering_the_context_is_exactly_dense(tiny):
    model, ids, dense = tiny
    res = generate(model, ids, get_method("kvquant", bits=2, group_size=8, residual=200), 8, progress=False,
                   keep_logits=True, prefill_chunk=32)
    assert res.token_ids == dense.token_ids and res.memory["tokens_quantized"] == 0
    for a, b in zip(res.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,k_err,logit_err", [(8, 0.01, 0.005), (4, 0.1, 0.03), (2, 0.4, 0.15)])
def test_quantised_run_is_close_to_dense_and_memory_shrinks(tiny, bits, k_err, logit_err):
    model, ids, dense = tiny
    res = generate(model, ids, get_method("kvquant", bits=bits, group_size=8, residual=16, measure_error=1), 8,
                   progress=False, keep_logits=True)
    mem = res.memory
    # 100 prompt + 7 decoded tokens stored: 88 quantised (whole groups of 8), the last 19 exact (16 <= 19 < 24)
    assert (mem["tokens_quantized"], mem["tokens_full_precision"]) == (88, 19)
    rel = mem["kv_quant_rel_error"]
    assert 0 < rel["k"] < k_err and 0 < rel["v"] < k_err
    # the prompt is one prefill chunk, attended in full precision: the first token's logits are dense's
    torch.testing.assert_close(res.logits[0], dense.logits[0], rtol=1e-5, atol=1e-5)
    n = next((i for i, (a, b) in enumerate(zip(res.token_ids, dense.token_ids)) if a != b), len(res.token_ids))
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(res.logits[: n + 1], dense.logits[: n + 1]))
    assert 0 < err < logit_err  # approximate, close to dense (compared up to the first differing token)
    assert mem["kv_bytes"] < dense.memory["kv_bytes"]


def test_error_measurement_is_opt_in_and_outside_the_timed_steps(tiny, monkeypatch):
    from hetmem.core import timer as timer_mod

    model, ids, _ = tiny
    calls = []
    orig = KiviPrepare.measure

    def spy(self, memory):
        calls.append(timer_mod._ACTIVE.get())  # the step being timed right now, if any
        return orig(self, memory)

    monkeypatch.setattr(KiviPrepare, "measure", spy)
    res = generate(model, ids, get_method("kvquant", group_size=8, residual=16), 4, progress=False)
    assert calls == [] and "kv_quant_rel_error" not in res.memory and "measure_ms" not in res.memory
    res = generate(model, ids, get_method("kvquant", group_size=8, residual=16, measure_error=1), 4, progress=False)
    assert calls and all(c is None for c in calls)  # measured, never inside a timed step
    assert res.memory["kv_quant_rel_error"]["k"] > 0 and res.memory["measure_ms"] >= 0


@pytest.mark.parametrize("params,word", [({"bits": 3}, "--bits"), ({"residual": -1}, "--residual"),
                                         ({"measure_error": 2}, "--measure-error"), ({"group_size": 3}, "--group-size")])
def test_bad_parameters_are_one_line_errors(params, word):
    from hetmem.errors import HetmemError

    with pytest.raises(HetmemError, match=word):
        get_method("kvquant", **params)
