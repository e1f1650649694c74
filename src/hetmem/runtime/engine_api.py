"""What a generation engine offers the server: requests in, token events out.

``hetmem serve`` (the HTTP front) talks to an engine only through this module, so the engine behind it can
change (one request at a time, or continuous batching over a page pool) without touching the front.

- The front turns an OpenAI request into a ``GenRequest``: prompt token ids (chat template applied), the
  memory method and its parameters (as ``hetmem methods`` lists them), and ``Sampling``.
- ``Engine.submit(req, on_event)`` validates at once (an unknown method, a bad parameter or a prompt over
  the window raises ``HetmemError`` with one line, which the front answers as a 400) and then returns; the
  engine calls ``on_event`` from its own thread with one ``TokenEvent`` per generated token, the last one
  with ``finish_reason`` set, ``usage`` and ``report`` (per-step measured times, as ``hetmem run --json``).
  An error after submit arrives as a final event with ``error`` set.
- ``Engine.stats()`` feeds the front's ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these strings


@dataclass
class GenRequest:
    request_id: str
    prompt_ids: list[int]
    method: str = "dense"
    params: dict = field(default_factory=dict)  # method parameters, validated by methods.get_method
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None = None
    text: str = ""  # the new text since the previous event (stop strings already cut)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", or "error"
    usage: dict | None = None  # final event: {"prompt_tokens": n, "completion_tokens": m}
    report: dict | None = None  # final event: {"method", "params", "steps", "prefill_ms", "decode_ms", ...}
    error: str | None = None  # final event of a request that failed after submit: one line


OnEvent = Callable[[TokenEvent], None]


class Engine(Protocol):
    model_name: str
    max_context: int

    def submit(self, req: GenRequest, on_event: OnEvent) -> None: ...

    def stats(self) -> dict:
        """``{"queue_depth": int, "running": int, "steps": int, "tokens": int, ...}`` for /metrics."""
        ...

    def close(self) -> None: ...
