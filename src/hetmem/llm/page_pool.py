"""A page pool for many sequences' KV (PagedAttention: Kwon et al., SOSP 2023), and one sequence's view of it.

``PagePool`` is one decoder layer's storage, preallocated once: keys ``[1, H_kv, n_pages * P, Dk]`` and values
``[1, H_kv, n_pages * P, Dv]``, where pool page ``p`` holds tokens ``p*P .. (p+1)*P`` of the buffer, and a free
list of pages. ``PooledLayer`` is one sequence's view of one layer: a block table (the pool page of each of its
logical pages) and the same attributes a method reads from ``paged_cache.PagedKVLayer`` (``length``, ``seen``,
``memory``, ``page_size``, ``capacity``, ``window_start``, ``hidden``, ``buf_k``/``buf_v``). Sequences join
and leave by taking and giving back pages; nobody else's K/V moves.

Attention reads the pool in place: ``attend_all`` (dense) and ``attend_units`` (a sparse method's selected
logical units) map logical tokens through the block table to pool slots and run the compiled page-attention
op (``ops.fast``) over those slots, one-token pages, so a partial last page needs no special case. Without
the compiled op the selected slots are gathered (one ``gather`` per tensor) and attended with SDPA.

Method code that reads ``buf_k``/``buf_v`` itself (Prepare steps, oracle's exact scores, seer's bitmap Apply,
the eviction methods) gets a *staged* logical copy of this sequence's K/V in a scratch buffer the pool shares
between its sequences (one sequence at a time, per layer): during Prepare only the pages just written (what
Prepare steps read), otherwise every stored token. That copy is the price of running unmodified method code
on a pool; the dense and top-k Apply paths never take it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import DecodeTarget, Memory, Selection
from hetmem.errors import HetmemError
from hetmem.ops.sparse_attention import grouped_decode_attention
from hetmem.ops import fast


class PoolExhausted(HetmemError):
    """The pool has fewer free pages than asked for."""


class PagePool:
    """One layer's preallocated K/V pages and their free list."""

    def __init__(self, n_pages: int, page_size: int, kv_heads: int, key_dim: int, value_dim: int,
                 dtype=torch.float32, device="cpu"):
        if n_pages < 1 or page_size < 1:
            raise ValueError("a page pool needs at least one page of at least one token")
        self.n_pages, self.page_size = n_pages, page_size
        self.dtype, self.device = dtype, torch.device(device)
        tokens = n_pages * page_size
        self.k = torch.zeros(1, kv_heads, tokens, key_dim, dtype=dtype, device=device)
        self.v = torch.zeros(1, kv_heads, tokens, value_dim, dtype=dtype, device=device)
        self._free = list(range(n_pages - 1, -1, -1))  # pop() hands out the lowest id first
        self._stage_k: torch.Tensor | None = None  # the shared scratch of staged logical K/V (see module doc)
        self._stage_v: torch.Tensor | None = None
        self.staged: tuple | None = None  # (view, version, lo, hi) of what the scratch holds now
        self._fast: bool | None = None  # whether the compiled page attention takes this pool (decided once)

    def fast(self, q: torch.Tensor) -> bool:
        if self._fast is None:
            self._fast = fast.available(q, self.k, self.v)
        return self._fast and q.dtype == self.k.dtype

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def page_nbytes(self) -> int:
        P = self.page_size
        return (self.k[:, :, :P].nbytes + self.v[:, :, :P].nbytes)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"page pool exhausted: {n} pages asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, pages) -> None:
        self._free.extend(reversed(list(pages)))

    def stage_buffers(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stage_k is None or self._stage_k.shape[2] < tokens:
            self._stage_k = self.k.new_empty(*self.k.shape[:2], tokens, self.k.shape[3])
            self._stage_v = self.v.new_empty(*self.v.shape[:2], tokens, self.v.shape[3])
            self.staged = None
        return self._stage_k, self._stage_v


class PooledLayer(CacheLayerMixin):
    """One sequence's view of one layer's ``PagePool``: a block table, and what methods read from a layer.

    ``page_size`` is the method's page (its Memory's unit); the pool's page may differ. ``capacity`` (tokens,
    fixed when the sequence is admitted) sizes the method's Memory; pages are taken from the pool as tokens
    are written and given back by ``release`` (and by ``compact``, when an eviction method shrinks the KV).
    Full-attention, non-MLA layers only (the engine refuses the rest)."""

    is_compileable = False
    is_croppable = False
    sliding_window = None
    mla_rank = None

    def __init__(self, pool: PagePool, page_size: int = 16, pipeline: MemoryPipeline | None = None,
                 capacity: int = 0):
        super().__init__()
        self.pool = pool
        self.page_size = page_size
        self.pipeline = pipeline
        unit = page_size * pool.page_size // _gcd(page_size, pool.page_size)
        self.capacity = max(unit, -(-capacity // unit) * unit)
        self.blocks: list[int] = []  # pool page of logical pool-page i
        self.slots = torch.empty(self.capacity, dtype=torch.long, device=pool.device)  # logical token -> pool slot
        self.length = 0
        self.seen = 0
        self.memory: Memory | None = None
        self.hidden: torch.Tensor | None = None
        self.dtype, self.device = pool.dtype, pool.device
        self.is_initialized = True
        self.version = 0  # bumped on every write: what the staging scratch checks
        self._prep: tuple[int, int] | None = None  # the span Prepare may read, while it runs

    window_start = 0
    is_sliding = False

    # -- storage ----------------------------------------------------------------------------------
    @property
    def n_pages(self) -> int:
        return -(-self.length // self.page_size)

    def _ensure(self, tokens: int) -> None:
        """Take pool pages until logical tokens ``[0, tokens)`` have slots."""
        if tokens > self.capacity:
            raise HetmemError(f"sequence over its reserved {self.capacity} tokens")
        P = self.pool.page_size
        need = -(-tokens // P) - len(self.blocks)
        if need > 0:
            first = len(self.blocks)
            new = self.pool.alloc(need)
            self.blocks.extend(new)
            base = torch.tensor(new, dtype=torch.long, device=self.slots.device).unsqueeze(-1) * P
            self.slots[first * P : (first + need) * P] = (base + torch.arange(P, device=base.device)).flatten()

    def release(self) -> None:
        """Give every page back to the pool (the sequence left)."""
        self.pool.release(self.blocks)
        self.blocks = []
        self.length = 0
        self.memory = None
        self.version += 1
        if self.pool.staged is not None and self.pool.staged[0] is self:
            self.pool.staged = None

    def kv_nbytes(self) -> int:
        return len(self.blocks) * self.pool.page_nbytes

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, prepare: bool = True) -> tuple[int, int]:
        """Append ``[1, H_kv, n, D]`` keys/values into pool pages; the Prepare step (if any) runs on them."""
        n = key_states.shape[-2]
        start, end = self.length, self.length + n
        self._ensure(end)
        slots = self.slots[start:end]
        self.pool.k.index_copy_(2, slots, key_states)
        self.pool.v.index_copy_(2, slots, value_states)
        self.length, self.seen = end, self.seen + n
        self.version += 1
        if prepare:
            self.run_prepare(start, end)
        return start, end

    def next_slot(self) -> int:
        """The pool slot of the next token (its page taken if needed): for a batch writing one token per row."""
        self._ensure(self.length + 1)
        return int(self.slots[self.length])

    def advance(self) -> None:
        """One token was written at ``next_slot()`` (by ``write_rows``): count it and run Prepare on it."""
        self.length += 1
        self.seen += 1
        self.version += 1
        self.run_prepare(self.length - 1, self.length)

    def run_prepare(self, start: int, end: int) -> None:
        if self.pipeline is None:
            return
        self._prep = (start // self.page_size * self.page_size, end)
        try:
            self.memory = self.pipeline.build((self, start, end), self.memory)
        finally:
            self._prep = None
        if self.memory is not None:
            self.memory.meta["window_start"] = 0

    def gather(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A contiguous copy of logical tokens ``[lo, hi)``: ``[1, H_kv, hi-lo, D]`` keys and values."""
        s = self.slots[lo:hi]
        return self.pool.k.index_select(2, s), self.pool.v.index_select(2, s)

    # -- what method code reads: a staged logical copy ----------------------------------------------
    def _staged(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._prep if self._prep is not None else (0, self.length)
        sk, sv = self.pool.stage_buffers(self.capacity)
        st = self.pool.staged
        if not (st is not None and st[0] is self and st[1] == self.version and st[2] <= lo and st[3] >= hi):
            if hi > lo:
                k, v = self.gather(lo, hi)
                sk[:, :, lo:hi] = k
                sv[:, :, lo:hi] = v
            self.pool.staged = (self, self.version, lo, hi)
        return sk[:, :, : self.capacity], sv[:, :, : self.capacity]

    @property
    def buf_k(self) -> torch.Tensor:
        return self._staged()[0]

    @property
    def buf_v(self) -> torch.Tensor:
        return self._staged()[1]

    # -- eviction (compressed-KV methods) -----------------------------------------------------------
    def compact(self, keep: torch.Tensor) -> None:
        """Keep only tokens ``keep [1, H_kv, k]`` (sorted ids per KV head) at logical ``[0, k)``; the pages past
        them go back to the pool."""
        n = keep.shape[-1]
        slot = self.slots[keep]  # [1, H, k]
        k = torch.gather(self.pool.k, 2, slot.unsqueeze(-1).expand(*slot.shape, self.pool.k.shape[-1]))
        v = torch.gather(self.pool.v, 2, slot.unsqueeze(-1).expand(*slot.shape, self.pool.v.shape[-1]))
        dst = self.slots[:n]
        self.pool.k.index_copy_(2, dst, k)
        self.pool.v.index_copy_(2, dst, v)
        keep_pages = -(-n // self.pool.page_size)
        self.pool.release(self.blocks[keep_pages:])
        del self.blocks[keep_pages:]
        self.length = n
        self.version += 1

    # -- attention over the pool, in place ------------------------------------------------------------
    def attend_all(self, target: DecodeTarget) -> torch.Tensor:
        """Decode attention over every stored token: ``[1, H_kv, G, Dv]``."""
        L = self.length
        slots = self.slots[:L].view(1, 1, L).expand(1, self.pool.k.shape[1], L)
        return self._attend_slots(target, slots)

    def attend_units(self, selection: Selection, target: DecodeTarget) -> torch.Tensor | None:
        """Decode attention over a top-k selection of logical units (pages of ``selection.unit_size`` tokens, or
        tokens), read from the pool in place. None when the selection is ragged in a way only the method's own
        Apply handles (some rows hold the partial last unit, others not)."""
        U, L = selection.unit_size, selection.length
        idx = selection.indices  # [1, H, k] sorted logical units
        if U == 1:
            tok = idx
        else:
            tok = (idx.unsqueeze(-1) * U + torch.arange(U, device=idx.device)).flatten(-2)
            pad = -(-L // U) * U - L
            if pad:
                last = idx[..., -1] == selection.n_units - 1
                if bool(last.all()):
                    tok = tok[..., :-pad]  # the partial last unit is the last one in every row
                elif bool(last.any()):
                    return None
        return self._attend_slots(target, self.slots[tok])

    def _attend_slots(self, target: DecodeTarget, slots: torch.Tensor) -> torch.Tensor:
        q, k, v = target.q, self.pool.k, self.pool.v
        if self.pool.fast(q):
            out = fast.page_attention(q, k, v, slots, 1, 0, k.shape[2], target.scale, softcap=target.softcap,
                                      sinks=target.sinks)
            return out.to(q.dtype)
        ks = torch.gather(k, 2, slots.unsqueeze(-1).expand(*slots.shape, k.shape[-1]))
        vs = torch.gather(v, 2, slots.unsqueeze(-1).expand(*slots.shape, v.shape[-1]))
        return grouped_decode_attention(q, ks, vs, target.scale, softcap=target.softcap, sinks=target.sinks)

    # -- transformers' layer interface (B=1: a joining sequence's prefill, or one sequence's decode) -------
    def lazy_initialization(self, key_states, value_states) -> None:  # storage is the pool's
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start, end = self.write(key_states, value_states)
        if start == 0:
            return key_states, value_states  # the chunk is everything stored: no copy
        return self.gather(0, end)  # a later prefill chunk attends over the whole past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, self.seen - self.length

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.release()
        self.seen = 0


def write_rows(pool: PagePool, views: list, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """One decode token per sequence: row ``b`` of ``key_states [B, H_kv, 1, D]`` goes to ``views[b]`` (None: a
    padding row, dropped), all rows in one copy per tensor; then each sequence's Prepare runs on its token."""
    rows = [b for b, v in enumerate(views) if v is not None]
    if not rows:
        return
    slots = torch.tensor([views[b].next_slot() for b in rows], dtype=torch.long, device=pool.device)
    sel = torch.tensor(rows, dtype=torch.long, device=key_states.device)
    k = key_states.index_select(0, sel)[:, :, 0].transpose(0, 1).unsqueeze(0)  # [1, H_kv, n, D]
    v = value_states.index_select(0, sel)[:, :, 0].transpose(0, 1).unsqueeze(0)
    pool.k.index_copy_(2, slots, k.to(pool.dtype))
    pool.v.index_copy_(2, slots, v.to(pool.dtype))
    for b in rows:
        views[b].advance()


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
