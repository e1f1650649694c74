"""``hetmem serve`` as a Ray Serve application: one deployment with a FastAPI ingress, on the same Ray as the
memory nodes.

``start(cfg)`` starts a local Ray (or joins ``cfg.ray_address``) through ``runtime.nodes.cluster.init_ray``,
starts Ray Serve's HTTP proxy on ``cfg.host:cfg.port`` and runs the ``hetmem`` deployment: a replica (no
logical CPU of its own: the model's threads are ``cfg.threads``) that loads the model, the RAG memories and,
with ``memory_nodes``, a ``NodeCluster`` of memory-node actors in the same Ray; its ASGI app is
``serve.app.build_app`` over a ``Front`` (``serve.ingress`` with ``__serve_build_asgi_app__``). ``stop()``
shuts Ray Serve down (in-flight requests get ``graceful_shutdown_timeout_s`` to finish; the engine then fails
what is still queued) and the Ray it started.

Ray Serve is an optional heavy dependency: it is imported when a server starts, not when the CLI loads.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import torch

from hetmem.errors import HetmemError
from hetmem.llm.models import load_model
from hetmem.runtime.nodes.cluster import NodeCluster, init_ray
from hetmem.runtime.serve_engine import make_engine
from hetmem.serve.app import MAX_BODY_BYTES, MAX_PENDING, Front, build_app
from hetmem.serve.memories import load_rag_memory

APP_NAME = "hetmem"


@dataclass
class ServeConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    memory_nodes: int | None = None
    ray_address: str | None = None
    layout: str = "attention"
    memories: dict = field(default_factory=dict)  # name -> memory directory
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 1
    max_body_bytes: int = MAX_BODY_BYTES
    max_pending: int = MAX_PENDING
    step_timing: bool = True


def build_front(cfg: ServeConfig) -> Front:
    """Load the model, the memories and (with memory nodes) the node cluster; the Front over them."""
    torch.set_num_threads(cfg.threads)
    memories = {name: load_rag_memory(path) for name, path in cfg.memories.items()}
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    cluster = None
    if cfg.memory_nodes is not None or cfg.ray_address:
        cluster = NodeCluster(cfg.memory_nodes or 1, address=cfg.ray_address)
        torch.set_num_threads(min(cfg.threads, cluster.threads["head"]))
    engine = make_engine(lm, cluster=cluster, layout=cfg.layout, step_timing=cfg.step_timing)
    return Front(lm, engine, memories=memories, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes,
                 max_pending=cfg.max_pending, on_close=cluster.close if cluster is not None else None)


def check_port(host: str, port: int) -> None:
    """One line, before anything starts, when ``host:port`` cannot be bound (in use, or not an address here)."""
    if not 0 < port < 65536:
        raise HetmemError(f"--port must be between 1 and 65535 (got {port})")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:
        why = "is in use" if e.errno == 98 else f"cannot be bound ({e.strerror or e})"
        raise HetmemError(f"{host}:{port} {why}: pick another --port or --host") from None


def _deployment(cfg: ServeConfig):
    from ray import serve  # noqa: PLC0415  (optional heavy dependency)

    @serve.deployment(name=APP_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max(cfg.max_pending + 8, 16), graceful_shutdown_timeout_s=30,
                      health_check_period_s=5, health_check_timeout_s=60)
    @serve.ingress()
    class HetmemServe:
        def __init__(self, config: ServeConfig):
            self.front = build_front(config)

        def __serve_build_asgi_app__(self):
            return build_app(self.front)

        def __del__(self):  # Ray Serve's replica shutdown, after in-flight requests had their grace period
            front = getattr(self, "front", None)
            if front is not None:
                self.front = None
                front.close()

    return HetmemServe


class Server:
    """A running ``hetmem serve``: ``url``, ``stop()``."""

    def __init__(self, cfg: ServeConfig, started_ray: bool):
        self.cfg, self.started_ray = cfg, started_ray
        self.url = f"http://{cfg.host if ':' not in cfg.host else '[' + cfg.host + ']'}:{cfg.port}"

    def stop(self) -> None:
        import ray  # noqa: PLC0415  (optional heavy dependency)
        from ray import serve  # noqa: PLC0415

        try:
            serve.shutdown()
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()


def start(cfg: ServeConfig) -> Server:
    """Start (or join) Ray, Ray Serve's proxy on cfg.host:cfg.port, and the hetmem deployment; returns once the
    replica has loaded the model and answers."""
    check_port(cfg.host, cfg.port)
    started = init_ray(cfg.ray_address, max(2, (cfg.memory_nodes or 0) + 1))
    from ray import serve  # noqa: PLC0415  (optional heavy dependency)
    from ray.serve.config import HTTPOptions  # noqa: PLC0415

    for name in ("ray.serve", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server = Server(cfg, started)
    try:
        serve.start(http_options=HTTPOptions(host=cfg.host, port=cfg.port),
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(_deployment(cfg).bind(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as e:  # noqa: BLE001 - a replica that fails to start (its model, its memories) is one line
        server.stop()
        msg = [ln for ln in str(e).splitlines() if ln.strip()]
        raise HetmemError(f"the server did not start: {msg[-1] if msg else type(e).__name__}") from None
    return server
