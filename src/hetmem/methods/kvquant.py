"""``kvquant``: 4-bit or 8-bit KV cache with per-group scales (KIVI/KVQuant-style, per-token groups).

    Prepare    quantise each new token's K and V into integer codes with one float16 scale and zero per
               group of ``group_size`` channels; the full-precision K/V are not kept  (ops.quant)
    Relevancy  none: every token is kept
    Retrieval  none
    Apply      dequantise the cache and attend over all of it                       (ops.quant)

Memory shrinks to about bits/32 of a float32 cache (plus 4 bytes per group). Its answers are not exact:
``hetmem run --json`` reports the relative reconstruction error of K and V, measured as tokens are written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import DecodeTarget, Memory
from hetmem.errors import HetmemError
from hetmem.llm.quant_cache import QuantKVLayer
from hetmem.llm.arch import describe
from hetmem.methods.shared import DensePrefill
from hetmem.methods.base import Method, param, register
from hetmem.ops.quant import dequantize_groups, quantize_groups
from hetmem.ops.sparse_attention import grouped_decode_attention


@register_impl("group-quantize", role="prepare")
@dataclass
class QuantizePrepare:
    bits: int
    group_size: int
    device: str = "cpu"
    name: str = "group-quantize"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        k, v = layer.new_kv
        B, H, Dk, Dv = layer.kv_shape
        if memory is None:
            cap = max(layer.reserve_tokens, end)
            memory = Memory(kind=f"int{self.bits}-kv", unit_size=1, meta={"bits": self.bits, "group": self.group_size,
                                                                          "err": {"k": [0.0, 0.0], "v": [0.0, 0.0]}})
            for name, D in (("k", Dk), ("v", Dv)):
                memory.tensors[f"{name}_codes"] = torch.zeros(B, H, cap, D * self.bits // 8, dtype=torch.uint8, device=k.device)
                memory.tensors[f"{name}_scale"] = torch.zeros(B, H, cap, D // self.group_size, dtype=torch.float16, device=k.device)
                memory.tensors[f"{name}_zero"] = torch.zeros(B, H, cap, D // self.group_size, dtype=torch.float16, device=k.device)
        if end > memory.tensors["k_codes"].shape[2]:  # grow geometrically
            new_cap = max(end, 2 * memory.tensors["k_codes"].shape[2])
            for name, t in memory.tensors.items():
                g = t.new_zeros(*t.shape[:2], new_cap, t.shape[3])
                g[:, :, :start] = t[:, :, :start]
                memory.tensors[name] = g
        for name, x in (("k", k), ("v", v)):
            codes, scale, zero = quantize_groups(x, self.bits, self.group_size)
            memory.tensors[f"{name}_codes"][:, :, start:end] = codes
            memory.tensors[f"{name}_scale"][:, :, start:end] = scale
            memory.tensors[f"{name}_zero"][:, :, start:end] = zero
            err = memory.meta["err"][name]  # measured reconstruction error, accumulated
            xh = dequantize_groups(codes, scale, zero, self.bits, self.group_size)
            err[0] += float((x.float() - xh).pow(2).sum())
            err[1] += float(x.float().pow(2).sum())
        memory.n_units = memory.meta["length"] = end
        return memory


@register_impl("dequant-attention", role="apply")
@dataclass
class DequantAttention(DensePrefill):
    device: str = "cpu"
    name: str = "dequant-attention"

    def dequantize(self, memory: Memory, length: int, dtype=torch.float32, start: int = 0):
        b, g = memory.meta["bits"], memory.meta["group"]
        t = memory.tensors
        out = []
        for name in ("k", "v"):
            out.append(dequantize_groups(t[f"{name}_codes"][:, :, start:length], t[f"{name}_scale"][:, :, start:length],
                                         t[f"{name}_zero"][:, :, start:length], b, g, dtype))
        return tuple(out)

    def apply(self, raw, selection, target: DecodeTarget):
        k, v = self.dequantize(raw.memory, raw.length, target.q.dtype, start=raw.window_start)
        return grouped_decode_attention(target.q, k, v, target.scale, softcap=target.softcap, sinks=target.sinks)


@register
@dataclass
class KVQuant(Method):
    name = "kvquant"
    family = "compressed-kv"
    summary = "4-bit/8-bit KV cache with per-group scale+zero; Apply dequantises (approximate, memory shrinks)"

    bits: int = param(4, "bits per quantised K/V element", choices=(4, 8))
    group_size: int = param(32, "elements sharing one scale and zero point (even, divides the head dim)", low=2)

    cache_layer = QuantKVLayer

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise HetmemError(f"--bits must be 4 or 8 (got {self.bits})")
        if self.group_size < 2 or self.group_size % 2:
            raise HetmemError(f"--group-size must be an even number >= 2 (got {self.group_size})")

    def bind(self, model) -> None:
        a = describe(model)
        for what, d in (("key", a.key_dim), ("value", a.value_dim)):
            if d % self.group_size:
                raise HetmemError(f"--group-size {self.group_size} does not divide the model's cached {what} dim {d}")

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(QuantizePrepare(self.bits, self.group_size, device), None, None, DequantAttention(device),
                              timer)

    def report(self, cache) -> dict:
        tot = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
        for layer in cache.layers:
            if layer.memory is not None:
                for n in ("k", "v"):
                    tot[n][0] += layer.memory.meta["err"][n][0]
                    tot[n][1] += layer.memory.meta["err"][n][1]
        rel = {n: round((a / b) ** 0.5, 6) if b else None for n, (a, b) in tot.items()}
        return {"kv_quant_rel_error": rel, "kv_bits": self.bits}
