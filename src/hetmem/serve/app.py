"""The OpenAI-compatible HTTP front of ``hetmem serve``: a FastAPI app over an ``Engine``.

``Front(lm, engine, memories=..., api_key=...)`` holds what a request needs; ``build_app(front)`` makes the
FastAPI app (run in-process by tests, or as a Ray Serve ingress by ``serve.deploy``).

    POST /v1/chat/completions, POST /v1/completions   streaming (SSE: ``data: {...}`` chunks, ``data: [DONE]``)
                                                      or not; greedy by default (temperature 0), sampled with
                                                      temperature / top_p / seed; max_tokens; stop
    GET  /v1/models, /health, /metrics                 (/metrics: Prometheus text format)

Per-request memory options ride in the body's ``hetmem`` object: ``{"method": "quest", "budget": 1024}`` (any
parameter ``hetmem methods`` lists for the method) or ``{"memory": "NAME", "top_k": 4}`` (RAG over a memory
loaded at start; ``method`` then picks the in-model method the answer is generated with, dense by default).
A response carries ``usage`` and a ``hetmem`` object with the measured per-step times (as ``hetmem run --json``).

Bad input gets an OpenAI-style error JSON ``{"error": {"message", "type", "param", "code"}}``: 400 for an
unknown method or memory, a bad parameter, a prompt over the window, an empty message list, a non-JSON body;
413 for a body over ``max_body_bytes``; 401 for a missing or wrong bearer token (with ``api_key``); 429 when
``max_pending`` requests are already in flight. The server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse

from hetmem.errors import HetmemError
from hetmem.methods import REGISTRY
from hetmem.runtime.engine_api import GenRequest, Sampling, TokenEvent
from hetmem.serve import memories as mem

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_PENDING = 64
DEFAULT_MAX_TOKENS = 64
STEPS = ("prepare", "relevancy", "retrieval", "apply")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


class Metrics:
    """The /metrics families, in a registry of their own (several apps in one process do not clash)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        b = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.step = Histogram("hetmem_step_seconds", "measured time of one step over one request (all layers)",
                              ["method", "step", "device"], buckets=b, registry=r)
        self.transfer = Counter("hetmem_transfer_bytes", "bytes moved between the head and the memory nodes",
                                ["direction"], registry=r)
        self.tokens = Counter("hetmem_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("hetmem_prompt_tokens", "prompt tokens processed", registry=r)
        self.requests = Counter("hetmem_requests", "requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("hetmem_request_seconds", "request latency (submit to last token)", buckets=b,
                                 registry=r)
        self.ttft = Histogram("hetmem_time_to_first_token_seconds", "time to first token", buckets=b, registry=r)
        self.tps = Gauge("hetmem_tokens_per_second", "generated tokens per second over the last 10 s", registry=r)
        self.queue = Gauge("hetmem_queue_depth", "requests waiting for the engine", registry=r)
        self.batch = Gauge("hetmem_running_batch_size", "sequences the engine is decoding now", registry=r)
        self.pending = Gauge("hetmem_pending_requests", "requests accepted and not yet answered", registry=r)

    def observe_report(self, report: dict | None, usage: dict | None) -> None:
        if usage:
            self.tokens.inc(usage.get("completion_tokens", 0))
            self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        if not report:
            return
        method = report.get("method", "")
        for step, s in (report.get("steps") or {}).items():
            if step in STEPS and s.get("calls"):
                ran = s.get("ran_on") or []
                device = "nodes" if any(str(x).startswith("node") for x in ran) else s.get("device", "")
                self.step.labels(method, step, device).observe(s.get("ms", 0.0) / 1e3)
        for phase in ((report.get("memory_nodes") or {}).get("transfers_total") or {}).values():
            self.transfer.labels("head_to_node").inc(phase.get("bytes_to_node", 0))
            self.transfer.labels("node_to_head").inc(phase.get("bytes_to_head", 0))


def _prompt_from_messages(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(enc["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


class Front:
    """What the HTTP routes share: the model (its tokenizer), the engine, the memories, the limits, the metrics."""

    def __init__(self, lm, engine, *, memories: dict | None = None, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_pending: int = MAX_PENDING, on_close=None):
        self.lm, self.engine = lm, engine
        self.memories = memories or {}
        self.api_key = api_key
        self.max_body_bytes, self.max_pending = max_body_bytes, max_pending
        self.metrics = Metrics()
        self.pending = 0
        self.started = time.time()
        self._on_close = on_close

    def close(self) -> None:
        self.engine.close()
        if self._on_close is not None:
            self._on_close()

    # -- request parsing ----------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", "authentication_error",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "wrong API key", "authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"the request body is {int(length)} bytes, more than the {self.max_body_bytes}-byte "
                                "limit", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise ApiError(413, f"the request body is more than the {self.max_body_bytes}-byte limit",
                               code="body_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON: {str(e).splitlines()[0]}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        return data

    def sampling(self, body: dict) -> Sampling:
        def num(key, default, kind=float):
            v = body.get(key, default)
            if v is None:
                return default
            ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'} (got {v!r})", param=key)
            return kind(v)

        max_tokens = num("max_completion_tokens", None, int) if body.get("max_completion_tokens") is not None else \
            num("max_tokens", DEFAULT_MAX_TOKENS, int)
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1 (got {max_tokens})", param="max_tokens")
        temperature = num("temperature", 0.0)
        if not 0.0 <= temperature <= 2.0:
            raise ApiError(400, f"temperature must be between 0 and 2 (got {temperature})", param="temperature")
        top_p = num("top_p", 1.0)
        if not 0.0 < top_p <= 1.0:
            raise ApiError(400, f"top_p must be above 0 and at most 1 (got {top_p})", param="top_p")
        seed = num("seed", None, int) if body.get("seed") is not None else None
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
            raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
        n = body.get("n", 1)
        if n != 1:
            raise ApiError(400, f"n must be 1 (got {n!r})", param="n")
        return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop))

    def options(self, body: dict) -> tuple[str, dict, str | None, dict]:
        """(method, method params, memory name, RAG params) from the body's ``hetmem`` object."""
        opts = body.get("hetmem") or {}
        if not isinstance(opts, dict):
            raise ApiError(400, "hetmem must be an object", param="hetmem")
        opts = dict(opts)
        method = opts.pop("method", "dense")
        if not isinstance(method, str) or method not in REGISTRY:
            raise ApiError(400, f"unknown method '{method}': use one of {', '.join(sorted(REGISTRY))}",
                           param="hetmem.method", code="unknown_method")
        memory = opts.pop("memory", None)
        rag: dict = {}
        if memory is not None:
            if not isinstance(memory, str) or memory not in self.memories:
                have = ", ".join(sorted(self.memories)) or "none loaded (start the server with --memory NAME=DIR)"
                raise ApiError(400, f"unknown memory '{memory}': {have}", param="hetmem.memory", code="unknown_memory")
            q = mem.query_params(self.memories[memory])
            rag = {k: opts.pop(k) for k in list(opts) if k in q}
        return method, opts, memory, rag

    def build(self, body: dict, chat: bool) -> tuple[GenRequest, dict | None]:
        sampling = self.sampling(body)
        method, params, memory, rag_params = self.options(body)
        tok = self.lm.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            messages = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise ApiError(400, f"messages[{i}] must be an object with a role", param="messages")
                messages.append({"role": m["role"], "content": _text_content(m.get("content", ""), f"messages[{i}]")})
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string", param="prompt")
            if not prompt.strip():
                raise ApiError(400, "the prompt is empty", param="prompt")
            question = prompt
        rag_info = None
        if memory is not None:
            if not question or not question.strip():
                raise ApiError(400, "a memory request needs a non-empty user message (the question)", param="messages")
            session = self.memories[memory]
            try:
                got = mem.retrieve(session, question, rag_params)
            except HetmemError as e:
                raise ApiError(400, str(e), param="hetmem") from None

            def build_ids(k):
                text = f"{mem.context_text(session, got.ids[:k])}\n\nQuestion: {question.strip()}"
                if chat:
                    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
                    msgs2 = [dict(m) for m in messages]
                    msgs2[last]["content"] = text
                    return _prompt_from_messages(tok, msgs2)
                return list(tok(f"{text}\nAnswer:")["input_ids"])

            ids, kept = mem.fit(build_ids, len(got.ids), self.engine.max_context - sampling.max_tokens)
            rag_info = mem.rag_report(memory, session, got, kept)
        elif chat:
            if not any(m["content"].strip() for m in messages):
                raise ApiError(400, "the messages are empty", param="messages")
            ids = _prompt_from_messages(tok, messages)
        else:
            ids = list(tok(question)["input_ids"])
        return GenRequest(uuid.uuid4().hex, ids, method, params, sampling), rag_info

    # -- running a request ---------------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if self.pending >= self.max_pending:
            raise ApiError(429, f"too many requests in flight ({self.max_pending}); retry later",
                           "rate_limit_error", code="too_many_requests")
        try:
            self.engine.submit(req, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except HetmemError as e:
            msg = str(e)
            status = 429 if "queue is full" in msg else 503 if "shutting down" in msg else 400
            raise ApiError(status, msg, param="hetmem" if "--" in msg or "method" in msg else None) from None
        self.pending += 1
        return events

    def done(self, endpoint: str, status: str, t0: float, first: float | None, ev: TokenEvent | None) -> None:
        self.pending -= 1
        m = self.metrics
        m.requests.labels(endpoint, status).inc()
        if status == "ok":
            m.latency.observe(time.perf_counter() - t0)
            if first is not None:
                m.ttft.observe(first - t0)
            m.observe_report(ev.report if ev else None, ev.usage if ev else None)

    def model_card(self) -> dict:
        return {"id": self.engine.model_name, "object": "model", "created": int(self.started), "owned_by": "hetmem"}


def _err_body(message: str, type_: str = "server_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def build_app(front: Front) -> FastAPI:
    app = FastAPI(title="hetmem serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        front.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # one line to the client; the server keeps serving
        msg = str(exc).splitlines()[0] if str(exc) else ""
        front.metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(_err_body(f"internal error: {type(exc).__name__}: {msg}"), status_code=500)

    @app.get("/health")
    async def health():
        st = front.engine.stats()
        return {"status": "ok", "model": front.engine.model_name, "engine": st.get("engine"),
                "queue_depth": st.get("queue_depth", 0), "running": st.get("running", 0)}

    @app.get("/v1/models")
    async def models(request: Request):
        front.check_auth(request)
        return {"object": "list", "data": [front.model_card()]}

    @app.get("/metrics")
    async def metrics():
        st = front.engine.stats()
        m = front.metrics
        m.queue.set(st.get("queue_depth", 0))
        m.batch.set(st.get("running", 0))
        m.tps.set(st.get("tokens_per_s", 0.0))
        m.pending.set(front.pending)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    async def completion(request: Request, chat: bool):
        front.check_auth(request)
        body = await front.read_json(request)
        req, rag_info = front.build(body, chat)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.perf_counter()
        events = front.submit(req)
        rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def extra(ev: TokenEvent) -> dict:
            report = dict(ev.report or {})
            if rag_info is not None:
                report["rag"] = rag_info
            return {"usage": {**(ev.usage or {}), "total_tokens": sum((ev.usage or {}).values())}, "hetmem": report}

        if not stream:
            parts, first = [], None
            try:
                while True:
                    ev = await events.get()
                    first = first or time.perf_counter()
                    if ev.error:  # a HetmemError after submit is still the request's fault (one line); else ours
                        status = 500 if ev.error.startswith(("internal error", "the server")) else 400
                        front.done(endpoint, str(status), t0, first, ev)
                        return JSONResponse(_err_body(ev.error, "server_error" if status == 500 else
                                                      "invalid_request_error"), status_code=status)
                    parts.append(ev.text)
                    if ev.finish_reason:
                        break
            except asyncio.CancelledError:
                cancel(front.engine, req.request_id)
                front.done(endpoint, "cancelled", t0, first, None)
                raise
            front.done(endpoint, "ok", t0, first, ev)
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": ev.finish_reason}
                      if chat else {"index": 0, "text": text, "finish_reason": ev.finish_reason, "logprobs": None})
            return {"id": rid, "object": obj, "created": created, "model": front.engine.model_name,
                    "choices": [choice], **extra(ev)}

        def chunk(text: str | None, finish: str | None, first_chunk: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first_chunk else (
                    {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                    "model": front.engine.model_name, "choices": [choice]}

        async def gen():
            first, status, ev = None, "cancelled", None
            try:
                if chat:
                    yield json.dumps(chunk("", None, first_chunk=True))
                while True:
                    ev = await events.get()
                    first = first or time.perf_counter()
                    if ev.error:
                        status = "500"
                        yield json.dumps(_err_body(ev.error))
                        break
                    if ev.finish_reason:
                        if ev.text:
                            yield json.dumps(chunk(ev.text, None))
                        yield json.dumps({**chunk(None, ev.finish_reason), **extra(ev)})
                        status = "ok"
                        break
                    if ev.text:
                        yield json.dumps(chunk(ev.text, None))
                yield "[DONE]"
            finally:
                if status == "cancelled":  # the client went away mid-stream: free its sequence
                    cancel(front.engine, req.request_id)
                front.done(endpoint, status, t0, first, ev)

        return EventSourceResponse(gen(), sep="\n", ping=15)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, chat=False)

    return app


def cancel(engine, request_id: str) -> None:
    """Tell the engine a request's client is gone (engines that cannot cancel let it finish)."""
    fn = getattr(engine, "cancel", None)
    if fn is not None:
        fn(request_id)
