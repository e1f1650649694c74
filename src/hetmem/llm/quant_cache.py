"""A KV cache layer that stores only quantised keys and values (for the ``kvquant`` method).

No full-precision K/V buffer exists: the method's Prepare quantises each new token into the Memory
(codes + per-group scales/zeros), so memory really shrinks. Prefill attention gets the dequantised
cache; in decode the hetmem attention hook reads the cache through the method's Apply (which
dequantises), so ``update`` returns only the new token there. Sliding windows and MLA's latent layout
work as in ``PagedKVLayer`` (for MLA the value ``c_kv`` is quantised on its own).
"""

from __future__ import annotations

import torch

from hetmem.llm.paged_cache import PagedKVLayer


class QuantKVLayer(PagedKVLayer):
    buf_k = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_shape = (key_states.shape[0], key_states.shape[1], key_states.shape[-1], value_states.shape[-1])
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return self.memory.tensors["k_codes"].shape[2] if self.memory is not None else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        model_kv = (key_states, value_states)
        k, v = self._to_cache(key_states, value_states)
        if v is None:  # MLA: the value is c_kv
            v = k[..., : self.mla_rank]
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        n = k.shape[-2]
        self._trim_window()
        start, end = self.length, self.length + n
        self.new_kv = (k, v)  # what Prepare quantises
        self.length = end
        self.seen += n
        self.memory = self.pipeline.build((self, start, end), self.memory)
        self.memory.meta["window_start"] = self.window_start
        self.new_kv = None
        if n == 1:
            return model_kv
        first = self._visible_from(n)
        return self._to_model(*self.pipeline.apply.dequantize(self.memory, end, self.dtype, start=first))

    def compact(self, keep):
        raise NotImplementedError("a quantised KV layer does not evict")

    def kv_nbytes(self) -> int:
        if self.memory is None:
            return 0
        return sum(t.nbytes for t in self.memory.tensors.values())
