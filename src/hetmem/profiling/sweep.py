"""Model-shaped kernel sweep: a method's real per-layer pipeline on synthetic KV at a named model's shape.

What runs per (method, length), at the shape's KV heads / head dim / dtype:

* **prefill** (memory build only): the synthetic context (random K/V) is written into a real
  ``PagedKVLayer`` chunk by chunk, so the method's Prepare builds its summaries as in a prefill.
  The dense prefill itself (64k tokens through the whole model) is *not* run: no prefill total.
* **decode**: per token, ONE decoder layer (one per kind of layer the method builds: quest keeps its
  first layers dense) at the shape runs for real: RMSNorm, Q/K/V projections,
  KV-cache append (+ the method's Prepare), the method's Relevancy / Retrieval / Apply on that layer's
  cache, O projection, RMSNorm, gated MLP. RoPE is left out (elementwise, small). Times (and counts)
  of that layer are multiplied by the number of layers of its kind; the final norm and LM head are timed on a
  slice of the vocabulary (at most 16,384 rows) and scaled to the full vocabulary. Every such figure
  is labelled ``measured, K of N layers timed, scaled to N``.

Shapes are data (``SHAPES``, or a JSON file with the same fields).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hetmem.core.device import sync
from hetmem.core.steps import STEP_NAMES
from hetmem.core.types import DecodeTarget, Query
from hetmem.errors import HetmemError
from hetmem.ops import counts as C
from hetmem.profiling.counters import OpTally, StepCounter
from hetmem.profiling.records import phase_records
from hetmem.core.timer import StepTimer
from hetmem.llm.paged_cache import PagedKVLayer


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    max_context: int
    source: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("llama3-8b", 32, 32, 8, 128, 4096, 14336, 128256, 131072, "Llama-3.1-8B config.json"),
    Shape("llama3-70b", 80, 64, 8, 128, 8192, 28672, 128256, 131072, "Llama-3.1-70B config.json"),
    Shape("qwen2.5-7b", 28, 28, 4, 128, 3584, 18944, 152064, 131072, "Qwen2.5-7B-Instruct config.json (YaRN 128k)"),
    Shape("qwen2.5-0.5b", 24, 14, 2, 64, 896, 4864, 151936, 32768, "Qwen2.5-0.5B config.json"),
    Shape("smollm2-135m", 30, 9, 3, 64, 576, 1536, 49152, 8192, "SmolLM2-135M config.json"),
    Shape("tiny", 4, 4, 2, 16, 64, 128, 128, 1 << 20, "hetmem.testing tiny config, 4 layers (for tests)"),
)}

LM_HEAD_ROWS = 16384


def get_shape(name: str) -> Shape:
    if name in SHAPES:
        return SHAPES[name]
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        try:
            d = json.loads(p.read_text())
            fields = {k: d[k] for k in ("layers", "heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab")}
            return Shape(d.get("name", p.stem), **{k: int(v) for k, v in fields.items()},
                         max_context=int(d.get("max_context", 1 << 30)), source=str(p))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise HetmemError(f"shape file {p} is not valid: {exc}") from None
    raise HetmemError(f"unknown shape '{name}': use one of {', '.join(SHAPES)} or a .json shape file")


def window_reason(length: int, after: int, window: int, name: str) -> str | None:
    """Why a ``length``-token context cannot run in a ``window``-token model, with ``after`` tokens after it."""
    if length > window:
        return f"over the window: {length} tokens > {name}'s {window}-token context"
    if after >= window:
        return f"over the window: the {after} tokens generated after the context fill {name}'s {window}-token context"
    return None


def fit_context(length: int, after: int, window: int, name: str, what: str) -> tuple[int, str | None]:
    """A length names the context. When the ``after`` tokens generated after it (``what``) would overrun the
    window, the context is shortened by that much and a one-line note says so."""
    if length + after <= window:
        return length, None
    ctx = window - after
    return ctx, (f"context shortened from {length} to {ctx} tokens so that the {what} "
                 f"fit in {name}'s {window}-token window")


def _avail_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover
        return 1 << 40


class LayerWeights:
    """Random weights of one decoder layer (and an LM-head slice) at a shape: what the decode step multiplies by."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        s = shape

        def w(o, i):
            return (torch.randn(o, i, generator=g) / math.sqrt(i)).to(dtype).to(device)

        self.q = w(s.heads * s.head_dim, s.hidden)
        self.k = w(s.kv_heads * s.head_dim, s.hidden)
        self.v = w(s.kv_heads * s.head_dim, s.hidden)
        self.o = w(s.hidden, s.heads * s.head_dim)
        self.gate = w(s.intermediate, s.hidden)
        self.up = w(s.intermediate, s.hidden)
        self.down = w(s.hidden, s.intermediate)
        self.norm1 = torch.ones(s.hidden, dtype=dtype, device=device)
        self.norm2 = torch.ones(s.hidden, dtype=dtype, device=device)
        self.lm_rows = min(s.vocab, LM_HEAD_ROWS)
        self.lm_head = w(self.lm_rows, s.hidden)
        self.final_norm = torch.ones(s.hidden, dtype=dtype, device=device)

    @staticmethod
    def bytes_needed(s: Shape, esize: int) -> int:
        per_layer = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden + 3 * s.hidden * s.intermediate
        return esize * (per_layer + min(s.vocab, LM_HEAD_ROWS) * s.hidden)


class ShapeModel(torch.nn.Module):
    """What ``Method.bind(model)`` reads, at a shape, without a model: a config and one attention module per
    layer whose q/k projections share the sweep's single layer weights (no extra memory per layer)."""

    def __init__(self, shape: Shape, weights: "LayerWeights"):
        super().__init__()
        from types import SimpleNamespace

        s = shape
        self.config = SimpleNamespace(
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
            hidden_size=s.hidden, intermediate_size=s.intermediate, vocab_size=s.vocab, max_position_embeddings=s.max_context)
        mods = []
        for i in range(s.layers):
            m = torch.nn.Module()
            m.layer_idx = i
            m.q_proj = _shared_linear(weights.q)
            m.k_proj = _shared_linear(weights.k)
            m.v_proj = _shared_linear(weights.v)
            m.o_proj = _shared_linear(weights.o)
            mods.append(m)
        self.layers = torch.nn.ModuleList(mods)


def _shared_linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(1, 1, bias=False)
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    lin.in_features, lin.out_features = w.shape[1], w.shape[0]
    return lin


def _rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-5)


class ShapeSweep:
    """Runs (method, length) pairs at one shape; weights are built once and shared."""

    def __init__(self, shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, decode_tokens: int = 4,
                 warmup: int = 1, batch: int = 1, prefill_chunk: int = 4096, seed: int = 0, counting: bool = True,
                 trace: bool = True):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.decode_tokens, self.warmup, self.batch = decode_tokens, warmup, batch
        self.prefill_chunk, self.seed = prefill_chunk, seed
        self.counting, self.trace = counting, trace
        self.esize = torch.empty(0, dtype=dtype).element_size()
        self._weights: LayerWeights | None = None
        self._kv: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def weights(self) -> LayerWeights:
        if self._weights is None:
            self._weights = LayerWeights(self.shape, self.dtype, self.device, self.seed)
        return self._weights

    # -- checks --------------------------------------------------------------------------------------
    def kv_bytes(self, length: int) -> int:
        s = self.shape
        return 2 * self.batch * s.kv_heads * (length + self.decode_tokens + self.warmup + 1) * s.head_dim * self.esize

    def fit(self, length: int) -> tuple[int, str | None]:
        """The context that runs for a named ``length``, and a one-line note when it is shorter.

        The warm-up and timed decode steps append to the KV cache after the context, so the context is
        shortened by what they need when ``length`` plus them would overrun the shape's window."""
        return fit_context(length, self.warmup + self.decode_tokens, self.shape.max_context, self.shape.name,
                           f"{self.warmup} warm-up + {self.decode_tokens} timed decode steps")

    def check(self, length: int) -> str | None:
        """Why ``length`` cannot run at this shape (None when it can)."""
        s = self.shape
        reason = window_reason(length, self.warmup + self.decode_tokens, s.max_context, s.name)
        if reason:
            return reason
        if not self.device.startswith("cuda"):
            # synthetic KV + the layer's cache (+ growth slack) + weights, kept under 80% of free memory
            est = 3 * self.kv_bytes(length) + (0 if self._weights else LayerWeights.bytes_needed(s, self.esize))
            avail = _avail_bytes()
            if est > 0.8 * avail:
                return f"out of memory (estimated): needs {est / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
        return None

    def synthetic_kv(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is None or self._kv[0] != length:
            self._kv = None
            gc.collect()
            s = self.shape
            g = torch.Generator(device="cpu").manual_seed(self.seed + length)
            shp = (self.batch, s.kv_heads, length, s.head_dim)
            k = torch.randn(shp, generator=g).to(self.dtype).to(self.device)
            v = torch.randn(shp, generator=g).to(self.dtype).to(self.device)
            self._kv = (length, k, v)
        return self._kv[1], self._kv[2]

    def release(self) -> None:
        self._kv = None
        gc.collect()

    # -- one (method, length) --------------------------------------------------------------------------
    def layer_groups(self, method) -> list[tuple[int, int]]:
        """(representative layer index, layer count) per distinct kind of layer pipeline the method builds
        (e.g. quest keeps its first ``dense_layers`` dense): one layer of each kind is timed."""
        t = StepTimer(enabled=False)
        groups: dict[tuple, list[int]] = {}
        for i in range(self.shape.layers):
            p = method.pipeline(self.device, t, layer_idx=i)
            sig = tuple(type(getattr(p, n)).__name__ for n in STEP_NAMES)
            groups.setdefault(sig, []).append(i)
        return [(idx[-1], len(idx)) for idx in groups.values()]

    def run(self, method, length: int, base: dict, progress=None) -> tuple[dict, list[dict], list[tuple]]:
        """Profile ``method`` at ``length``: returns (phases summary, records, trace events)."""

        s, dev, W = self.shape, self.device, self.weights
        B, H, Hkv, D = self.batch, s.heads, s.kv_heads, s.head_dim
        needs_hidden = bool(getattr(method, "needs_hidden", False))
        layer_cls = getattr(method, "cache_layer", None) or PagedKVLayer
        page_size = getattr(method, "page_size", 16)
        method.bind(ShapeModel(s, W))  # methods with per-layer weights (gates, indexers) size them at the shape
        groups = self.layer_groups(method)
        k_all, v_all = self.synthetic_kv(length)
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1)

        units = []  # per timed layer: (layer_idx, count, timer, counter, pipeline, cache layer)
        for idx, count in groups:
            timer = StepTimer(trace=self.trace)
            counter = StepCounter(timer, enabled=self.counting)
            pipe = counter.wrap(method.pipeline(dev, timer, layer_idx=idx))
            layer = layer_cls(page_size, pipe, reserve_tokens=length + self.warmup + self.decode_tokens + 1)
            # prefill: write the synthetic context chunk by chunk; the method's Prepare runs on each update
            timer.phase = "prefill"
            for a in range(0, length, self.prefill_chunk):
                kc, vc = k_all[:, :, a : a + self.prefill_chunk], v_all[:, :, a : a + self.prefill_chunk]
                if needs_hidden:
                    layer.hidden = torch.randn(B, kc.shape[2], s.hidden, generator=g).to(self.dtype).to(dev)
                layer.update(kc, vc)
            layer.hidden = None
            units.append((idx, count, timer, counter, pipe, layer))

        scale = D**-0.5
        x0 = torch.randn(B, 1, s.hidden, generator=g).to(self.dtype).to(dev)
        layer_ms = [0.0] * len(units)
        lm_ms = 0.0
        for i in range(self.warmup + self.decode_tokens):
            timed = i >= self.warmup
            for u, (idx, _count, timer, _counter, pipe, layer) in enumerate(units):
                timer.phase = "decode" if timed else "warmup"
                x = x0
                sync(dev)
                t0 = time.perf_counter()
                h = _rms(x, W.norm1)
                q = F.linear(h, W.q).view(B, Hkv, H // Hkv, D)
                k = F.linear(h, W.k).view(B, 1, Hkv, D).transpose(1, 2)
                v = F.linear(h, W.v).view(B, 1, Hkv, D).transpose(1, 2)
                layer.hidden = h
                layer.update(k, v)  # KV append + the method's Prepare
                query = Query(vectors=q, meta={"hidden": h, "layer": idx, "scale": scale})
                attn = pipe.query_and_apply(layer.memory, query, layer, DecodeTarget(q, scale))
                x = x + F.linear(attn.reshape(B, 1, H * D), W.o)
                h = _rms(x, W.norm2)
                x = x + F.linear(F.silu(F.linear(h, W.gate)) * F.linear(h, W.up), W.down)
                sync(dev)
                if timed:
                    layer_ms[u] += (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            F.linear(_rms(x, W.final_norm), W.lm_head)
            sync(dev)
            if timed:
                lm_ms += (time.perf_counter() - t1) * 1e3
            if progress is not None:
                progress()

        # one timer/counter for the whole model: each timed layer's figures x the layers of its kind
        timer, counter = StepTimer(trace=False), StepCounter(None)
        events = []
        for (idx, count, t, c, _p, _l) in units:
            _merge(timer, counter, t, c, count)
            events += [ev for ev in (t.events or []) if ev[1] != "warmup"]
        events.sort(key=lambda ev: ev[2])
        n = self.decode_tokens
        lm_scale = s.vocab / W.lm_rows
        total_ms = sum(ms * cnt for ms, (_i, cnt, *_r) in zip(layer_ms, units)) + lm_ms * lm_scale
        kinds = len(units)
        src = (f"measured, {kinds} of {s.layers} layers timed"
               + (" (one per kind of layer)" if kinds > 1 else "") + f", scaled to {s.layers}")
        e = self.esize
        one_layer = C.dense_layer(B, s.hidden, H, Hkv, D, s.intermediate, e)
        rest = OpTally(one_layer, n * s.layers).add(C.lm_head(B, s.hidden, s.vocab, e), n)
        # rest = total - steps: the dense layer parts, KV append, final norm and LM head (scaled)
        dec, dec_sum = phase_records(
            base=base, phase="decode", timer=timer, counter=counter, total_ms=total_ms, tokens=n, layers=s.layers,
            time_source=src, rest=rest, rest_calls=n * s.layers)
        pre, _ = phase_records(base=base, phase="prefill", timer=timer, counter=counter, total_ms=None,
                               tokens=length, layers=s.layers, time_source=src)
        phases = {"decode": dec_sum, "prefill": {"tokens": length, "total_ms": None,
                                                 "note": "sweep mode: only Prepare is run in prefill"},
                  "layers_timed": [{"layer": i, "scaled_to": cnt} for (i, cnt, *_r) in units]}
        del units
        return phases, pre + dec, events


def _merge(timer: StepTimer, counter: StepCounter, t: StepTimer, c: StepCounter, k: int) -> None:
    for key, ms in t.ms.items():
        timer.ms[key] += ms * k
        timer.calls[key] += t.calls[key] * k
        timer.devices[key[0]] = t.devices.get(key[0], "cpu")
    counter.merge(c, k)

