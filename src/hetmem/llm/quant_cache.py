"""A KV cache layer that stores quantised keys and values plus a short full-precision tail (``kvquant``).

The layer owns no full-precision K/V buffer of the context. Its Memory (built by the method's Prepare,
``methods/kvquant.py``) holds, per layer, after KIVI (Liu et al., 2024, arXiv 2402.02750):

* the quantised part: packed key codes with per-channel scale/zero per block of ``group_size`` tokens, and
  packed value codes with per-token scale/zero per ``group_size`` channels;
* the full-precision tail: the most recent ``residual`` to ``residual + group_size - 1`` tokens.

In decode the hetmem attention hook reads the cache only through the method's Apply, which dequantises one
block at a time inside attention (``ops.quant.quantized_decode_attention``), so ``update`` returns just the
new token there. Prefill attention (dense SDPA in the hook) needs this layer's K/V as tensors: ``update``
then returns a transient copy of the context this chunk can see (quantised part dequantised, tail and new
chunk exact), freed when the layer's attention is done; that copy is at most the size of one layer's float
cache.

Sliding windows and MLA's latent layout follow ``PagedKVLayer``: a window layer attends to its last ``W``
tokens (``window_start``) and drops whole quantised groups that fell out of the window; an MLA layer stores
the latent ``c_kv ++ k_rope`` once, quantised as a key (per channel), and its value ``c_kv`` is the
dequantised key's prefix (no value codes).
"""

from __future__ import annotations

import time

import torch

from hetmem.llm.paged_cache import PagedKVLayer
from hetmem.ops.quant import dequantize_channels, dequantize_groups


class QuantKVLayer(PagedKVLayer):
    buf_k = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        Dv = self.mla_rank if self.mla_rank is not None else value_states.shape[-1]
        self.kv_shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1], Dv)
        self.is_initialized = True
        self.measure_ms = 0.0  # measurement work (quantisation error), kept out of the timed steps

    @property
    def capacity(self) -> int:
        return self.memory.tensors["k_codes"].shape[2] if self.memory is not None else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        model_kv = (key_states, value_states)
        k, v = self._to_cache(key_states, value_states)  # MLA: the latent as the key, no separate value
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        n = k.shape[-2]
        self._trim_window()
        start, end = self.length, self.length + n
        # Prefill: the hook's dense attention needs the context this chunk sees, built before the new tokens
        # are quantised so the chunk attends to itself in full precision.
        ctx = self.context_kv(k, v, first=self._visible_from(0)) if n > 1 else None
        self.new_kv = (k, v)  # what Prepare appends (and quantises once it leaves the tail)
        self.length = end
        self.seen += n
        self.memory = self.pipeline.build((self, start, end), self.memory)
        self.memory.meta["window_start"] = self.window_start
        self.new_kv = None
        measure = getattr(self.pipeline.prepare, "measure", None)
        if measure is not None and self.memory.meta.get("flushed") is not None:
            t0 = time.perf_counter()  # opt-in measurement, outside the timed Prepare
            measure(self.memory)
            self.measure_ms += (time.perf_counter() - t0) * 1e3
        self.memory.meta["flushed"] = None
        if ctx is None:
            return model_kv
        return self._to_model(*ctx)

    def context_kv(self, key_states: torch.Tensor, value_states: torch.Tensor | None, first: int = 0,
                   block: int = 1024):
        """Stored tokens ``first:`` followed by ``key_states``/``value_states``: one transient float copy
        (MLA: the latent, its value a view of the key's prefix)."""
        B, H, n, Dk = key_states.shape
        mla = value_states is None
        mem = self.memory
        nq = mem.meta["n_quant"] if mem is not None else 0
        r = mem.meta["tail"] if mem is not None else 0
        if nq + r - first <= 0:
            return key_states, key_states[..., : self.mla_rank] if mla else value_states
        k = key_states.new_empty(B, H, nq + r - first + n, Dk)
        v = None if mla else value_states.new_empty(B, H, nq + r - first + n, value_states.shape[-1])
        t = mem.tensors
        if nq > first:
            bits, g = mem.meta["bits"], mem.meta["group"]
            block = max(g, block // g * g)
            for s in range(first // g * g, nq, block):
                e = min(nq, s + block)
                o = max(first - s, 0)  # the first block may begin before ``first``
                kb = dequantize_channels(t["k_codes"][:, :, s:e], t["k_scale"][:, :, s // g : e // g],
                                         t["k_zero"][:, :, s // g : e // g], bits, g, k.dtype)
                k[:, :, s + o - first : e - first] = kb[:, :, o:]
                if not mla:
                    vb = dequantize_groups(t["v_codes"][:, :, s:e], t["v_scale"][:, :, s:e], t["v_zero"][:, :, s:e],
                                           bits, g, v.dtype)
                    v[:, :, s + o - first : e - first] = vb[:, :, o:]
        t0 = max(first - nq, 0)
        lo = nq + t0 - first
        k[:, :, lo : nq + r - first] = t["k_tail"][:, :, t0:r]
        k[:, :, nq + r - first :] = key_states
        if mla:
            return k, k[..., : self.mla_rank]
        v[:, :, lo : nq + r - first] = t["v_tail"][:, :, t0:r]
        v[:, :, nq + r - first :] = value_states
        return k, v

    # -- sliding window: drop whole quantised groups that fell out of it -------------------------------
    def _trim_window(self) -> None:
        if self.sliding_window is None or self.memory is None:
            return
        out = self.length - (self.sliding_window - 1)
        if out < self._trim_slack():
            return
        mem = self.memory
        g, nq = mem.meta["group"], mem.meta["n_quant"]
        d = min(out, nq) // g * g  # whole groups of the quantised part (the exact tail stays; it is short)
        if d:
            self.drop_front(d)

    def drop_front(self, d: int) -> None:
        """Drop the first ``d`` stored tokens (whole quantised groups): shift the codes and their scales."""
        mem = self.memory
        t, g, nq = mem.tensors, mem.meta["group"], mem.meta["n_quant"]
        if d % g or d > nq:
            raise ValueError(f"cannot drop {d} tokens: whole groups of {g} of the {nq} quantised ones only")
        want = -(-(nq - d + self._trim_slack() + self.page_size) // g) * g
        for name in [n for n in t if n not in ("k_tail", "v_tail")]:
            per_group = name in ("k_scale", "k_zero")
            u = g if per_group else 1
            x = t[name]
            keep = x[:, :, d // u : nq // u]
            if x.shape[2] > 2 * (want // u):  # after a long prefill chunk: give the memory back
                new = x.new_zeros(*x.shape[:2], want // u, x.shape[3])
                new[:, :, : keep.shape[2]] = keep
                t[name] = new
            else:
                x[:, :, : keep.shape[2]] = keep.clone()
        mem.meta["n_quant"] = nq - d
        self.length -= d
        mem.n_units = mem.meta["length"] = self.length

    def compact(self, keep):
        raise NotImplementedError("a quantised KV layer does not evict")

    def kv_nbytes(self) -> int:
        """Bytes allocated for this layer's K/V: packed codes, fp16 scales/zeros and the full-precision tail."""
        if self.memory is None:
            return 0
        return sum(t.nbytes for t in self.memory.tensors.values())
