"""The memory nodes as Ray actors, and the one way the head talks to them.

``NodeCluster(n)`` starts a local Ray (``ray.init(num_cpus=..., include_dashboard=False)``) or joins
``address`` (a cluster started with ``ray start --head`` / ``ray start --address``) and creates ``n``
``NodeActor``s (``max_restarts=-1``: a killed node process is restarted by Ray). Ray starts, places and
restarts the nodes; the calls of a run go through one of three transports (``transport=``):

    socket    (default) a direct channel per node: the node actor listens (a Unix socket when it runs on the
              head's machine, TCP otherwise), the head connects once and writes each batch as one message
              (pickle protocol 5, numpy arrays as out-of-band buffers) and blocks in ``recv`` for the reply;
              no Ray task, no polling. A killed node's channel closes at once.
    compiled  a Ray Compiled Graph (``ray.dag`` + ``experimental_compile``): one graph
              ``[node_i.call(batch_i) for i]`` over shared-memory channels;
    plain     plain actor calls (``compiled=False``, as before).

``benchmarks/bench_disaggregated.py`` measures all three side by side. Every call has a timeout. When a
node died (a SIGKILL, an OOM kill), the head waits for Ray to restart it, asks every user of the nodes to
re-hydrate what it kept there (``rehydrators``: each returns the batch that rebuilds its shards on a node,
from the head's own copy or the saved memory), opens the channel again (or recompiles the graph) and
retries the call. An error raised on a node reaches the user as
one line (``HetmemError``).

Ray is an optional heavy dependency: it is imported when a cluster is made.
"""

from __future__ import annotations

import hmac
import logging
import os
import pickle
import secrets
import socket
import struct
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np
import torch

from hetmem.errors import HetmemError
from hetmem.runtime.nodes.node import MemoryNode


def _ray():
    try:
        import ray  # noqa: PLC0415  (optional heavy dependency)
    except ImportError as e:  # pragma: no cover - ray is in requirements.txt
        raise HetmemError("memory nodes need Ray: pip install ray==2.60.0") from e
    return ray


def init_ray(address: str | None = None, num_cpus: int = 2) -> bool:
    """Start a local Ray (``num_cpus`` logical CPUs, no dashboard) or join the cluster at ``address``, unless this
    process is already connected. Returns whether it started a local Ray (its owner shuts it down)."""
    ray = _ray()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
            return False
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        return True
    except Exception as e:  # noqa: BLE001 - any failure to start or join is one line
        raise HetmemError(f"could not {'join Ray at ' + address if address else 'start a local Ray'}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def nbytes(x) -> int:
    """Bytes of the arrays in a request or result (what crosses the link, pickling overhead aside)."""
    if isinstance(x, np.ndarray):
        return x.nbytes
    if isinstance(x, dict):
        return sum(nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    return 0


def narrays(x) -> int:
    """Numpy arrays in a request or result (each is serialised with its own header: the link model's
    per-array cost)."""
    if isinstance(x, np.ndarray):
        return 1
    if isinstance(x, dict):
        return sum(narrays(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(narrays(v) for v in x)
    return 0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_plan(n_nodes: int, total: int | None = None) -> dict:
    """Torch threads for the head and each node such that together they ask for no more threads than there are
    cores (at least 1 each, so 2 nodes and a head on 2 cores are one thread over). A decode step is synchronous,
    but a process that just left a parallel region keeps its OpenMP threads spinning for a while, and a node
    with 2 threads next to a head of 1 on 2 busy cores was several times slower per call here than with 1: the
    nodes share the cores the head leaves them, the head keeps at least one."""
    total = total or cores()
    node = max(1, (total - 1) // max(1, n_nodes))
    head = max(1, total - n_nodes * node)
    return {"cores": total, "head": head, "per_node": node,
            "note": "head + nodes x per_node <= cores where it can be (each at least 1)"}


# ----------------------------------------------------------------------------------------- the direct channel
# One message: a 12-byte header (body bytes, out-of-band buffers), then the body: a table of lengths (the
# pickle's, then each buffer's, uint64), the pickle (protocol 5: numpy arrays leave it as out-of-band
# buffers, not copied into it) and the buffers, each at a 64-byte aligned offset. The receiver reads the
# body into one bytearray and the arrays are writable views of it (no copy on either side).

_HDR = struct.Struct("<QI")
TOKEN_BYTES = 32  # a head presents its token as the first 32 bytes of a connection
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def pack(obj) -> list:
    """The frames of one message carrying ``obj`` (what ``send_frames`` writes)."""
    bufs: list = []
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    except (pickle.PicklingError, AttributeError, TypeError):  # a step object only cloudpickle can carry
        from ray import cloudpickle  # noqa: PLC0415  (optional heavy dependency)

        bufs = []
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    table = struct.pack(f"<{1 + len(raws)}Q", len(data), *(r.nbytes for r in raws))
    frames, off = [table, data], len(table) + len(data)
    for r in raws:
        pad = _aligned(off) - off
        if pad:
            frames.append(bytes(pad))
        frames.append(r)
        off += pad + r.nbytes
    return [_HDR.pack(off, len(raws)), *frames]


def send_frames(sock: socket.socket, frames: list) -> None:
    total = sum(memoryview(f).nbytes for f in frames)
    sent = sock.sendmsg(frames) if len(frames) <= 512 else 0
    if sent == total:
        return
    for f in frames:  # a partial write (a large message): the rest piece by piece
        m = memoryview(f).cast("B")
        if sent >= m.nbytes:
            sent -= m.nbytes
            continue
        sock.sendall(m[sent:])
        sent = 0


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    mv, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(mv[got:], n - got)
        if k == 0:
            raise ConnectionResetError("the channel was closed by its other end")
        got += k
    return buf


def recv_msg(sock: socket.socket):
    body_len, nbuf = _HDR.unpack(_recv_exact(sock, _HDR.size))
    body = _recv_exact(sock, body_len)
    lens = struct.unpack_from(f"<{1 + nbuf}Q", body)
    mv = memoryview(body)
    off = 8 * (1 + nbuf)
    data = mv[off: off + lens[0]]
    off += lens[0]
    bufs = []
    for n in lens[1:]:
        off = _aligned(off)
        bufs.append(mv[off: off + n])
        off += n
    return pickle.loads(data, buffers=bufs)


class NodeActor(MemoryNode):
    """The memory node as the Ray actor runs it: ``MemoryNode`` plus a direct channel. ``open_channel`` starts
    (once) a listener in the node's process, a Unix socket when the head is on the same machine, else TCP, and
    returns its address; a head that connects and presents the token it registered through Ray (the call
    that opened the channel) sends batches and reads results over it, with no Ray task per call. One thread
    per connection blocks in ``recv`` (no spinning); calls through the channel and through Ray run one at a
    time (a lock)."""

    def __init__(self, node: int, threads: int = 1):
        super().__init__(node, threads)
        self._call_lock = threading.Lock()
        self._tokens: set[bytes] = set()
        self._listeners: dict[str, tuple] = {}

    def call(self, batch: list[dict]) -> dict:
        with self._call_lock:
            return super().call(batch)

    def _work(self, req):
        """The link calibration (``linkcal``): compute for ``ms`` as a decode request's steps do (attention of a
        query over 512-token slices of 6 MiB of its own keys, one torch op after another, each allocating its
        result), then echo the arrays back."""
        if req["ms"] > 0:
            if getattr(self, "_scratch", None) is None:
                self._scratch = torch.randn(1, 3, 1 << 13, 64)
            q = torch.randn(1, 3, 3, 64)
            t, i = time.perf_counter(), 0
            with torch.inference_mode():
                while (time.perf_counter() - t) * 1e3 < req["ms"]:
                    k = self._scratch[:, :, i: i + 512]
                    torch.softmax(q @ k.transpose(-1, -2), -1) @ k
                    i = (i + 512) % (1 << 13)
        return req.get("x")

    def open_channel(self, token: bytes, local: bool) -> dict:
        self._tokens.add(token)
        kind = "unix" if local else "tcp"
        if kind not in self._listeners:
            if local:
                path = os.path.join(tempfile.mkdtemp(prefix="hetmem-node-"), "channel.sock")
                srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                srv.bind(path)  # in a fresh 0700 directory: only this user reaches it
                addr = path
            else:
                srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                srv.bind(("0.0.0.0", 0))
                addr = (_ray().util.get_node_ip_address(), srv.getsockname()[1])
            srv.listen(16)
            threading.Thread(target=self._accept, args=(srv,), name="hetmem-channel-accept", daemon=True).start()
            self._listeners[kind] = (srv, addr)
        return {"kind": kind, "address": self._listeners[kind][1], "pid": os.getpid()}

    def _accept(self, srv: socket.socket) -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=self._serve, args=(conn,), name="hetmem-channel", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if conn.family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(30)
            token = bytes(_recv_exact(conn, TOKEN_BYTES))  # raw bytes: nothing is unpickled before the token matches
            if not any(hmac.compare_digest(token, t) for t in self._tokens):
                return
            conn.settimeout(None)
            send_frames(conn, pack("ok"))
            while True:
                batch = recv_msg(conn)
                t_in = time.perf_counter()
                try:
                    reply = ("ok", self.call(batch), t_in)
                except Exception as e:  # noqa: BLE001 - any error goes back to the head, which reports it
                    reply = ("error", type(e).__name__, str(e))
                send_frames(conn, pack(reply))
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        finally:
            conn.close()


class NodeCallError(Exception):
    """An error raised on a node, as its channel reports it (the exception's type name and message)."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


class Ledger:
    """Measured transfers per (node, layer, phase, step): bytes and arrays each way, calls, round-trip ms, the
    node's own compute ms, and the link's share of the round trip: the round trip minus the slowest node's
    compute (a call to all nodes returns when the last one answers, so node i's wait for node j is not link
    time)."""

    def __init__(self):
        self.rows: dict[tuple, dict] = defaultdict(lambda: {"calls": 0, "to_node": 0, "to_head": 0, "rt_ms": 0.0,
                                                             "node_ms": 0.0, "link_ms": 0.0, "arrays": 0})

    def add(self, node, layer, phase, step, to_node, to_head, rt_ms, node_ms, link_ms=None, arrays=0) -> None:
        r = self.rows[(node, layer, phase, step)]
        r["calls"] += 1
        r["to_node"] += to_node
        r["to_head"] += to_head
        r["rt_ms"] += rt_ms
        r["node_ms"] += node_ms
        r["link_ms"] += max(0.0, rt_ms - node_ms) if link_ms is None else link_ms
        r["arrays"] += arrays

    def transfers(self) -> list[dict]:
        out = []
        for (node, layer, phase, step), r in sorted(self.rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
            for direction, b in (("head->node", r["to_node"]), ("node->head", r["to_head"])):
                out.append({"node": node, "layer": layer, "phase": phase, "step": step, "direction": direction,
                            "bytes": int(b), "calls": r["calls"]})
            out[-1]["ms"] = out[-2]["ms"] = round(r["link_ms"], 4)  # the round trip's link time (both directions)
            out[-1]["node_ms"] = out[-2]["node_ms"] = round(r["node_ms"], 4)
            out[-1]["arrays"] = out[-2]["arrays"] = r["arrays"]  # both directions together
        return out

    def summary(self) -> dict:
        tot = defaultdict(lambda: {"bytes_to_node": 0, "bytes_to_head": 0, "calls": 0, "round_trip_ms": 0.0,
                                   "node_ms": 0.0})
        for (node, layer, phase, step), r in self.rows.items():
            t = tot[phase]
            t["bytes_to_node"] += r["to_node"]
            t["bytes_to_head"] += r["to_head"]
            t["node_ms"] += r["node_ms"]
            if node == 0:  # every call goes to every node at once: count its round trip once
                t["calls"] += r["calls"]
                t["round_trip_ms"] += r["rt_ms"]
        return {ph: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items()} for ph, t in tot.items()}


TRANSPORTS = {
    "socket": "direct socket channel per node (Unix socket on the head's machine, TCP across machines); Ray "
              "starts, places and restarts the node actors",
    "compiled": "compiled graph (ray.dag experimental_compile)",
    "plain": "plain actor calls",
}


class NodeCluster:
    """``n`` memory nodes; ``call(batches)`` sends ``batches[i]`` to node ``i`` and returns their results."""

    def __init__(self, n_nodes: int, address: str | None = None, threads_per_node: int | None = None,
                 timeout_s: float = 120.0, compiled: bool | None = None, restart_wait_s: float = 60.0, actors=None,
                 transport: str | None = None, pin: bool = True):
        if n_nodes < 1:
            raise HetmemError(f"--memory-nodes must be at least 1 (got {n_nodes})")
        ray = _ray()
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self.n = n_nodes
        self.threads = thread_plan(n_nodes)
        if threads_per_node:
            self.threads["per_node"] = threads_per_node
        if transport is None:
            transport = "socket" if compiled is None else ("compiled" if compiled else "plain")
        if transport not in TRANSPORTS:
            raise HetmemError(f"unknown node transport '{transport}': use one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.timeout_s, self.restart_wait_s = timeout_s, restart_wait_s
        self.address = address
        self.started_ray = init_ray(address, max(2, n_nodes))
        if actors is not None:  # the first n nodes of another cluster (tests, the benchmark: one set of processes)
            self.actors = list(actors[:n_nodes])
        else:
            actor_cls = ray.remote(NodeActor)
            opts = dict(max_restarts=-1, max_task_retries=0, num_cpus=1)
            if address:
                opts["scheduling_strategy"] = "SPREAD"
            self.actors = [actor_cls.options(**opts).remote(i, self.threads["per_node"]) for i in range(n_nodes)]
        self.owns_actors = actors is None
        self.info = [self._get(a.info.remote(), f"memory node {i}") for i, a in enumerate(self.actors)]
        self.pids = [x["pid"] for x in self.info]
        self.pin, self.pinned = pin, {}  # node -> the core it is pinned to (``_pin``)
        self.ledger = Ledger()
        # node -> the batch that rebuilds what one user of the nodes keeps there (its shards), one per user:
        # every sequence's NodeMethod (through one hook, runtime.nodes.client), every loaded RAG memory
        self.rehydrators: list = []
        self.restarts = 0
        self.last: dict = {}  # the last call's round trip and slowest node's compute (ms)
        self.timeline: list = []  # socket: per node (sent, node has it, node done, head has its reply), perf_counter
        self.fallback = None
        self._dag = None
        self._socks: list[socket.socket] | None = None  # the direct channels (transport "socket"), once opened
        self._channel_kinds: list[str] = []
        self._token = secrets.token_bytes(TOKEN_BYTES)
        self._channel_lock = threading.Lock()
        self._lock = threading.Lock()
        self._call_lock = threading.RLock()
        self._inflight: float | None = None  # when the compiled-graph call now in flight began
        self._died = False
        # a torn-down graph over a dead actor logs its cancellation failure at ERROR: the head reports it itself
        logging.getLogger("ray.dag.compiled_dag_node").setLevel(logging.CRITICAL)
        self._host = socket.gethostname()
        self._watch_stop = threading.Event()
        threading.Thread(target=self._watch, name="hetmem-node-watch", daemon=True).start()

    def _alive(self, i: int) -> bool:
        """Is node ``i``'s process still the one we know? (A local process: /proc; a remote one: a ping.)"""
        if self.info[i].get("host") == self._host:
            try:
                with open(f"/proc/{self.pids[i]}/stat") as f:
                    return f.read().split(")")[-1].split()[0] not in ("Z", "X")
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return False
        ray = _ray()
        try:
            return ray.get(self.actors[i].info.remote(), timeout=5)["pid"] == self.pids[i]
        except Exception:  # noqa: BLE001 - no answer within the ping timeout counts as dead
            return False

    def _watch(self) -> None:
        """While a call is in flight, check the nodes: a compiled graph whose actor died waits on its channel, so
        the watcher tears the graph down, which ends the head's wait with an error at once. (A socket to a dead
        local process is closed by the kernel and the head's read ends by itself; a remote machine that died
        may leave it open: the watcher shuts it.)"""
        while not self._watch_stop.wait(0.2):
            t = self._inflight
            if t is None or time.monotonic() - t < 0.2:
                continue
            dead = [i for i in range(len(self.actors)) if not self._alive(i)]
            if dead and self._inflight is not None:
                self._died = True
                self._teardown()
                self._close_channels(shutdown_only=True)

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _get(self, refs, what: str, timeout: float | None = None):
        ray = _ray()
        try:
            return ray.get(refs, timeout=timeout or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise HetmemError(f"{what} did not answer within {timeout or self.timeout_s:.0f} s") from None

    def _compile(self):
        with self._lock:
            return self._compile_locked()

    def _compile_locked(self):
        if self._dag is None and self.transport == "compiled":
            from ray.dag import InputNode, MultiOutputNode  # noqa: PLC0415  (optional heavy dependency)

            with InputNode() as inp:
                dag = MultiOutputNode([a.call.bind(inp[i]) for i, a in enumerate(self.actors)])
            self._dag = dag.experimental_compile(_submit_timeout=self.timeout_s)
        return self._dag

    def release_graph(self) -> None:
        """Tear down this cluster's compiled graph, so that another one over the same nodes can be built (an
        actor runs one compiled graph at a time)."""
        self._teardown()

    def _teardown(self):
        """Tear the compiled graph down. Under the lock: a graph is compiled again only once the old one is
        gone (tearing down cancels the graph's loops on the actors, a new graph's too if it overlapped)."""
        with self._lock:
            dag, self._dag = self._dag, None
            if dag is not None:
                try:
                    dag.teardown()
                except Exception:  # noqa: BLE001 - a graph over a dead actor may fail to tear down cleanly
                    pass

    # -- the direct channels (transport "socket") --------------------------------------------------------------
    def _connect(self) -> list[socket.socket]:
        """Open (once) a channel to every node: each node listens (``NodeActor.open_channel``, a Ray call that
        registers this cluster's token), the head connects and presents the token."""
        if self._socks is not None:
            return self._socks
        socks, kinds = [], []
        try:
            for i, a in enumerate(self.actors):
                local = self.info[i].get("host") == self._host
                ch = self._get(a.open_channel.remote(self._token, local), f"memory node {i} (opening its channel)")
                fam = socket.AF_UNIX if ch["kind"] == "unix" else socket.AF_INET
                s = socket.socket(fam, socket.SOCK_STREAM)
                socks.append(s)
                s.settimeout(self.timeout_s)
                if fam == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.connect(ch["address"] if fam == socket.AF_UNIX else tuple(ch["address"]))
                s.sendall(self._token)
                if recv_msg(s) != "ok":
                    raise ConnectionError(f"memory node {i} refused the channel")
                kinds.append(ch["kind"])
        except BaseException:
            for s in socks:
                s.close()
            raise
        self._socks, self._channel_kinds = socks, kinds
        self._pin()  # the nodes' channel threads exist now
        return socks

    def _pin(self) -> None:
        """Pin each node process on this machine to a core of its own (node ``i`` to the ``i % cores``-th core
        this process may use), every thread of it, when there are at least as many cores as nodes. Left to the
        scheduler, a node woken by the head lands on the head's core (wake-affine) and waits for it, and two
        nodes of one call run one after the other: measured here, pinning cut 2 local nodes' decode by about an
        eighth. The head is not pinned. ``pin=False`` leaves the nodes alone; ``record()`` says which."""
        if not self.pin or not hasattr(os, "sched_setaffinity"):
            return
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < self.n:
            return
        for i, pid in enumerate(self.pids):
            if self.info[i].get("host") != self._host:
                continue
            core = cpus[i % len(cpus)]
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.sched_setaffinity(int(tid), {core})
                self.pinned[i] = core
            except (OSError, ValueError):  # a thread that just ended, a process gone: best effort
                pass

    def _close_channels(self, shutdown_only: bool = False) -> None:
        """Close the channels (the next call opens them again); ``shutdown_only``: from the watcher thread, end
        a read in flight (the calling thread closes them when it sees the error)."""
        socks = self._socks
        if socks is None:
            return
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if not shutdown_only:
                s.close()
        if not shutdown_only:
            self._socks = None

    def _send_socket(self, batches: list[list[dict]]) -> list[dict]:
        with self._channel_lock:  # one exchange at a time on the channels (callers on several threads)
            return self._exchange(batches)

    def _exchange(self, batches: list[list[dict]]) -> list[dict]:
        socks = self._connect()
        self._inflight = time.monotonic()
        try:
            packed: dict[int, list] = {}  # a batch object sent to several nodes is pickled once
            sent = []
            for s, b in zip(socks, batches):
                f = packed.get(id(b))
                if f is None:
                    f = packed[id(b)] = pack(b)
                send_frames(s, f)
                sent.append(time.perf_counter())
            replies = []
            for s in socks:  # every node's reply is read: the channels stay in step
                replies.append(recv_msg(s))
                replies[-1] += (time.perf_counter(),)
        except BaseException:
            self._close_channels()
            raise
        finally:
            self._inflight = None
        for r in replies:
            if r[0] == "error":
                raise NodeCallError(r[1], r[2])
        # the same machine's clock (perf_counter is CLOCK_MONOTONIC): send -> the node has the batch, and the
        # node's reply -> the head has it (only meaningful for nodes on the head's machine)
        self.timeline = [(t_s, r[2], r[2] + r[1]["node_ms"] / 1e3, r[3]) for t_s, r in zip(sent, replies)]
        return [r[1] for r in replies]

    def _send(self, batches: list[list[dict]]) -> list[dict]:
        ray = _ray()
        if self.transport == "socket":
            return self._send_socket(batches)
        if self.transport == "compiled":
            dag = self._compile()
            self._inflight = time.monotonic()  # before execute: a write to a dead node's channel blocks too
            try:
                return ray.get(dag.execute(*batches), timeout=self.timeout_s)
            except ray.exceptions.RayChannelTimeoutError:
                raise ray.exceptions.GetTimeoutError("compiled graph read timed out") from None
            finally:
                self._inflight = None
        return ray.get([a.call.remote(b) for a, b in zip(self.actors, batches)], timeout=self.timeout_s)

    # -- the call ----------------------------------------------------------------------------------------------
    def call(self, batches: list[list[dict]], *, layer=None, phase: str = "", step: str = "") -> list[list]:
        with self._call_lock:  # one call at a time (two serving engines may share the nodes)
            return self._call(batches, layer=layer, phase=phase, step=step)

    def _call(self, batches: list[list[dict]], *, layer=None, phase: str = "", step: str = "") -> list[list]:
        ray = _ray()
        t0 = time.perf_counter()
        self._died = False
        try:
            res = self._send(batches)
        except Exception as e:  # noqa: BLE001 - sorted below: a dead node, a timeout, an error raised on a node
            if self._died or isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.RayChannelError)) or (
                    isinstance(e, OSError) and not isinstance(e, TimeoutError)):  # a channel closed by its node
                return self._recover_and_retry(batches, layer, phase, step)
            return self._fail(e, step)
        rt = (time.perf_counter() - t0) * 1e3
        self.last = {"rt_ms": rt, "node_ms": max(r["node_ms"] for r in res)}
        if phase:  # housekeeping calls (drop) are not transfers of a phase
            link = max(0.0, rt - max(r["node_ms"] for r in res))
            for i, (b, r) in enumerate(zip(batches, res)):
                self.ledger.add(i, layer, phase, step, nbytes(b), nbytes(r["results"]), rt, r["node_ms"], link,
                                narrays(b) + narrays(r["results"]))
        return [r["results"] for r in res]

    def _fail(self, e: Exception, step: str):
        ray = _ray()
        self._teardown()
        self._close_channels()
        if isinstance(e, (ray.exceptions.GetTimeoutError, TimeoutError)):
            raise HetmemError(f"memory nodes did not answer a {step or 'call'} within {self.timeout_s:.0f} s") from None
        cause = getattr(e, "cause", None) or e
        name = cause.type_name if isinstance(cause, NodeCallError) else type(cause).__name__
        msg = str(cause).strip().splitlines()
        raise HetmemError(f"memory node error during {step or 'a call'}: {name}"
                          f"{': ' + msg[0] if msg else ''}") from None

    def _recover_and_retry(self, batches, layer, phase, step):
        """A node died: wait for Ray to restart it, re-hydrate it from the head's copy, retry once."""
        self._teardown()
        self._close_channels()  # the next call opens them again (to the restarted node's new listener)
        self.restarts += 1
        dead = self.wait_alive()
        if self.transport == "compiled":
            # A compiled graph built again over a restarted actor hangs on its second call (Ray 2.60: the old
            # graph's teardown still reaches the actor's new loop); the rest of the run uses plain actor calls.
            self.transport = "plain"
            self.fallback = "plain actor calls after a node restart (a recompiled graph over a restarted actor hangs)"
        for i in dead:
            batch = [r for fn in list(self.rehydrators) for r in fn(i)]
            if batch:
                self._get(self.actors[i].call.remote(batch), f"memory node {i} (re-hydrating)")
        try:
            res = self._send(batches)
        except Exception as e:  # noqa: BLE001 - a second failure is reported, not retried forever
            self._teardown()
            self._close_channels()
            raise HetmemError(f"memory node call failed again after a restart: {type(e).__name__}") from None
        for i, (b, r) in enumerate(zip(batches, res)):
            self.ledger.add(i, layer, phase, step, nbytes(b), nbytes(r["results"]), 0.0, r["node_ms"], 0.0,
                            narrays(b) + narrays(r["results"]))
        return [r["results"] for r in res]

    def wait_alive(self, only: set[int] | None = None) -> list[int]:
        """Block until every node answers; returns the nodes whose process changed (restarted: empty state)."""
        ray = _ray()
        deadline = time.monotonic() + self.restart_wait_s
        changed = []
        for i, a in enumerate(self.actors):
            if only is not None and i not in only:
                continue
            while True:
                try:
                    pid = ray.get(a.info.remote(), timeout=max(1.0, deadline - time.monotonic()))["pid"]
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        raise HetmemError(f"memory node {i} died and did not come back within "
                                          f"{self.restart_wait_s:.0f} s") from None
                    time.sleep(0.2)
            if pid != self.pids[i]:
                changed.append(i)
                self.pids[i] = pid
                self.info[i] = self._get(a.info.remote(), f"memory node {i}")
        return changed

    def kill(self, node: int) -> int:
        """SIGKILL node ``node``'s process (tests, the benchmark); returns the pid killed."""
        pid = self.pids[node]
        os.kill(pid, 9)
        return pid

    def close(self) -> None:
        self._watch_stop.set()
        self._teardown()
        self._close_channels()
        ray = _ray()
        for a in self.actors if self.owns_actors else []:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()

    def record(self) -> dict:
        """What the run record says about the nodes."""
        ray = _ray()
        return {"n": self.n, "ray": ray.__version__, "address": self.address or "local",
                "transport": self.transport, "calls": TRANSPORTS[self.transport],
                "channels": self._channel_kinds or None,
                "threads": self.threads, "restarts": self.restarts, "fallback": self.fallback, "timeout_s": self.timeout_s,
                "pids": self.pids, "pinned_cores": {f"node{i}": c for i, c in sorted(self.pinned.items())} or None}
