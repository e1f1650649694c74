"""Ops for a quantised KV cache after KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache", ICML 2024, arXiv 2402.02750; reference code https://github.com/jy-yuan/KIVI).

Asymmetric (min/max) integer codes with an fp16 scale and zero per group:

* values are quantised **per token**: groups of ``group_size`` channels of one token share a scale and zero
  (:func:`quantize_groups`);
* keys are quantised **per channel**: each channel of a block of ``group_size`` consecutive tokens shares a
  scale and zero (:func:`quantize_channels`), because key outliers sit in fixed channels (KIVI, section 3).

Codes of 2, 4 or 8 bits are packed ``8 // bits`` to a byte along the channel dimension, so ``D`` values take
``D * bits / 8`` bytes (plus the scales). :func:`quantized_decode_attention` attends a decode query over the
quantised part and a full-precision tail block by block with an online softmax (as in FlashAttention /
flash-decoding), dequantising one block at a time: no full-precision copy of the cache is ever made, the
extra memory is one block's K and V.

Plain loop references (``*_reference``) exist for tests.
"""

from __future__ import annotations

import torch

BITS = (2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` (each < 2**bits) -> ``[..., D * bits / 8]``, ``p = 8 // bits`` codes per byte.

    Planar layout: with ``w = D / p``, byte ``j`` holds codes ``j, j + w, ..., j + (p-1) w`` (the first in
    the lowest bits), so unpacking writes ``p`` contiguous slices with scalar shifts (fast on CPU)."""
    _check_bits(bits)
    if bits == 8:
        return codes
    per = 8 // bits
    w = codes.shape[-1] // per
    out = codes[..., :w].clone()
    for i in range(1, per):
        out |= codes[..., i * w : (i + 1) * w] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, dtype=torch.uint8, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., D * bits / 8]`` -> ``[..., D]`` codes as ``dtype``, written into
    ``out`` when given (e.g. a reused float buffer: no allocation beyond one byte-sized temporary)."""
    _check_bits(bits)
    if out is None:
        out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 8 // bits, dtype=dtype, device=packed.device)
    if bits == 8:
        return out.copy_(packed)
    per, mask = 8 // bits, 2**bits - 1
    w = packed.shape[-1]
    torch.bitwise_and(packed, mask, out=out[..., :w])
    tmp = torch.empty_like(packed) if per > 2 else None
    for i in range(1, per - 1):
        torch.bitwise_right_shift(packed, bits * i, out=tmp)
        torch.bitwise_and(tmp, mask, out=out[..., i * w : (i + 1) * w])
    torch.bitwise_right_shift(packed, bits * (per - 1), out=out[..., (per - 1) * w :])  # the top code needs no mask
    return out


def _minmax_codes(x: torch.Tensor, dim: int, bits: int):
    """Asymmetric codes of ``x`` (float32) with scale and zero reduced over ``dim`` (kept as size 1)."""
    zero = x.amin(dim, keepdim=True).to(torch.float16)
    scale = ((x.amax(dim, keepdim=True) - zero.float()) / (2**bits - 1)).to(torch.float16)
    s = scale.float().clamp(min=1e-8)
    codes = ((x - zero.float()) / s).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, zero


def quantize_groups(x: torch.Tensor, bits: int, group_size: int):
    """Per-token groups (KIVI's values): ``x [..., D]`` -> (packed codes uint8 ``[..., D*bits/8]``,
    scale fp16 ``[..., D/g]``, zero fp16 ``[..., D/g]``)."""
    _check_bits(bits)
    *lead, D = x.shape
    g = x.float().reshape(*lead, D // group_size, group_size)
    codes, scale, zero = _minmax_codes(g, -1, bits)
    return pack_codes(codes.reshape(*lead, D), bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (up to rounding): ``[..., D]`` in ``dtype``."""
    c = unpack_codes(codes, bits, torch.float32)
    *lead, D = c.shape
    g = c.reshape(*lead, D // group_size, group_size)
    x = torch.addcmul(zero.float().unsqueeze(-1), g, scale.float().unsqueeze(-1))
    return x.reshape(*lead, D).to(dtype)


def quantize_channels(x: torch.Tensor, bits: int, group_size: int):
    """Per-channel groups over tokens (KIVI's keys): ``x [..., T, D]`` with ``T`` a multiple of ``group_size``
    -> (packed codes uint8 ``[..., T, D*bits/8]``, scale fp16 ``[..., T/g, D]``, zero fp16 ``[..., T/g, D]``)."""
    _check_bits(bits)
    *lead, T, D = x.shape
    if T % group_size:
        raise ValueError(f"{T} tokens are not whole groups of {group_size}")
    g = x.float().reshape(*lead, T // group_size, group_size, D)
    codes, scale, zero = _minmax_codes(g, -2, bits)
    return pack_codes(codes.reshape(*lead, T, D), bits), scale.squeeze(-2), zero.squeeze(-2)


def dequantize_channels(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                        dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_channels`: ``[..., T, D]`` in ``dtype``."""
    c = unpack_codes(codes, bits, torch.float32)
    *lead, T, D = c.shape
    g = c.reshape(*lead, T // group_size, group_size, D)
    x = torch.addcmul(zero.float().unsqueeze(-2), g, scale.float().unsqueeze(-2))
    return x.reshape(*lead, T, D).to(dtype)


def _online_update(logits, v, m, l, acc):
    """Fold one block (``logits [B, H, G, n]``, values ``v [B, H, n, Dv]``) into an online softmax (float32
    running max ``m``, sum ``l`` and output ``acc``)."""
    m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
    p = torch.exp(logits - m_new)
    corr = torch.exp(m - m_new)
    l = l * corr + p.sum(-1, keepdim=True)
    acc = acc * corr + torch.matmul(p, v)
    return m_new, l, acc


def quantized_decode_attention(q: torch.Tensor, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_quant: int,
                               k_tail: torch.Tensor, v_tail: torch.Tensor, bits: int, group_size: int, scale: float,
                               block: int = 1024, *, start: int = 0, softcap: float | None = None,
                               sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of ``q [B, H_kv, G, Dk]`` over ``n_quant`` quantised tokens followed by a full-precision
    tail ``k_tail [B, H_kv, r, Dk]``, ``v_tail [B, H_kv, r, Dv]`` (GQA: K/V are never repeated).

    The quantised part is read ``block`` tokens at a time (a multiple of ``group_size``) with an online
    softmax. Each block is unpacked and dequantised in place into float buffers of ``block`` tokens,
    allocated once per call and reused: the extra memory is bounded by the block, not the context.
    Computed in float32.

    * ``start``: the first stored token attended (a sliding window that has moved past the older ones);
    * ``v_codes is None``: the values are the first ``Dv`` channels of the keys (MLA's latent ``c_kv``, stored
      and quantised once, as the key);
    * ``softcap`` / ``sinks [H_kv, G]``: as the model's eager attention (``ops.sparse_attention.decode_probs``).
    """
    if block % group_size:
        raise ValueError("block must be a multiple of group_size")
    g = group_size
    qf = q.float()
    B, H, G, Dk = q.shape
    Dv = v_tail.shape[-1]
    if sinks is None:
        m = torch.full((B, H, G, 1), float("-inf"), device=q.device)
        l = torch.zeros(B, H, G, 1, device=q.device)
    else:  # the sink logit sits in the softmax denominator from the start: exp(sink - m) = 1
        m = sinks.float().reshape(1, *sinks.shape, 1).expand(B, H, G, 1).clone()
        l = torch.ones(B, H, G, 1, device=q.device)
    acc = torch.zeros(B, H, G, Dv, device=q.device)
    s0 = min(start, n_quant) // g * g  # the quantised part is read from the group holding ``start``
    if n_quant > s0:
        n_buf = min(block, n_quant - s0)
        kbuf = torch.empty(B, H, n_buf, Dk, device=q.device)
        vbuf = torch.empty(B, H, n_buf, Dv, device=q.device) if v_codes is not None else None
    for s in range(s0, n_quant, block):
        e = min(n_quant, s + block)
        n, nb = e - s, (e - s) // g
        k = unpack_codes(k_codes[:, :, s:e], bits, out=kbuf[:, :, :n])
        kg = k.view(B, H, nb, g, Dk)  # keys: one scale/zero per channel per group of g tokens, in place
        torch.addcmul(k_zero[:, :, s // g : e // g].float().unsqueeze(3), kg,
                      k_scale[:, :, s // g : e // g].float().unsqueeze(3), out=kg)
        if v_codes is None:  # MLA: the value is the latent prefix of the key
            v = k[..., :Dv]
        else:
            v = unpack_codes(v_codes[:, :, s:e], bits, out=vbuf[:, :, :n])
            vg = v.view(B, H, n, Dv // g, g)  # values: one scale/zero per token per group of g channels, in place
            torch.addcmul(v_zero[:, :, s:e].float().unsqueeze(-1), vg, v_scale[:, :, s:e].float().unsqueeze(-1),
                          out=vg)
        if s < start:  # the first block begins before the window
            k, v = k[:, :, start - s :], v[:, :, start - s :]
        m, l, acc = _online_update(_logits(qf, k, scale, softcap), v, m, l, acc)
    t0 = max(0, start - n_quant)
    if k_tail.shape[2] > t0:
        logits = _logits(qf, k_tail[:, :, t0:].float(), scale, softcap)
        m, l, acc = _online_update(logits, v_tail[:, :, t0:].float(), m, l, acc)
    return (acc / l).to(q.dtype)


def _logits(qf: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    w = torch.matmul(qf, k.transpose(-1, -2)) * scale
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    return w


# -- references for tests -------------------------------------------------------------------------------------

def _round_trip(grp: torch.Tensor, levels: int) -> torch.Tensor:
    lo = grp.min().half().float()
    sc = ((grp.max() - lo) / levels).half().float()
    q = torch.clamp(torch.round((grp - lo) / max(float(sc), 1e-8)), 0, levels)
    return q * sc + lo


def quantize_reference(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-token quantise-dequantise round trip, one group at a time in plain Python loops (for tests)."""
    flat = x.float().reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    for r in range(flat.shape[0]):
        for s in range(0, flat.shape[1], group_size):
            out[r, s : s + group_size] = _round_trip(flat[r, s : s + group_size], 2**bits - 1)
    return out.reshape(x.shape)


def quantize_channels_reference(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-channel round trip of ``x [..., T, D]`` over blocks of ``group_size`` tokens, in plain loops."""
    T, D = x.shape[-2:]
    flat = x.float().reshape(-1, T, D)
    out = torch.empty_like(flat)
    for r in range(flat.shape[0]):
        for t in range(0, T, group_size):
            for d in range(D):
                out[r, t : t + group_size, d] = _round_trip(flat[r, t : t + group_size, d], 2**bits - 1)
    return out.reshape(x.shape)


def quantized_attention_reference(q, k_full, v_full, n_quant, bits, group_size, scale, start=0, softcap=None,
                                  sinks=None):
    """Plain reference: round-trip the first ``n_quant`` keys (per channel) and values (per token) of the
    full-precision ``k_full, v_full [B, H, L, D]`` (``v_full=None``: the value is the keys' first ``Dv``
    channels, MLA, given as an int), keep the rest exact, then softmax attention in float64 over tokens
    ``start:`` (soft-capped, with a sink logit in the denominator)."""
    k = k_full.double().clone()
    if n_quant:
        k[:, :, :n_quant] = quantize_channels_reference(k_full[:, :, :n_quant], bits, group_size).double()
    if isinstance(v_full, int):
        v = k[..., :v_full]
    else:
        v = v_full.double().clone()
        if n_quant:
            v[:, :, :n_quant] = quantize_reference(v_full[:, :, :n_quant], bits, group_size).double()
    w = (q.double() @ k[:, :, start:].transpose(-1, -2)) * scale
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    if sinks is not None:
        w = torch.cat([w, sinks.double().reshape(1, *sinks.shape, 1).expand(*w.shape[:-1], 1)], -1)
    p = torch.softmax(w, dim=-1)[..., : w.shape[-1] - (sinks is not None)]
    return p @ v[:, :, start:]


def peak_allocated_bytes(fn, *args, **kwargs):
    """Measure ``fn(*args, **kwargs)``: (result, peak CPU bytes allocated above the level at the call).

    Measured from the allocator's events under ``torch.profiler`` (``profile_memory``): the running sum of
    every CPU allocation and free during the call, so it counts the tensors ``fn`` creates and nothing that
    existed before. A measurement for tests and benchmarks, not for timed code.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, peak
