"""``kvquant``: a 2/4/8-bit KV cache after KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", arXiv 2402.02750; code https://github.com/jy-yuan/KIVI).

    Prepare    append each new token to a full-precision tail; whenever the tail reaches
               ``residual + group_size`` tokens its oldest ``group_size`` tokens are quantised: keys per
               channel (one fp16 scale/zero per channel per block of ``group_size`` tokens), values per token
               (one scale/zero per ``group_size`` channels), codes packed ``8 // bits`` per byte  (ops.quant)
    Relevancy  none: every token is kept
    Retrieval  none
    Apply      attention over the quantised part block by block (each block dequantised on its own, online
               softmax) and then the exact tail: no full-precision copy of the cache  (ops.quant)

KIVI keeps the last ``L mod residual`` keys and exactly ``residual`` values in full precision; here keys and
values share one boundary and the tail holds ``residual`` to ``residual + group_size - 1`` tokens (never fewer
exact tokens than KIVI's values). Memory per quantised token and KV head: ``2 * D * bits / 8`` bytes of codes
plus ``4 * D / group_size`` bytes each for the key and the value scales and zeros (fp16), against ``2 * D * 4``
for float32 K and V.

Sliding-window layers (Gemma2/3, Mistral, Qwen2 windows) keep the model's window: attention covers the last
``W`` tokens, and quantised groups that fell out of the window are dropped. MLA layers (DeepSeek-V2/V3) store
one latent ``c_kv ++ k_rope`` per token: it is quantised once, as a key (per channel; ``group_size`` need not
divide its dim), and the value ``c_kv`` is its dequantised prefix; there are no value codes.

With ``measure_error=1`` the relative reconstruction error of K and V is measured as tokens are quantised,
outside the timed Prepare step; its time is reported as ``measure_ms``. It is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import DecodeTarget, Memory
from hetmem.errors import HetmemError
from hetmem.llm.arch import describe
from hetmem.llm.quant_cache import QuantKVLayer
from hetmem.methods.base import Method, param, register
from hetmem.methods.shared import DensePrefill
from hetmem.ops.quant import (BITS, dequantize_channels, dequantize_groups, quantize_channels, quantize_groups,
                              quantized_decode_attention)


@register_impl("kivi-quantize", role="prepare")
@dataclass
class KiviPrepare:
    bits: int
    group_size: int
    residual: int
    device: str = "cpu"
    measure_error: bool = False
    name: str = "kivi-quantize"

    def _new_memory(self, layer, like: torch.Tensor) -> Memory:
        B, H, Dk, Dv = layer.kv_shape
        g, b = self.group_size, self.bits
        cap = -(-max(layer.reserve_tokens - self.residual, g) // g) * g
        dev = like.device
        mla = layer.mla_rank is not None  # the latent is stored once, as the key; its value is the key's prefix
        m = Memory(kind=f"kivi-int{b}-{'latent' if mla else 'kv'}", unit_size=1,
                   meta={"bits": b, "group": g, "residual": self.residual, "n_quant": 0, "tail": 0, "flushed": None,
                         "mla_rank": layer.mla_rank, "err": {"k": [0.0, 0.0], "v": [0.0, 0.0]}})
        t = m.tensors
        t["k_codes"] = torch.zeros(B, H, cap, Dk * b // 8, dtype=torch.uint8, device=dev)
        t["k_scale"] = torch.zeros(B, H, cap // g, Dk, dtype=torch.float16, device=dev)
        t["k_zero"] = torch.zeros(B, H, cap // g, Dk, dtype=torch.float16, device=dev)
        if not mla:
            t["v_codes"] = torch.zeros(B, H, cap, Dv * b // 8, dtype=torch.uint8, device=dev)
            t["v_scale"] = torch.zeros(B, H, cap, Dv // g, dtype=torch.float16, device=dev)
            t["v_zero"] = torch.zeros(B, H, cap, Dv // g, dtype=torch.float16, device=dev)
        t["k_tail"] = torch.zeros(B, H, self.residual + g, Dk, dtype=like.dtype, device=dev)
        if not mla:
            t["v_tail"] = torch.zeros(B, H, self.residual + g, Dv, dtype=like.dtype, device=dev)
        return m

    def _ensure_quant_capacity(self, memory: Memory, needed: int) -> None:
        t, g = memory.tensors, self.group_size
        cap = t["k_codes"].shape[2]
        if needed <= cap:
            return
        new_cap = -(-max(needed, 2 * cap) // g) * g
        n = memory.meta["n_quant"]
        for name in [n for n in ("k_codes", "v_codes", "v_scale", "v_zero", "k_scale", "k_zero") if n in t]:
            old = t[name]
            rows, used = (new_cap // g, n // g) if name in ("k_scale", "k_zero") else (new_cap, n)
            grown = old.new_zeros(*old.shape[:2], rows, old.shape[3])
            grown[:, :, :used] = old[:, :, :used]
            t[name] = grown

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        k_new, v_new = layer.new_kv
        if memory is None:
            memory = self._new_memory(layer, k_new)
        t, meta, g = memory.tensors, memory.meta, self.group_size
        r, n = meta["tail"], k_new.shape[2]
        total = r + n
        flush = max(0, (total - self.residual) // g) * g  # whole key groups leave the tail
        if flush == 0:
            t["k_tail"][:, :, r:total] = k_new
            if v_new is not None:
                t["v_tail"][:, :, r:total] = v_new
        else:
            k_all = torch.cat([t["k_tail"][:, :, :r], k_new], dim=2)
            q0 = meta["n_quant"]
            self._ensure_quant_capacity(memory, q0 + flush)
            kc, ks, kz = quantize_channels(k_all[:, :, :flush], self.bits, g)
            t["k_codes"][:, :, q0 : q0 + flush] = kc
            t["k_scale"][:, :, q0 // g : (q0 + flush) // g] = ks
            t["k_zero"][:, :, q0 // g : (q0 + flush) // g] = kz
            t["k_tail"][:, :, : total - flush] = k_all[:, :, flush:]
            v_all = None
            if v_new is not None:  # MLA (no value of its own): nothing more to quantise
                v_all = torch.cat([t["v_tail"][:, :, :r], v_new], dim=2)
                vc, vs, vz = quantize_groups(v_all[:, :, :flush], self.bits, g)
                t["v_codes"][:, :, q0 : q0 + flush] = vc
                t["v_scale"][:, :, q0 : q0 + flush] = vs
                t["v_zero"][:, :, q0 : q0 + flush] = vz
                t["v_tail"][:, :, : total - flush] = v_all[:, :, flush:]
            meta["n_quant"] = q0 + flush
            if self.measure_error:  # handed to measure(), which the cache layer runs outside this timed step
                meta["flushed"] = (q0, k_all[:, :, :flush], v_all[:, :, :flush] if v_all is not None else None)
        meta["tail"] = total - flush
        memory.n_units = meta["length"] = end
        return memory

    def measure(self, memory: Memory) -> None:
        """Accumulate the squared reconstruction error of the tokens just quantised (opt-in measurement)."""
        q0, k, v = memory.meta["flushed"]
        t, b, g = memory.tensors, self.bits, self.group_size
        q1 = q0 + k.shape[2]
        kh = dequantize_channels(t["k_codes"][:, :, q0:q1], t["k_scale"][:, :, q0 // g : q1 // g],
                                 t["k_zero"][:, :, q0 // g : q1 // g], b, g)
        if v is None:  # MLA: the value is the latent prefix of the key
            r = memory.meta["mla_rank"]
            v, vh = k[..., :r], kh[..., :r]
        else:
            vh = dequantize_groups(t["v_codes"][:, :, q0:q1], t["v_scale"][:, :, q0:q1], t["v_zero"][:, :, q0:q1],
                                   b, g)
        for name, x, xh in (("k", k, kh), ("v", v, vh)):
            err = memory.meta["err"][name]
            err[0] += float((x.float() - xh).pow(2).sum())
            err[1] += float(x.float().pow(2).sum())


@register_impl("block-dequant-attention", role="apply")
@dataclass
class BlockDequantAttention(DensePrefill):
    block: int = 1024  # quantised tokens dequantised at a time (rounded down to whole groups)
    device: str = "cpu"
    name: str = "block-dequant-attention"

    def apply(self, raw, selection, target: DecodeTarget):
        mem = raw.memory
        t, meta = mem.tensors, mem.meta
        g, r, rank = meta["group"], meta["tail"], meta["mla_rank"]
        k_tail = t["k_tail"][:, :, :r]
        v_tail = t["v_tail"][:, :, :r] if rank is None else k_tail[..., :rank]
        return quantized_decode_attention(
            target.q, t["k_codes"], t["k_scale"], t["k_zero"], t.get("v_codes"), t.get("v_scale"), t.get("v_zero"),
            meta["n_quant"], k_tail, v_tail, meta["bits"], g, target.scale, block=max(g, self.block // g * g),
            start=raw.window_start, softcap=target.softcap, sinks=target.sinks)


@register
@dataclass
class KVQuant(Method):
    name = "kvquant"
    family = "compressed-kv"
    summary = "KIVI-style 2/4/8-bit KV: keys per channel, values per token, recent tokens exact; blockwise dequant"

    bits: int = param(4, "bits per quantised K/V element", choices=BITS)
    group_size: int = param(32, "tokens per key scale/zero (per channel), channels per value scale/zero (per token); "
                                "even, divides the value head dim", low=2)
    residual: int = param(128, "most recent tokens kept in full precision (KIVI's residual length)", low=0)
    measure_error: int = param(0, "1: also measure the K/V reconstruction error (outside the timed steps)",
                               choices=(0, 1))

    cache_layer = QuantKVLayer

    def validate(self) -> None:  # bits, residual and measure_error: checked against their declarations
        if self.group_size < 2 or self.group_size % 2:
            raise HetmemError(f"--group-size must be an even number >= 2 (got {self.group_size})")

    def bind(self, model) -> None:
        a = describe(model)
        per_byte = 8 // self.bits
        for what, d in (("key", a.key_dim), ("value", a.value_dim)):
            if d % per_byte:
                raise HetmemError(f"{self.bits}-bit codes pack {per_byte} per byte: the model's cached {what} dim {d} "
                                  f"is not a multiple of {per_byte}")
        if a.mla_rank is None and a.value_dim % self.group_size:  # MLA has no per-token (value) groups
            raise HetmemError(f"--group-size {self.group_size} does not divide the model's cached value dim "
                              f"{a.value_dim}")

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(KiviPrepare(self.bits, self.group_size, self.residual, device, bool(self.measure_error)),
                              None, None, BlockDequantAttention(device=device), timer)

    def report(self, cache) -> dict:
        out = {"kv_bits": self.bits, "kv_residual": self.residual, "kv_group_size": self.group_size}
        layers = [layer for layer in cache.layers if layer.memory is not None]
        if layers:  # the layer holding the most tokens (a full-attention one, on a model with windows)
            t = max(layers, key=lambda layer: layer.length).memory.meta
            out["tokens_quantized"], out["tokens_full_precision"] = t["n_quant"], t["tail"]
        if self.measure_error:
            tot = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
            for layer in layers:
                for n in ("k", "v"):
                    tot[n][0] += layer.memory.meta["err"][n][0]
                    tot[n][1] += layer.memory.meta["err"][n][1]
            out["kv_quant_rel_error"] = {n: round((a / b) ** 0.5, 6) if b else None for n, (a, b) in tot.items()}
            out["measure_ms"] = round(sum(getattr(layer, "measure_ms", 0.0) for layer in layers), 3)
        return out
