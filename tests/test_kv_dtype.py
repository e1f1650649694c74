"""``--kv-dtype``: the KV cache stored in bf16/fp16 under a float32 model, attention accumulating in float32.

Stated tolerance: with K/V rounded to 16 bits (relative error 2^-8 for bf16, 2^-11 for fp16), every decode
step's logits stay within 5e-2 (bf16) / 1e-2 (fp16) of the float32 cache's, absolute, on a tiny random model;
and the attention itself is exact (1e-5) against float32 attention over the same rounded K/V."""

import pytest
import torch

from hetmem.errors import HetmemError
from hetmem.llm.generate import generate
from hetmem.methods import get_method
from hetmem.ops import fast
from hetmem.ops.sparse_attention import dense_decode_attention, grouped_decode_attention
from hetmem.testing import tiny_model

TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _ids(n=96):
    return torch.randint(4, 120, (1, n), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["dense", "quest"])
def test_low_precision_kv_matches_float32_within_tolerance(model, kv, method):
    m = (lambda: get_method("quest", budget=32, page_size=8, dense_layers=1)) if method == "quest" else \
        (lambda: get_method("dense"))
    ref = generate(model, _ids(), m(), 6, progress=False, keep_logits=True, prefill_chunk=40)
    got = generate(model, _ids(), m(), 6, progress=False, keep_logits=True, prefill_chunk=40, kv_dtype=kv)
    assert got.memory["kv_bytes"] * 2 == ref.memory["kv_bytes"]  # half the bytes held (and read)
    assert got.token_ids == ref.token_ids
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max().item() < TOL[kv]


@pytest.mark.parametrize("kv", [torch.bfloat16, torch.float16])
def test_dense_decode_attention_reads_16_bit_kv_exactly(kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 64, generator=g)
    k, v = torch.randn(1, 2, 80, 64, generator=g).to(kv), torch.randn(1, 2, 80, 64, generator=g).to(kv)
    got = dense_decode_attention(q, k, v, 5, 77, 16, 0.125)
    ref = grouped_decode_attention(q, k[:, :, 5:77].float(), v[:, :, 5:77].float(), 0.125)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5)


def test_kv_dtype_refused_where_unsupported(model):
    with pytest.raises(HetmemError, match="not 'h2o'"):
        generate(model, _ids(), get_method("h2o"), 2, progress=False, kv_dtype=torch.bfloat16)
    generate(model, _ids(), get_method("h2o"), 2, progress=False, kv_dtype=torch.float32)  # the model's: fine
    assert fast.backend()  # said either way
