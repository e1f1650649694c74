"""Kernels of issue 6's methods against plain reference implementations."""

import pytest
import torch

from hetmem.core.types import Selection
from hetmem.ops.attention_mass import attention_probs, selection_recall, selection_recall_reference, selection_token_mask
from hetmem.ops.block_pool import block_counts, block_mean, gated_block_scores, gated_block_scores_reference, update_block_sums
from hetmem.ops.evict import attention_column_mass, attention_column_mass_reference, keep_indices
from hetmem.ops.index_score import index_scores, index_scores_all, index_scores_reference
from hetmem.ops.quant import dequantize_groups, quantize_groups, quantize_reference
from hetmem.ops.token_gather import bitmap_to_padded, gather_tokens, gather_tokens_reference, unit_token_ids


@pytest.mark.parametrize("L", [1, 15, 16, 37])
def test_block_sums_prefill_then_decode_match_block_mean(L):
    torch.manual_seed(L)
    P, keys = 8, torch.randn(2, 3, 50, 5)
    sums = torch.zeros(2, 3, 7, 5)
    update_block_sums(sums, keys, 0, L, P)
    for t in range(L, L + 9):  # decode tokens one at a time
        update_block_sums(sums, keys, t, t + 1, P)
    n = -(-(L + 9) // P)
    mean = sums[:, :, :n] / block_counts(n, L + 9, P)[:, None]
    torch.testing.assert_close(mean, block_mean(keys[:, :, : L + 9], P), rtol=1e-5, atol=1e-5)


def test_gated_scores_match_reference():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 3, 11, 8)
    torch.testing.assert_close(gated_block_scores(q, k, 0.3), gated_block_scores_reference(q, k, 0.3))


def test_index_scores_match_reference():
    torch.manual_seed(0)
    q, w, k = torch.randn(2, 4, 8), torch.randn(2, 4), torch.randn(2, 13, 8)
    torch.testing.assert_close(index_scores(q, w, k), index_scores_reference(q, w, k), rtol=1e-5, atol=1e-5)
    # the all-positions form used in training agrees with the decode form row by row
    qa, wa = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4)
    full = index_scores_all(qa, wa, k[:1])
    for t in range(5):
        torch.testing.assert_close(full[:, t], index_scores(qa[:, t], wa[:, t], k[:1]), rtol=1e-5, atol=1e-5)


def test_gather_tokens_and_padded_bitmap():
    buf, idx = torch.randn(2, 3, 20, 4), torch.randint(0, 20, (2, 3, 6))
    torch.testing.assert_close(gather_tokens(buf, idx), gather_tokens_reference(buf, idx))
    bitmap = torch.tensor([[[1, 0, 1, 1], [0, 1, 0, 0]]], dtype=torch.bool)
    units, valid = bitmap_to_padded(bitmap)
    assert units[0, 0].tolist() == [0, 2, 3] and valid[0, 0].tolist() == [True, True, True]
    assert units[0, 1, 0] == 1 and valid[0, 1].tolist() == [True, False, False]
    tok, tvalid = unit_token_ids(units, 4, 14, valid)  # 14 tokens: the last unit holds 2
    assert tok[0, 0][tvalid[0, 0]].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13]
    assert tok[0, 1][tvalid[0, 1]].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("bits", [4, 8])
def test_group_quantisation_matches_reference_and_packs(bits):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 5, 32)
    codes, scale, zero = quantize_groups(x, bits, 16)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    assert scale.dtype == torch.float16 and scale.shape[-1] == 2
    xh = dequantize_groups(codes, scale, zero, bits, 16)
    torch.testing.assert_close(xh, quantize_reference(x, bits, 16), rtol=1e-4, atol=1e-4)
    # error is within half a quantisation step (plus fp16 rounding of scale/zero)
    step = scale.float().repeat_interleave(16, -1)
    assert ((xh - x).abs() <= 0.5 * step + 2e-2).all()
    rel = ((xh - x).norm() / x.norm()).item()
    assert rel < (0.1 if bits == 4 else 0.01)


def test_attention_column_mass_matches_reference():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 3, 5, 8), torch.randn(1, 2, 12, 8)
    for pos0 in (None, 7):
        torch.testing.assert_close(attention_column_mass(q, k, 0.35, pos0, chunk=2),
                                   attention_column_mass_reference(q, k, 0.35, pos0), rtol=1e-5, atol=1e-5)
    # causal: each query spreads exactly its 1.0 of mass per group head
    m = attention_column_mass(q, k, 0.35, 7)
    torch.testing.assert_close(m.sum(-1), torch.full((1, 2), 15.0))


def test_keep_indices_sink_topk_recent():
    scores = torch.tensor([[[0.0, 5.0, 1.0, 4.0, 0.0]]])  # candidates are tokens 2..6 of 10 (sink 2, recent 3)
    keep = keep_indices(scores, 10, 7, 2, 3, (1, 1))
    assert keep[0, 0].tolist() == [0, 1, 3, 5, 7, 8, 9]
    assert keep_indices(None, 10, 6, 2, 4, (1, 1))[0, 0].tolist() == [0, 1, 6, 7, 8, 9]
    assert keep_indices(None, 5, 6, 2, 4, (1, 1))[0, 0].tolist() == [0, 1, 2, 3, 4]


def test_recall_matches_reference_and_oracle_is_one():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 40, 8)
    probs = attention_probs(q, k, 0.5)
    mask = torch.rand(1, 2, 40) < 0.3
    torch.testing.assert_close(selection_recall(probs, mask), selection_recall_reference(probs, mask))
    oracle = probs.mean(2).topk(10, -1).indices
    sel = Selection(indices=oracle, n_units=40, unit_size=1, length=40)
    r = selection_recall(probs, selection_token_mask(sel, (1, 2)))
    torch.testing.assert_close(r, torch.ones(1, 2))
    # a page selection is expanded to its tokens, the partial last page clipped to the length
    sel = Selection(indices=torch.tensor([[[0, 4]]]).expand(1, 2, 2), n_units=5, unit_size=8, length=35)
    tm = selection_token_mask(sel, (1, 2))
    assert tm.shape == (1, 2, 35) and tm.sum().item() == 2 * (8 + 3)
