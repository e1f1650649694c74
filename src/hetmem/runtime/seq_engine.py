"""A generation engine that runs one request at a time on the ``hetmem run`` generate path.

``SeqEngine(lm)`` implements ``runtime.engine_api.Engine``: ``submit`` validates a request at once (an
unknown method, a bad parameter through ``methods.get_method``, a method family that does not run inside the
model, an empty prompt, a prompt that with ``max_tokens`` does not fit the window) and queues it; one worker
thread takes requests in arrival order and runs each through ``llm.generate.generate`` with the request's method
in every attention layer and the per-step timer on, calling ``on_event`` with one ``TokenEvent`` per token.

- Greedy (``temperature == 0``) or sampled: temperature, nucleus ``top_p``, and a per-request
  ``torch.Generator`` seeded with ``seed`` (a fresh random seed when None), so a seeded request is reproducible.
- Ends at an end-of-sequence token (``"stop"``, not shown as text), at a stop string (``"stop"``; the text is
  cut before it, and text that may be the start of a stop string is held back until it is not), or after
  ``max_tokens`` (``"length"``).
- Incremental detokenisation: each event carries the text the new token adds to the decoded whole (an
  incomplete UTF-8 sequence, decoded as U+FFFD, waits for the next token).
- ``cancel(request_id)`` (not part of the Engine protocol: the server calls it when a client disconnects)
  drops a queued request, or stops a running one after its current token.
- With a ``NodeCluster``, sparse-attention methods keep their memory on the Ray memory nodes
  (``runtime.nodes.client.NodeMethod``); the final event's report then carries the measured transfers.

``runtime.serve_engine.make_engine`` chooses the engine the server runs (this one for what the batch engine does not take).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import deque

import torch

from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError
from hetmem.llm.generate import generate
from hetmem.llm.prompt import eos_ids
from hetmem.methods import get_method
from hetmem.runtime.engine_api import GenRequest, OnEvent, Sampling, TokenEvent
from hetmem.runtime.nodes.client import NodeMethod
from hetmem.runtime.nodes.run import annotate

# Method families that run inside the model's attention layers (the others, RAG and contextual memory, make
# their own LLM calls; the server offers RAG through a memory loaded at start instead).
IN_MODEL_FAMILIES = ("baseline", "sparse-attention", "compressed-kv")


def check_request(req: GenRequest, max_context: int):
    """The method built from ``req`` (every parameter checked), or HetmemError with one line."""
    if not req.prompt_ids:
        raise HetmemError("the prompt is empty")
    s = req.sampling
    if not isinstance(s.max_tokens, int) or s.max_tokens < 1:
        raise HetmemError(f"max_tokens must be at least 1 (got {s.max_tokens!r})")
    if not (0.0 <= s.temperature <= 10.0):
        raise HetmemError(f"temperature must be between 0 and 10 (got {s.temperature!r})")
    if not (0.0 < s.top_p <= 1.0):
        raise HetmemError(f"top_p must be above 0 and at most 1 (got {s.top_p!r})")
    if any(not isinstance(x, str) or not x for x in s.stop):
        raise HetmemError("stop must be non-empty strings")
    method = get_method(req.method, **req.params)
    method.validate()
    if method.family not in IN_MODEL_FAMILIES:
        raise HetmemError(f"method '{method.name}' ({method.family}) does not run inside the model; the server runs "
                          f"{', '.join(IN_MODEL_FAMILIES)} methods (RAG: load a memory with --memory NAME=DIR)")
    n = len(req.prompt_ids)
    if n + s.max_tokens > max_context:
        raise HetmemError(f"the prompt is {n} tokens; with max_tokens {s.max_tokens} it needs {n + s.max_tokens}, "
                          f"more than the model's {max_context}-token window")
    return method


def sampler(s: Sampling):
    """``pick(logits [1, vocab]) -> id``: None for greedy; otherwise temperature + top-p from its own generator."""
    if s.temperature <= 0.0:
        return None
    gen = torch.Generator().manual_seed(s.seed if s.seed is not None else random.getrandbits(63))

    def pick(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits[0].float().cpu() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < s.top_p  # the smallest prefix whose mass reaches top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, si[keep], sp[keep])
        return int(torch.multinomial(probs, 1, generator=gen)[0])

    return pick


class Detokenizer:
    """Text of a growing id list, handed out in pieces, with stop strings cut and their possible starts held."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return ""
        if self.stop:
            hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._take(text, min(hits))
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            return self._take(text, len(text) - hold)
        return self._take(text, len(text))

    def flush(self) -> str:
        """What is still held back at the end (a possible stop-string start that never completed)."""
        if self.stopped:
            return ""
        return self._take(self.tok.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd"), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class SeqEngine:
    """One request at a time, in arrival order, on a worker thread (see the module docstring)."""

    kind = "sequential"

    def __init__(self, lm, *, cluster=None, layout: str = "attention", max_queue: int = 256, step_timing: bool = True):
        self.lm = lm
        self.model_name = lm.name
        self.model_lock = threading.Lock()  # one forward on the model at a time (see BatchEngine.model_lock)
        self.max_context = lm.max_context
        self.cluster, self.layout = cluster, layout
        self.max_queue = max_queue
        self.step_timing = step_timing
        self.eos = eos_ids(lm.tokenizer, lm.model)
        self.device = str(next(lm.model.parameters()).device)
        self._q: queue.Queue = queue.Queue()
        self._cancelled: set[str] = set()
        self._running: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._steps = self._tokens = self._requests = self._errors = 0
        self._recent: deque = deque(maxlen=4096)  # (monotonic time, tokens) of recent tokens, for tokens/s
        self._worker = threading.Thread(target=self._loop, name="hetmem-seq-engine", daemon=True)
        self._worker.start()

    # -- the Engine protocol ----------------------------------------------------------------------------------
    def submit(self, req: GenRequest, on_event: OnEvent) -> None:
        if self._closed:
            raise HetmemError("the engine is shutting down")
        method = check_request(req, self.max_context)
        if self._q.qsize() >= self.max_queue:
            raise HetmemError(f"the queue is full ({self.max_queue} requests waiting)")
        self._q.put((req, method, on_event, time.monotonic()))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)

    def stats(self) -> dict:
        now = time.monotonic()
        recent = [n for t, n in list(self._recent) if now - t <= 10.0]
        return {"engine": self.kind, "queue_depth": self._q.qsize(), "running": 1 if self._running else 0,
                "steps": self._steps, "tokens": self._tokens, "requests": self._requests, "errors": self._errors,
                "tokens_per_s": round(sum(recent) / 10.0, 3)}

    def close(self) -> None:
        """Fail what is queued, let the running request stop after its current token, end the worker."""
        self._closed = True
        while True:
            try:
                req, _, on_event, _ = self._q.get_nowait()
            except queue.Empty:
                break
            self._safe(on_event, TokenEvent(req.request_id, finish_reason="error", error="the server is shutting down"))
        if self._running:
            self.cancel(self._running)
        self._q.put(None)
        self._worker.join(timeout=30)

    # -- the worker -------------------------------------------------------------------------------------------
    @staticmethod
    def _safe(on_event: OnEvent, ev: TokenEvent) -> None:
        try:
            on_event(ev)
        except Exception:  # noqa: BLE001 - a failing listener (a closed client) must not stop the engine
            pass

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            req, method, on_event, queued = item
            with self._lock:
                if req.request_id in self._cancelled:
                    self._cancelled.discard(req.request_id)
                    continue
                self._running = req.request_id
            try:
                self._run(req, method, on_event, queued)
            except HetmemError as e:
                self._errors += 1
                self._safe(on_event, TokenEvent(req.request_id, finish_reason="error", error=str(e)))
            except Exception as e:  # noqa: BLE001 - one line to the client; the engine keeps serving
                self._errors += 1
                msg = str(e).splitlines()[0] if str(e) else ""
                self._safe(on_event, TokenEvent(req.request_id, finish_reason="error",
                                                error=f"internal error: {type(e).__name__}: {msg}"))
            finally:
                with self._lock:
                    self._running = None
                    self._cancelled.discard(req.request_id)

    def _run(self, req: GenRequest, method, on_event: OnEvent, queued: float) -> None:
        lm, s = self.lm, req.sampling
        t0 = time.perf_counter()
        wait_ms = (time.monotonic() - queued) * 1e3
        detok = Detokenizer(lm.tokenizer, s.stop)
        state = {"n": 0, "finish": None, "first_ms": None}

        def on_id(tid: int) -> bool:
            state["n"] += 1
            self._steps += 1
            self._tokens += 1
            self._recent.append((time.monotonic(), 1))
            if state["first_ms"] is None:
                state["first_ms"] = (time.perf_counter() - t0) * 1e3
            if tid in self.eos:
                state["finish"] = "stop"
                state["last"] = (None, detok.flush())  # a held-back possible stop-string start is text after all
                return True
            text = detok.add(tid)
            if detok.stopped:
                state["finish"] = "stop"
            elif state["n"] >= s.max_tokens:
                state["finish"] = "length"
                text += detok.flush()
            if state["finish"] is None:
                self._safe(on_event, TokenEvent(req.request_id, tid, text))
            else:
                state["last"] = (tid, text)
            if req.request_id in self._cancelled:
                state["finish"] = state["finish"] or "cancelled"
                return True
            return state["finish"] is not None

        run_method = NodeMethod(method, self.cluster, self.layout) if (
            self.cluster is not None and method.family == "sparse-attention") else method
        timer = StepTimer(enabled=self.step_timing)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long)
        with self.model_lock:  # shared with the batch engine on the same model (serve_engine.make_engine)
            res = generate(lm.model, ids, run_method, s.max_tokens, eos_token_ids=self.eos, progress=False,
                           timer=timer, pick=sampler(s), on_id=on_id)
        if run_method is not method:
            run_method.close_session()
        finish = state["finish"] or "length"
        tid, text = state.get("last", (None, ""))
        if finish == "cancelled":
            return
        self._requests += 1
        report = {
            "method": method.name, "params": method.params(), "notes": method.notes(), "model": lm.name,
            "device": self.device, "engine": self.kind, "time_source": "measured",
            "queue_ms": round(wait_ms, 3), "first_token_ms": round(state["first_ms"] or 0.0, 3),
            "total_ms": round((time.perf_counter() - t0) * 1e3, 3),
            "prefill_ms": round(res.prefill_ms, 3), "decode_ms": round(res.decode_ms, 3),
            "tokens": {"prompt": len(req.prompt_ids), "generated": len(res.token_ids)},
            "steps": res.timer.summary(), "memory": res.memory,
        }
        if run_method is not method:
            annotate(report, run_method, self.cluster)
            report.pop("transfers", None)  # per-layer rows: the totals stay (memory_nodes.transfers_total)
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(res.token_ids)}
        self._safe(on_event, TokenEvent(req.request_id, tid, text, finish_reason=finish, usage=usage, report=report))
