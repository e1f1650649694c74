"""A paged KV cache for transformers (through ``transformers.cache_utils``).

Keys and values live in one preallocated buffer per layer, ``[B, H_kv, capacity, D]``, whose
capacity is a whole number of pages and grows geometrically, so appending a decode token is a
copy of one token (not a concatenation of the whole cache). When the layer has a ``pipeline``, its
Prepare step runs on every update and keeps the page summaries (the Memory) up to date during
prefill and decode.

Sliding-window layers (``sliding_window=W``; Gemma2/3, Mistral, Qwen2 with ``use_sliding_window``) behave
as transformers' ``DynamicSlidingWindowLayer``: a query sees only the last ``W`` positions (itself
included), the mask sizes say so, and prefill gets only those keys. Tokens that fell out of the window
are dropped in whole pages (so page summaries stay aligned), with the layer's Memory shifted alongside;
until then ``window_start`` marks the first token still inside the window, and decode-time methods
select from there on (``memory.meta["window_start"]``).

``kv_dtype`` stores keys and values in another dtype than the model computes in (bfloat16/float16 under a
float32 model: half the bytes decode reads); attention then accumulates in float32 (``ops.fast`` reads them
in place) and dense prefill attention gets them cast back to the query's dtype.

MLA layers (``mla_rank=r``; DeepSeek-V2/V3) receive transformers' latent ``(c_kv, k_rope)`` and keep one
buffer ``[c_kv ++ k_rope]`` as the key; the value is its ``c_kv`` prefix (a view, nothing copied).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Memory
from hetmem.ops.token_gather import gather_tokens


class PagedKVLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = False

    def __init__(self, page_size: int = 16, pipeline: MemoryPipeline | None = None, reserve_tokens: int = 0,
                 sliding_window: int | None = None, mla_rank: int | None = None, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.page_size = page_size
        self.kv_dtype = kv_dtype  # storage dtype of K/V (None: the dtype the model hands over)
        self.pipeline = pipeline
        self.sliding_window = sliding_window
        self.mla_rank = mla_rank
        if sliding_window is not None:  # room for the window and the trim slack, not the whole prompt
            reserve_tokens = min(reserve_tokens, sliding_window + self._trim_slack() + page_size)
        self.reserve_tokens = reserve_tokens
        self.length = 0  # tokens stored (fewer than seen once a compressed-memory method evicts)
        self.seen = 0  # tokens ever appended: positions and masks count these
        self.memory: Memory | None = None
        self.hidden: torch.Tensor | None = None  # attention input of the current step, for methods that ask

    @property
    def is_sliding(self) -> bool:
        return self.sliding_window is not None

    @property
    def window_start(self) -> int:
        """First stored token the latest query may attend (0 unless a sliding window has moved past it)."""
        if self.sliding_window is None:
            return 0
        return max(0, self.length - self.sliding_window)

    # -- transformers' layer interface -------------------------------------------------------
    def _to_cache(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """What the buffers store, from what the model hands over (MLA: ``(c_kv, k_rope)`` -> ``c_kv ++ k_rope``)."""
        if self.mla_rank is None:
            return key_states, value_states
        return torch.cat([key_states, value_states], dim=-1), None

    def _to_model(self, k: torch.Tensor, v: torch.Tensor):
        """What the model gets back, from stored keys/values (MLA: the latent split again)."""
        if self.mla_rank is None:
            return k, v
        return k[..., : self.mla_rank], k[..., self.mla_rank :]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = self.kv_dtype or key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        Dv = self.mla_rank if self.mla_rank is not None else value_states.shape[-1]
        self._alloc(B, H, D, Dv, max(self.reserve_tokens, key_states.shape[-2]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        model_kv = (key_states, value_states)
        key_states, value_states = self._to_cache(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._trim_window()
        start, end = self.length, self.length + n
        if end > self.capacity:
            self._grow(end)
        self.buf_k[:, :, start:end] = key_states
        if value_states is not None:
            self.buf_v[:, :, start:end] = value_states
        self.length = end
        self.seen += n
        if self.pipeline is not None:
            self.memory = self.pipeline.build((self, start, end), self.memory)
            if self.memory is not None:
                self.memory.meta["window_start"] = self.window_start
            if n == 1 and self.mla_rank is not None:
                # Decode on MLA: hetmem's attention reads the latent cache itself, so the model needs to
                # decompress only the new token (not the whole cache, as it would otherwise do every step).
                return model_kv
        first = self._visible_from(n)
        return self._to_model(self.buf_k[:, :, first:end], self.buf_v[:, :, first:end])

    def _visible_from(self, n: int) -> int:
        """First stored token the ``n`` newest queries can see (all of them, or the last W-1 before them)."""
        if self.sliding_window is None:
            return 0
        return max(0, self.length - n - (self.sliding_window - 1))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # After eviction the stored tokens are a subset of the past: all of them precede the query. A
        # sliding layer shows the query its last W-1 stored tokens (as DynamicSlidingWindowLayer does).
        past = self.length if self.sliding_window is None else min(self.length, self.sliding_window - 1)
        return past + query_length, self.seen - past

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
        if self.mla_rank is not None:  # MLA: the value is the key's c_kv prefix
            self.buf_v = self.buf_k[..., : self.mla_rank]
        else:
            self.buf_v = torch.empty(B, H, cap, Dv, dtype=self.dtype, device=self.device)
        self.keys, self.values = self.buf_k, self.buf_v

    # -- sliding window: drop whole pages that fell out of it ---------------------------------
    def _trim_slack(self) -> int:
        """Tokens outside the window kept before a trim (amortises the copy: one per ~W/4 steps)."""
        return max(self.page_size, (self.sliding_window or 0) // 4)

    def _trim_window(self) -> None:
        """Before appending: drop the whole pages the next query can no longer see (it sees W-1 stored tokens)."""
        if self.sliding_window is None or self.length == 0:
            return
        out = self.length - (self.sliding_window - 1)
        if out < self._trim_slack():
            return
        d = out // self.page_size * self.page_size
        if d:
            self.drop_front(d)

    def drop_front(self, d: int) -> None:
        """Drop the first ``d`` stored tokens (a whole number of pages), shifting the buffers and the Memory."""
        n = self.length - d
        if getattr(self, "buf_k", None) is not None:  # a quantised layer keeps only its Memory
            self.buf_k[:, :, :n] = self.buf_k[:, :, d : self.length].clone()
            if self.mla_rank is None:
                self.buf_v[:, :, :n] = self.buf_v[:, :, d : self.length].clone()
        if self.memory is not None:
            u = self.memory.unit_size
            if d % u:
                raise ValueError(f"cannot drop {d} tokens from a memory of {u}-token units")
            valid = -(-self.length // u)
            for t in self.memory.tensors.values():  # dim 2 counts units of memory.unit_size tokens
                t[:, :, : valid - d // u] = t[:, :, d // u : valid].clone()
        self.length = n
        want = self._round(n + self._trim_slack() + self.page_size)
        if getattr(self, "buf_k", None) is not None and self.capacity > 2 * want:
            self._resize(want)  # after a long prefill chunk: give the memory back

    def _grow(self, needed: int) -> None:
        self._resize(max(needed, 2 * self.capacity))

    def _resize(self, tokens: int) -> None:
        """Reallocate the buffers (and the Memory's per-unit tensors) for ``tokens``, keeping what is stored."""
        old_k, old_v, n = self.buf_k, self.buf_v, self.length
        B, H, _, Dk = old_k.shape
        self._alloc(B, H, Dk, old_v.shape[-1], tokens)
        self.buf_k[:, :, :n] = old_k[:, :, :n]
        if self.mla_rank is None:
            self.buf_v[:, :, :n] = old_v[:, :, :n]
        if self.memory is not None:
            u = self.memory.unit_size
            for name, t in self.memory.tensors.items():  # dim 2 counts units of memory.unit_size tokens
                new = t.new_empty(*t.shape[:2], self.capacity // u, *t.shape[3:])
                keep = min(t.shape[2], new.shape[2], -(-n // u))
                new[:, :, :keep] = t[:, :, :keep]
                self.memory.tensors[name] = new


    # -- a prompt prefix prefilled once, reused by several calls ---------------------------------
    def copy_prefix(self, src: "PagedKVLayer") -> None:
        """Start this empty layer with ``src``'s stored tokens (a shared prompt prefix, prefilled once), so a
        call continues after the prefix without recomputing it. The Prepare step (if any) runs on them."""
        if self.length or not src.is_initialized:
            if self.length:
                raise ValueError("copy_prefix needs an empty layer")
            return
        n = src.length
        self.dtype, self.device = self.kv_dtype or src.dtype, src.device
        B, H, _, Dk = src.buf_k.shape
        self._alloc(B, H, Dk, src.buf_v.shape[-1], max(self.reserve_tokens, n))
        self.is_initialized = True
        self.buf_k[:, :, :n] = src.buf_k[:, :, :n]
        if self.mla_rank is None:
            self.buf_v[:, :, :n] = src.buf_v[:, :, :n]
        self.length, self.seen = n, src.seen
        if self.pipeline is not None and n:
            self.memory = self.pipeline.build((self, 0, n), None)

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
        if self.mla_rank is None:
            self.buf_v[:, :, :n] = v_keep
        self.length = n

    def kv_nbytes(self) -> int:
        """Bytes allocated for this layer's keys and values."""
        if not self.is_initialized:
            return 0
        if self.mla_rank is not None:  # the value is a view into the key buffer
            return self.buf_k.nbytes
        return self.buf_k.nbytes + self.buf_v.nbytes


class PagedKVCache(Cache):
    """One PagedKVLayer per decoder layer; each layer gets its own pipeline (its own timer is shared)."""

    def __init__(self, num_layers: int, page_size: int = 16, pipelines=None, reserve_tokens: int = 0, layer_cls=None,
                 windows=None, mla_rank: int | None = None, kv_dtype: torch.dtype | None = None):
        pipelines = pipelines or [None] * num_layers
        windows = windows or [None] * num_layers
        layer_cls = layer_cls or PagedKVLayer
        extra = {"kv_dtype": kv_dtype} if kv_dtype is not None else {}
        layers = [layer_cls(page_size, p, reserve_tokens, sliding_window=w, mla_rank=mla_rank, **extra)
                  for p, w in zip(pipelines, windows)]
        super().__init__(layers=layers)
        self.page_size = page_size
