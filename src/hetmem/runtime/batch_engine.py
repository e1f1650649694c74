"""Continuous batching over a page pool: the engine behind ``hetmem serve`` (``runtime.engine_api.Engine``).

One thread runs steps. A submitted request waits in a queue until a batch slot and its pages (prompt +
``max_tokens``, reserved up front, so a running sequence never waits for memory) are free; it then joins:
its prompt is prefilled on its own (B=1, in chunks of ``prefill_chunk`` tokens; about that many prompt tokens
between two of the running batch's decode steps) straight into pool pages (``llm.page_pool``), and from the next step on it decodes with the others.

A decode step is ONE model forward over every running sequence: ``input_ids [B, 1]`` with each row's own
``position_ids``, through a ``transformers.cache_utils.Cache`` whose layer writes each row's new K/V into that
sequence's pages (running its Prepare) and the ``"hetmem"`` attention hook (``llm.attention``), which runs
each row's own method (Relevancy, Retrieval, Apply) over its own pages: ragged lengths, per-row methods and
budgets. The linear layers run once for the batch (the weights are read once per step), which is where the
throughput comes from. Dense and top-k Apply steps read the pool in place (``PooledLayer.attend_all`` /
``attend_units``); any other Apply runs the method's own code on a staged copy (see ``llm.page_pool``).

Batch invariance: a request's greedy output is the same alone or batched. Attention is per sequence, so only
the GEMMs could differ; CPU BLAS computes a row of ``x @ W`` with a different summation order for small row
counts (measured here: below 16 rows, rows change in the last bits with the batch size), and identical from
16 rows on whatever the other rows hold. So every decode step runs at least ``min_rows`` rows (default 16;
the extra rows are padding whose attention is skipped). ``min_rows=1`` turns this off.

Each request keeps its own StepTimer; ``stats()`` sums step times by (method, step, phase, device).
Methods that cannot run per decode step here are refused at submit in one line: contextual-memory and RAG
methods (they make their own LLM calls), a method with its own cache layer (kvquant), and methods whose
Prepare observes prefill queries (h2o, snapkv).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from hetmem.core.timer import StepTimer
from hetmem.core.types import DecodeTarget, Query
from hetmem.errors import HetmemError
from hetmem.llm import attention
from hetmem.llm.arch import describe
from hetmem.llm.page_pool import PagePool, PooledLayer, write_rows
from hetmem.methods.base import get_method
from hetmem.methods.seer import BlockSparseAttention
from hetmem.methods.shared import DenseAttentionApply, GatherAttention
from hetmem.runtime.engine_api import GenRequest, OnEvent, Sampling, TokenEvent
from hetmem.runtime.nodes.client import NodeMethod, decode_rows, is_remote
from hetmem.runtime.nodes.run import annotate

BATCHED_FAMILIES = ("baseline", "sparse-attention", "compressed-kv")


class EngineBusy(HetmemError):
    """The queue of waiting requests is full (the front answers 429)."""


# -- caches handed to the model -------------------------------------------------------------------------
class PooledCache(Cache):
    """One sequence's views of every layer, as a transformers Cache (its prefill, or B=1 decode)."""

    def __init__(self, views: list[PooledLayer]):
        super().__init__(layers=list(views))


class _BatchLayer(CacheLayerMixin):
    """One layer of a batched decode step: row ``b`` is sequence ``rows[b]``'s view (None: a padding row)."""

    is_compileable = False
    is_croppable = False
    sliding_window = None

    def __init__(self, rows: list[PooledLayer | None]):
        super().__init__()
        self.rows = rows
        self.is_initialized = True
        self.hidden = None

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        live = [v for v in self.rows if v is not None]
        if live:
            write_rows(live[0].pool, self.rows, key_states, value_states)
        return key_states, value_states  # unused: the hook attends over each row's pages

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # one query per row and no padding mask: the mask is skipped (attention is ours)

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    def __init__(self, layers: list[_BatchLayer]):
        super().__init__(layers=layers)


# -- the attention hook's runtime for the engine -----------------------------------------------------------------
def pooled_apply(step, view: PooledLayer, selection, target: DecodeTarget) -> torch.Tensor:
    """A method's Apply over a pooled layer: dense and top-k gather attention read the pool in place; any other
    Apply step runs its own code (on the staged copy)."""
    kind = type(step)
    if kind is DenseAttentionApply or (selection is None and kind in (GatherAttention, BlockSparseAttention)):
        return view.attend_all(target)
    if kind in (GatherAttention, BlockSparseAttention) and selection.form == "topk":
        out = view.attend_units(selection, target)
        if out is not None:
            return out
    return step.apply(view, selection, target)


def _row_inputs(module, view: PooledLayer, query: torch.Tensor, scale: float, softcap, sinks):
    """One sequence's decode query ``[1, H, 1, D]`` as the pipeline's Query and Apply's DecodeTarget."""
    Hkv = view.pool.k.shape[1]
    q = query.reshape(1, Hkv, query.shape[1] // Hkv, query.shape[-1])
    sk = sinks.reshape(Hkv, -1) if sinks is not None else None
    target = DecodeTarget(q, scale, softcap=softcap, sinks=sk)
    qobj = Query(vectors=q, meta={"hidden": view.hidden, "layer": module.layer_idx, "scale": scale,
                                  "softcap": softcap, "sinks": sk})
    return qobj, target


def decode_attend(module, view: PooledLayer, query: torch.Tensor, scale: float, softcap, sinks) -> torch.Tensor:
    """One sequence's decode attention through its layer's pipeline: ``query [1, H, 1, D]`` -> ``[1, H, 1, Dv]``."""
    pipe = view.pipeline
    H = query.shape[1]
    qobj, target = _row_inputs(module, view, query, scale, softcap, sinks)
    if pipe is None:
        out = view.attend_all(target)
    else:
        selection = pipe.select(view.memory, qobj) if view.memory is not None else None
        pipe.last_selection = selection
        with pipe.timer.step("apply", pipe.apply.device):
            out = pooled_apply(pipe.apply, view, selection, target)
    return out.reshape(1, H, 1, -1)


def decode_on_nodes(module, views: list[PooledLayer], query: torch.Tensor, scale: float, softcap,
                    sinks) -> list[torch.Tensor]:
    """Several sequences' decode attention of one layer on the memory nodes, one call per node per round for
    all of them (``runtime.nodes.client.decode_rows``): ``query [n, H, 1, D]`` -> n outputs ``[1, H, 1, Dv]``."""
    H = query.shape[1]
    rows = []
    for b, view in enumerate(views):
        qobj, target = _row_inputs(module, view, query[b : b + 1], scale, softcap, sinks)
        rows.append((view.pipeline, view.memory, qobj, view, target))
    outs = decode_rows(rows, lambda i, step, sel: pooled_apply(step, views[i], sel, rows[i][4]))
    return [o.reshape(1, H, 1, -1) for o in outs]


class PooledRuntime(attention.SparseRuntime):
    """``SparseRuntime`` over pooled layers: prefill as usual (dense, timed as Apply); decode, of one sequence or
    a batch, per row through that row's own pipeline, reading its pages in place. Rows whose pipeline runs on
    memory nodes are decoded together (``decode_on_nodes``): one call per node per layer for all of them."""

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.cache.layers[module.layer_idx]
        rows = layer.rows if isinstance(layer, _BatchLayer) else None
        if rows is None and (query.shape[2] != 1 or self.prefill):
            return super().attend(module, query, key, value, attention_mask, scaling, **kwargs)
        attention.check_window(module, layer, kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        softcap, sinks = kwargs.get("softcap"), attention._sinks(kwargs)
        if rows is None:
            rows = [layer]
        parts: list = [None] * len(rows)
        remote = [b for b, v in enumerate(rows) if v is not None and v.memory is not None and is_remote(v.pipeline)]
        if remote:
            outs = decode_on_nodes(module, [rows[b] for b in remote], query[remote], scale, softcap, sinks)
            for b, o in zip(remote, outs):
                parts[b] = o
        for b, view in enumerate(rows):
            if parts[b] is not None:
                continue
            if view is None:
                parts[b] = query.new_zeros(1, query.shape[1], 1, value.shape[-1])
            else:
                parts[b] = decode_attend(module, view, query[b : b + 1], scale, softcap, sinks)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out.transpose(1, 2), None


# -- one request ----------------------------------------------------------------------------------------------
@dataclass(eq=False)  # compared by identity (list membership, removal)
class _Seq:
    req: GenRequest
    on_event: OnEvent
    method: object
    timer: StepTimer
    views: list[PooledLayer]
    gen: torch.Generator | None
    reserve_pages: int
    max_tokens: int
    t_submit: float
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent
    prefill_pos: int = 0
    last_logits: torch.Tensor | None = None
    t_first: float | None = None
    t_admit: float | None = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    folded: dict = field(default_factory=dict)
    done: bool = False
    cancelled: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def seen(self) -> int:
        return self.views[0].seen


def sample_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    """Greedy (``temperature`` 0) or temperature + nucleus sampling with the request's own generator."""
    if sampling.temperature <= 0 or gen is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = (p.cumsum(0) - p) < sampling.top_p
        p = torch.where(keep, p, torch.zeros_like(p))
        j = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        return int(idx[j])
    return int(torch.multinomial(probs, 1, generator=gen))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class BatchEngine:
    """Continuous batching over a page pool (see the module doc). Implements ``engine_api.Engine``."""

    def __init__(self, model, tokenizer, *, model_name: str = "model", max_batch: int = 16, page_size: int = 16,
                 pool_tokens: int | None = None, max_context: int | None = None, prefill_chunk: int = 512,
                 max_queue: int = 1024, min_rows: int = 16, eos_token_ids=None, cluster=None,
                 layout: str = "attention", rounds: int = 1):
        attention.install(model)
        # memory nodes (runtime.nodes.cluster.NodeCluster): sparse-attention requests run their steps there
        self.cluster, self.layout, self.rounds = cluster, layout, rounds
        arch = describe(model)
        if arch.mla_rank is not None or any(w is not None for w in arch.windows):
            raise HetmemError(f"the batching engine runs full-attention models without MLA; {model.config.model_type} "
                              "has sliding-window or latent-attention layers (use the one-at-a-time engine)")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.arch = arch
        self.n_layers = arch.n_layers
        self.device = str(next(model.parameters()).device)
        self.max_batch, self.min_rows, self.prefill_chunk, self.max_queue = max_batch, min_rows, prefill_chunk, max_queue
        window = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_context = min(max_context or window, window)
        pool_tokens = pool_tokens or max_batch * min(self.max_context, 2048)
        n_pages = -(-pool_tokens // page_size)
        dtype = next(model.parameters()).dtype
        self.pools = [PagePool(n_pages, page_size, arch.kv_heads, arch.key_dim, _value_dim(model, arch), dtype,
                               self.device) for _ in range(self.n_layers)]
        self.max_context = min(self.max_context, n_pages * page_size)
        eos = set(eos_token_ids or ())
        if not eos:
            for src in (getattr(model, "generation_config", None), model.config, tokenizer):
                e = getattr(src, "eos_token_id", None) if src is not None else None
                eos.update([e] if isinstance(e, int) else (e or []))
        self.eos = eos
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self._methods: dict = {}
        self._mlock = threading.Lock()  # submit() may be called from several threads: one bind at a time
        # One forward on the model at a time: another engine on the same model (make_engine's one-at-a-time engine)
        # shares this lock, so their forward hooks (hidden-state capture) never see each other's forwards.
        self.model_lock = threading.Lock()
        self._queue: collections.deque[_Seq] = collections.deque()
        self._joining: list[_Seq] = []
        self._running: list[_Seq] = []
        self._committed = 0  # pages reserved by admitted sequences (per layer)
        self._cv = threading.Condition()
        self._closed = False
        self._cancel: set[str] = set()
        self._steps = self._tokens = self._prompt_tokens = self._finished = 0
        self._decode_ms = 0.0
        self._step_ms: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
        # One (method, step, phase, device, ms) per request per engine step (its layers summed), for histograms.
        self._observed: collections.deque = collections.deque(maxlen=100_000)
        self._hooks = [m.register_forward_pre_hook(self._capture_hidden, with_kwargs=True)
                       for m in attention.attention_modules(model)]
        self._cache = None  # the cache of the forward in flight (for the hidden-state hook)
        self._need_hidden = False  # whether a sequence in that forward has a method that reads attention inputs
        self._thread = threading.Thread(target=self._loop, name="hetmem-batch-engine", daemon=True)
        self._thread.start()

    # -- the Engine interface ----------------------------------------------------------------------------
    def submit(self, req: GenRequest, on_event: OnEvent) -> None:
        with self._mlock:
            seq = self._make_seq(req, on_event)
        with self._cv:
            if self._closed:
                raise HetmemError("the engine is shut down")
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"the queue is full ({self.max_queue} requests waiting)")
            self._queue.append(seq)
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        """Stop a request (its client went away): it leaves at the next step and its pages are freed."""
        with self._cv:
            self._cancel.add(request_id)
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            steps = [{"method": m, "step": s, "phase": ph, "device": d, "ms": round(v[0], 3), "calls": v[1]}
                     for (m, s, ph, d), v in sorted(self._step_ms.items())]
            pool = self.pools[0]
            return {"queue_depth": len(self._queue), "prefilling": len(self._joining),
                    "running": sum(1 for s in self._running if not s.done),
                    "steps": self._steps, "tokens": self._tokens, "prompt_tokens": self._prompt_tokens,
                    "finished": self._finished, "decode_ms": round(self._decode_ms, 3), "step_ms": steps,
                    "transfer_bytes": 0, "pool_pages": pool.n_pages, "pool_free_pages": pool.n_free,
                    "page_tokens": pool.page_size}

    def observations(self) -> list[tuple[str, str, str, str, float]]:
        """The step times observed since the last call, and clears them: one ``(method, step, phase, device, ms)``
        per request per engine step (a prefill chunk or a decode step), its layers summed. For /metrics histograms
        (``stats()["step_ms"]`` holds the running sums and counts)."""
        with self._cv:
            out = list(self._observed)
            self._observed.clear()
        return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- admission ---------------------------------------------------------------------------------------
    def _bound_method(self, name: str, params: dict):
        key = (name, tuple(sorted((k, repr(v)) for k, v in params.items())))
        m = self._methods.get(key)
        if m is None:
            m = get_method(name, **params)
            why = unbatchable(m)
            if why is None:
                m.bind(self.model)
                why = unbatchable(m, self.n_layers)
            if why:
                raise HetmemError(why)
            if len(self._methods) > 64:
                self._methods.clear()
            self._methods[key] = m
        return m

    def _make_seq(self, req: GenRequest, on_event: OnEvent) -> _Seq:
        s = req.sampling
        n = len(req.prompt_ids)
        if n == 0:
            raise HetmemError("empty prompt")
        if n >= self.max_context:
            raise HetmemError(f"prompt of {n} tokens is over the window ({self.max_context} tokens with room for one "
                              "generated token)")
        if s.max_tokens < 1:
            raise HetmemError(f"max_tokens must be at least 1 (got {s.max_tokens})")
        if s.temperature < 0 or not (0.0 < s.top_p <= 1.0):
            raise HetmemError(f"need temperature >= 0 and 0 < top_p <= 1 (got {s.temperature}, {s.top_p})")
        vocab = self.model.config.vocab_size
        if any(not (0 <= int(t) < vocab) for t in req.prompt_ids):
            raise HetmemError(f"prompt token ids must be in [0, {vocab})")
        method = self._bound_method(req.method, dict(req.params))
        if self.cluster is not None and method.family == "sparse-attention":
            method = NodeMethod(method, self.cluster, self.layout, rounds=self.rounds)  # one per sequence
        max_tokens = min(s.max_tokens, self.max_context - n)
        timer = StepTimer()
        try:
            pipes = [method.pipeline(self.device, timer, layer_idx=i) for i in range(self.n_layers)]
        except Exception:
            if isinstance(method, NodeMethod):
                method.close_session()
            raise
        page = getattr(method, "page_size", 16)
        views = [PooledLayer(pool, page, p, n + max_tokens) for pool, p in zip(self.pools, pipes)]
        reserve = -(-views[0].capacity // self.pools[0].page_size)
        if reserve > self.pools[0].n_pages:
            raise HetmemError(f"the request needs {reserve} pages, the pool holds {self.pools[0].n_pages}")
        gen = None
        if s.temperature > 0:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(s.seed if s.seed is not None else random.getrandbits(63))
        return _Seq(req, on_event, method, timer, views, gen, reserve, max_tokens, time.perf_counter())

    def _admit(self) -> None:
        """Under the lock: move queued requests into the batch while slots and pages allow (in order)."""
        while self._queue and len(self._running) + len(self._joining) < self.max_batch:
            seq = self._queue[0]
            if self._committed + seq.reserve_pages > self.pools[0].n_pages:
                break
            self._queue.popleft()
            self._committed += seq.reserve_pages
            seq.t_admit = time.perf_counter()
            self._joining.append(seq)

    # -- the loop ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._closed and not (self._queue or self._joining or self._running):
                        self._cv.wait()
                    if self._closed:
                        break
                    self._apply_cancels()
                    self._admit()
                    joining = list(self._joining)
                budget = self.prefill_chunk  # prompt tokens prefilled between two decode steps (about)
                for seq in joining:
                    if budget <= 0:
                        break
                    budget -= self._prefill_step(seq)
                if self._running:
                    self._decode_step()
        with self._cv:
            rest = list(self._queue) + self._joining + self._running
            self._queue.clear()
        for seq in rest:
            self._fail(seq, "the engine shut down")

    def _apply_cancels(self) -> None:
        if not self._cancel:
            return
        gone = self._cancel
        self._cancel = set()
        for seq in [q for q in self._queue if q.req.request_id in gone]:
            self._queue.remove(seq)
        for seq in self._joining + self._running:
            if seq.req.request_id in gone:
                seq.cancelled = True
        self._joining = [s for s in self._joining if not s.cancelled or self._drop(s)]
        self._running = [s for s in self._running if not s.cancelled or self._drop(s)]

    def _drop(self, seq: _Seq) -> bool:
        self._release(seq)
        return False

    def _release(self, seq: _Seq) -> None:
        """Under the lock: give the sequence's pages back."""
        if seq.done:
            return
        seq.done = True
        if isinstance(seq.method, NodeMethod):
            try:
                seq.method.close_session()  # the nodes forget its shards
            except Exception:  # noqa: BLE001 - a node that is gone holds nothing to drop
                pass
        for v in seq.views:
            v.release()
        self._committed -= seq.reserve_pages
        self._fold(seq)
        self._finished += 1

    def _fold(self, seq: _Seq) -> None:
        """Under the lock: add the sequence's step times since the last fold to the engine's sums."""
        t = seq.timer
        name = seq.method.name
        for key, ms in list(t.ms.items()):
            prev_ms, prev_n = seq.folded.get(key, (0.0, 0))
            n = t.calls.get(key, 0)
            if n != prev_n:
                label = (name, key[0], key[1], t.devices.get(key[0], "cpu"))
                acc = self._step_ms[label]
                acc[0] += ms - prev_ms
                acc[1] += n - prev_n
                self._observed.append((*label, ms - prev_ms))
                seq.folded[key] = (ms, n)

    def _run_model(self, cache, seqs, **kw):
        with self.model_lock:  # shared with any other engine on this model (runtime.serve_engine.make_engine)
            self._cache = cache
            self._need_hidden = any(getattr(s.method, "needs_hidden", False) for s in seqs)
            try:
                return self.model(past_key_values=cache, use_cache=True, **kw).logits[:, -1].float()
            finally:
                self._cache = None

    def _capture_hidden(self, module, args, kwargs):
        cache = self._cache
        if cache is None or not self._need_hidden:
            return
        hs = kwargs.get("hidden_states", args[0] if args else None)
        layer = cache.layers[module.layer_idx]
        if isinstance(layer, _BatchLayer):
            for b, view in enumerate(layer.rows):
                if view is not None:
                    view.hidden = hs[b : b + 1]
        else:
            layer.hidden = hs

    def _prefill_step(self, seq: _Seq) -> int:
        """One chunk of a joining sequence's prompt (B=1) into its pages; the last chunk's logits give its first
        token, and it joins the running batch. Returns the tokens prefilled. Chunks always start at multiples of
        ``prefill_chunk`` (whatever else is joining), so a prompt is computed the same way alone or batched."""
        ids = seq.req.prompt_ids
        a = seq.prefill_pos
        b = min(len(ids), a + self.prefill_chunk)
        seq.timer.phase = "prefill"
        t0 = time.perf_counter()
        try:
            cache = PooledCache(seq.views)
            rt = PooledRuntime(cache, self.device)
            rt.prefill = True
            x = torch.tensor([ids[a:b]], device=self.device)
            pos = torch.arange(a, b, device=self.device).unsqueeze(0)
            with rt.activate():
                logits = self._run_model(cache, [seq], input_ids=x, position_ids=pos, logits_to_keep=1)
        except Exception as exc:  # a failing method must not stop the engine
            with self._cv:
                self._joining.remove(seq)
            self._fail(seq, f"prefill failed: {type(exc).__name__}: {exc}")
            return b - a
        seq.prefill_ms += (time.perf_counter() - t0) * 1e3
        seq.prefill_pos = b
        if b < len(ids):
            return b - a
        with self._cv:
            self._joining.remove(seq)
            self._prompt_tokens += len(ids)
            self._fold(seq)
        seq.timer.phase = "decode"
        if self._take_token(seq, logits[0]):
            with self._cv:
                self._running.append(seq)
        return b - a

    def _decode_step(self) -> None:
        rows = list(self._running)
        B = len(rows)
        Bp = max(B, self.min_rows)
        ids = torch.full((Bp, 1), self.pad_id, dtype=torch.long)
        pos = torch.zeros((Bp, 1), dtype=torch.long)
        for b, s in enumerate(rows):
            ids[b, 0] = s.out_ids[-1]
            pos[b, 0] = s.seen
        layers = [_BatchLayer([s.views[i] for s in rows] + [None] * (Bp - B)) for i in range(self.n_layers)]
        cache = BatchCache(layers)
        t0 = time.perf_counter()
        try:
            with PooledRuntime(cache, self.device).activate():
                logits = self._run_model(cache, rows, input_ids=ids.to(self.device), position_ids=pos.to(self.device))
        except Exception as exc:
            with self._cv:
                self._running = []
            for s in rows:
                self._fail(s, f"decode step failed: {type(exc).__name__}: {exc}")
            return
        ms = (time.perf_counter() - t0) * 1e3
        keep = []
        for b, s in enumerate(rows):
            s.decode_ms += ms
            if self._take_token(s, logits[b]):
                keep.append(s)
        with self._cv:
            self._steps += 1
            self._decode_ms += ms
            for s in rows:
                if not s.done:
                    self._fold(s)
            self._running = [s for s in self._running if s in keep or s not in rows]

    # -- tokens out -------------------------------------------------------------------------------------------
    def _take_token(self, seq: _Seq, logits: torch.Tensor) -> bool:
        """Sample the next token, send its event; False when the sequence finished (its pages are freed)."""
        s = seq.req.sampling
        tok = sample_token(logits, s, seq.gen)
        seq.out_ids.append(tok)
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        with self._cv:
            self._tokens += 1
        finish = None
        if tok in self.eos:
            finish, delta = "stop", seq.text[seq.sent :]
            seq.sent = len(seq.text)
        else:
            text = self.tokenizer.decode(seq.out_ids, skip_special_tokens=True)
            cut = -1
            if s.stop:
                lo = max(0, seq.sent - max(len(x) for x in s.stop))
                hits = [i for i in (text.find(x, lo) for x in s.stop if x) if i >= 0]
                cut = min(hits) if hits else -1
            if cut >= 0:
                seq.text = text[:cut]
                finish = "stop"
                delta = seq.text[seq.sent :]
                seq.sent = len(seq.text)
            else:
                seq.text = text
                if len(seq.out_ids) >= seq.max_tokens:
                    finish = "length"
                    upto = len(text)
                else:
                    upto = len(text) - _held_back(text, s.stop)
                    if text.endswith("\ufffd"):  # an incomplete character: wait for the rest of its bytes
                        upto = min(upto, len(text.rstrip("\ufffd")))
                delta = text[seq.sent : upto] if upto > seq.sent else ""
                seq.sent = max(seq.sent, upto)
        ev = TokenEvent(seq.req.request_id, token_id=tok, text=delta, finish_reason=finish)
        if finish is not None:
            with self._cv:
                self._release(seq)
            ev.usage = {"prompt_tokens": seq.prompt_len, "completion_tokens": len(seq.out_ids)}
            ev.report = self._report(seq)
        try:
            seq.on_event(ev)
        except Exception:  # the receiver is gone (a disconnected client): the sequence leaves
            if finish is None:
                with self._cv:
                    self._release(seq)
                return False
        return finish is None

    def _report(self, seq: _Seq) -> dict:
        now = time.perf_counter()
        rep = {"method": seq.method.name, "params": seq.method.params(), "notes": seq.method.notes(),
                "model": self.model_name, "device": self.device, "time_source": "measured",
                "tokens": {"prompt": seq.prompt_len, "generated": len(seq.out_ids)}, "steps": seq.timer.summary(),
                "prefill_ms": round(seq.prefill_ms, 3), "decode_ms": round(seq.decode_ms, 3),
                "queue_ms": round(((seq.t_admit or now) - seq.t_submit) * 1e3, 3),
                "ttft_ms": round(((seq.t_first or now) - seq.t_submit) * 1e3, 3),
                "total_ms": round((now - seq.t_submit) * 1e3, 3), "engine": "batch (page pool)",
                "kv_page_tokens": self.pools[0].page_size}
        if isinstance(seq.method, NodeMethod):
            annotate(rep, seq.method, self.cluster)
            rep.pop("transfers", None)  # the cluster's per-layer rows (every sequence's): this one's totals stay
        return rep

    def _fail(self, seq: _Seq, why: str) -> None:
        with self._cv:
            self._release(seq)
        try:
            seq.on_event(TokenEvent(seq.req.request_id, finish_reason="error", error=why.splitlines()[0][:500],
                                    usage={"prompt_tokens": seq.prompt_len, "completion_tokens": len(seq.out_ids)}))
        except Exception:
            pass


def unbatchable(method, n_layers: int = 0) -> str | None:
    """Why ``method`` cannot run in the batching engine (None when it can). With ``n_layers`` (after ``bind``), its
    pipelines are built and looked at too."""
    name = method.name
    if getattr(method, "family", None) not in BATCHED_FAMILIES:
        return (f"method '{name}' ({method.family}) is not run by the batching engine: it makes its own LLM calls "
                "or retrieves text")
    if getattr(method, "cache_layer", None) is not None:
        return f"method '{name}' keeps its own KV cache layer: not supported by the batching engine"
    quiet = StepTimer(enabled=False)
    pipes = [method.pipeline("cpu", quiet, layer_idx=i) for i in range(n_layers)]
    if any(getattr(getattr(p, "prepare", None), "observe", None) is not None for p in pipes):
        return f"method '{name}' observes prefill queries in its Prepare step: not supported by the batching engine"
    return None


def _value_dim(model, arch) -> int:
    cfg = model.config
    return getattr(cfg, "v_head_dim", None) or getattr(cfg, "head_dim", None) or arch.key_dim
