"""A paged KV cache for transformers (through ``transformers.cache_utils``).

Keys and values live in one preallocated buffer per layer, ``[B, H_kv, capacity, D]``, whose
capacity is a whole number of pages and grows geometrically, so appending a decode token is a
copy of one token (not a concatenation of the whole cache). When the layer has a ``pipeline``, its
Prepare step runs on every update and keeps the page summaries (the Memory) up to date during
prefill and decode.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Memory
from hetmem.ops.token_gather import gather_tokens


class PagedKVLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, page_size: int = 16, pipeline: MemoryPipeline | None = None, reserve_tokens: int = 0):
        super().__init__()
        self.page_size = page_size
        self.pipeline = pipeline
        self.reserve_tokens = reserve_tokens
        self.length = 0  # tokens stored (fewer than seen once a compressed-memory method evicts)
        self.seen = 0  # tokens ever appended: positions and masks count these
        self.memory: Memory | None = None
        self.hidden: torch.Tensor | None = None  # attention input of the current step, for methods that ask

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self._alloc(B, H, D, value_states.shape[-1], max(self.reserve_tokens, key_states.shape[-2]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.buf_k[:, :, start:end] = key_states
        self.buf_v[:, :, start:end] = value_states
        self.length = end
        self.seen += key_states.shape[-2]
        if self.pipeline is not None:
            self.memory = self.pipeline.build((self, start, end), self.memory)
        return self.buf_k[:, :, :end], self.buf_v[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # After eviction the stored tokens are a subset of the past: all of them precede the query.
        return self.length + query_length, self.seen - self.length

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self.seen = 0
        self.memory = None

    # -- storage ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.buf_k.shape[2]

    @property
    def n_pages(self) -> int:
        return -(-self.length // self.page_size)

    def _round(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def _alloc(self, B: int, H: int, Dk: int, Dv: int, tokens: int) -> None:
        cap = self._round(max(tokens, self.page_size))
        self.buf_k = torch.empty(B, H, cap, Dk, dtype=self.dtype, device=self.device)
        self.buf_v = torch.empty(B, H, cap, Dv, dtype=self.dtype, device=self.device)
        self.keys, self.values = self.buf_k, self.buf_v

    def _grow(self, needed: int) -> None:
        old_k, old_v, n = self.buf_k, self.buf_v, self.length
        B, H, _, Dk = old_k.shape
        self._alloc(B, H, Dk, old_v.shape[-1], max(needed, 2 * self.capacity))
        self.buf_k[:, :, :n] = old_k[:, :, :n]
        self.buf_v[:, :, :n] = old_v[:, :, :n]
        if self.memory is not None:
            for name, t in self.memory.tensors.items():  # dim 2 counts units of memory.unit_size tokens
                grown = t.new_empty(*t.shape[:2], self.capacity // self.memory.unit_size, *t.shape[3:])
                grown[:, :, : t.shape[2]] = t
                self.memory.tensors[name] = grown


    # -- compressed memory: eviction -----------------------------------------------------------
    def compact(self, keep: torch.Tensor) -> None:
        """Keep only tokens ``keep [B, H_kv, k]`` (sorted ids, per KV head), evicting the rest.

        The kept K/V move to the front of the buffer; the buffer is reallocated smaller when it is more
        than twice what is kept, so memory really shrinks. Positions are unaffected (RoPE is applied
        before caching); ``seen`` still counts every token.
        """

        k_keep, v_keep = gather_tokens(self.buf_k, keep), gather_tokens(self.buf_v, keep)
        n = keep.shape[-1]
        want = self._round(n + self.page_size)
        if self.capacity > 2 * want:
            B, H, _, Dk = self.buf_k.shape
            self._alloc(B, H, Dk, self.buf_v.shape[-1], want)
        self.buf_k[:, :, :n] = k_keep
        self.buf_v[:, :, :n] = v_keep
        self.length = n

    def kv_nbytes(self) -> int:
        """Bytes allocated for this layer's keys and values."""
        if not self.is_initialized:
            return 0
        return self.buf_k.nbytes + self.buf_v.nbytes


class PagedKVCache(Cache):
    """One PagedKVLayer per decoder layer; each layer gets its own pipeline (its own timer is shared)."""

    def __init__(self, num_layers: int, page_size: int = 16, pipelines=None, reserve_tokens: int = 0, layer_cls=None):
        pipelines = pipelines or [None] * num_layers
        layer_cls = layer_cls or PagedKVLayer
        layers = [layer_cls(page_size, p, reserve_tokens) for p in pipelines]
        super().__init__(layers=layers)
        self.page_size = page_size
