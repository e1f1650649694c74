"""Ops for quantised KV (KIVI/KVQuant-style): asymmetric integer codes with one scale and zero per group.

A vector of ``D`` values is split into groups of ``group_size`` along D; each group stores
``min`` (zero) and ``(max - min) / (2^bits - 1)`` (scale) in float16 and ``bits``-bit codes. 4-bit codes
are packed two per byte, so a float32 KV entry of D values takes ``D*bits/8 + 4*D/group_size`` bytes.
"""

from __future__ import annotations

import torch


def quantize_groups(x: torch.Tensor, bits: int, group_size: int):
    """``x [..., D]`` -> (codes uint8 ``[..., D*bits/8]``, scale fp16 ``[..., D/g]``, zero fp16 ``[..., D/g]``)."""
    if bits not in (4, 8):
        raise ValueError("bits must be 4 or 8")
    *lead, D = x.shape
    g = x.float().reshape(*lead, D // group_size, group_size)
    zero = g.amin(-1).to(torch.float16)
    scale = ((g.amax(-1) - zero.float()) / (2**bits - 1)).to(torch.float16)
    s = scale.float().clamp(min=1e-8).unsqueeze(-1)
    codes = ((g - zero.float().unsqueeze(-1)) / s).round_().clamp_(0, 2**bits - 1).to(torch.uint8).reshape(*lead, D)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                      dtype=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_groups` (up to rounding): ``[..., D]`` in ``dtype``."""
    if bits == 4:
        lo, hi = codes & 0x0F, codes >> 4
        codes = torch.stack([lo, hi], dim=-1).flatten(-2)
    *lead, D = codes.shape
    g = codes.to(torch.float32).reshape(*lead, D // group_size, group_size)
    x = g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return x.reshape(*lead, D).to(dtype)


def quantize_reference(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantise-dequantise round trip, one group at a time in plain Python loops (for tests)."""
    flat = x.float().reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    levels = 2**bits - 1
    for r in range(flat.shape[0]):
        for s in range(0, flat.shape[1], group_size):
            grp = flat[r, s : s + group_size]
            lo = grp.min().half().float()
            sc = ((grp.max() - lo) / levels).half().float()
            q = torch.clamp(torch.round((grp - lo) / max(float(sc), 1e-8)), 0, levels)
            out[r, s : s + group_size] = q * sc + lo
    return out.reshape(x.shape)
