"""``hetmem serve``: the OpenAI-compatible HTTP server, as a Ray Serve application.

    hetmem serve [--model M] [--memory-nodes N | --ray-address ADDR] [--memory NAME=DIR ...]
                 [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--threads N]

Bad input (a missing memory directory, a port in use, an unknown model) is one line and exit 2, before Ray
starts. Ctrl-C or SIGTERM shuts Ray Serve down (in-flight requests get a grace period) and the Ray it started.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from hetmem.cli.common import model_args
from hetmem.errors import HetmemError
from hetmem.llm.models import EMBEDDED, resolve_model_name
from hetmem.runtime.nodes.client import LAYOUTS
from hetmem.serve.deploy import ServeConfig, check_port, start
from hetmem.serve.memories import load_rag_memory, parse_memory_spec


def config_from_args(args) -> ServeConfig:
    """Check every option (no Ray, no model load yet) and make the server's config."""
    if args.memory_nodes is not None and args.ray_address:
        raise HetmemError("give --memory-nodes N or --ray-address ADDR, not both")
    if args.memory_nodes is not None and args.memory_nodes < 1:
        raise HetmemError(f"--memory-nodes must be at least 1 (got {args.memory_nodes})")
    if (args.memory_nodes is not None or args.ray_address) and args.device != "cpu":
        raise HetmemError("--memory-nodes runs the model on cpu (the nodes exchange host memory)")
    name = resolve_model_name(args.model)
    if name not in EMBEDDED and not Path(name).expanduser().exists():
        raise HetmemError(f"unknown model '{args.model}': use one of {', '.join(sorted(EMBEDDED))}, "
                          "a local HF model directory or a .gguf file")
    memories = {}
    for spec in args.memory or []:
        mname, path = parse_memory_spec(spec)
        if mname in memories:
            raise HetmemError(f"--memory {mname} is given twice")
        load_rag_memory(path)  # a damaged or incompatible memory is refused here, not in the replica
        memories[mname] = path
    if args.api_key is not None and not args.api_key.strip():
        raise HetmemError("--api-key is empty")
    if args.max_body_bytes < 1024:
        raise HetmemError(f"--max-body-bytes must be at least 1024 (got {args.max_body_bytes})")
    if args.max_pending < 1:
        raise HetmemError(f"--max-pending must be at least 1 (got {args.max_pending})")
    check_port(args.host, args.port)
    return ServeConfig(model=args.model, dtype=args.dtype, device=args.device, memory_nodes=args.memory_nodes,
                       ray_address=args.ray_address, layout=args.layout, memories=memories,
                       api_key=args.api_key or os.environ.get("HETMEM_API_KEY") or None, host=args.host,
                       port=args.port, threads=args.threads, max_body_bytes=args.max_body_bytes,
                       max_pending=args.max_pending)


def cmd_serve(args) -> int:
    cfg = config_from_args(args)
    server = start(cfg)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"hetmem serve: {cfg.model or 'default model'} at {server.url}/v1 (Ray Serve"
          f"{', ' + str(cfg.memory_nodes) + ' memory nodes' if cfg.memory_nodes else ''}"
          f"{', memories: ' + ', '.join(cfg.memories) if cfg.memories else ''}"
          f"{', API key required' if cfg.api_key else ''}); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("hetmem serve: shutting down", file=sys.stderr, flush=True)
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (Ray Serve) over the memory pipeline")
    model_args(s)
    s.add_argument("--memory-nodes", type=int, default=None, metavar="N",
                   help="keep sparse-attention methods' memory on N Ray memory nodes (a local Ray)")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join the Ray cluster at ADDR (Ray Serve and the memory nodes run there)")
    s.add_argument("--layout", choices=LAYOUTS, default="attention",
                   help="with memory nodes: index, kv or attention (default; see hetmem run --layout)")
    s.add_argument("--memory", action="append", metavar="NAME=DIR",
                   help="load a RAG memory written by 'hetmem index'; requests use it with "
                        "{\"hetmem\": {\"memory\": \"NAME\", \"top_k\": 4}} (repeatable)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $HETMEM_API_KEY, else none)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB): 413 past it")
    s.add_argument("--max-pending", type=int, default=64,
                   help="requests in flight at once (default 64): 429 past it")
    s.set_defaults(func=cmd_serve)
