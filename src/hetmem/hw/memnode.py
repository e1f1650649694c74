"""The host+memnode system: a head (the model) and N memory nodes over a measured link, by layout.

``hetmem plan --system host+memnode`` models the three layouts of docs/disaggregated.md (index, kv,
attention) for a profiled sparse-attention workload, with the steps' compute on this machine's calibrated
CPU (``hw.catalog``'s host-cpu) and the head<->node link *calibrated on this machine*: round trips of the
cluster's transport (the direct socket channel by default, ``runtime.nodes.cluster``) measured by
``runtime.nodes.linkcal`` and cached here, keyed like the CPU calibration (host, CPU model, cores
available, torch and Ray versions, the node count, the transport), with its key and measured_at.

The link model (what a call's link time is: its round trip minus the slowest node's compute, as the
ledger counts it; fitted by least squares on calibration calls):

    link_ms(call) = latency_ms(N) + arrays * per_array_ms + bytes / bandwidth + compute_share * node_ms

``latency_ms`` is the empty round trip to all ``N`` nodes (measured per N) when it follows some work on
the head, as every decode call does (the nodes have gone idle and are woken); ``per_array_ms`` is the
serialisation cost of each numpy array a request or result carries (pickled with its header on one side,
rebuilt on the other); ``bandwidth`` is the channel's bytes per ms, both directions together;
``compute_share`` the part of the slowest node's compute ``node_ms`` the round trip pays again when the
head and N nodes share fewer free cores than they need (a node that waits for a core to start is not
computing, so its wait is link time; 0 where the cores suffice). The round trips of the other transports
(a Ray Compiled Graph, plain actor calls) are kept beside it.

Bytes per call by layout are counted exactly as the nodes exchange them (``layout_bytes``).
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetmem.errors import HetmemError
from hetmem.files import write_json_atomic
from hetmem.hw.calibrate import cores_available, cpu_model
from hetmem.hw.catalog import Device
from hetmem.hw.cost import Workload, step_time_us
from hetmem.settings import cache_dir

LAYOUTS = ("index", "kv", "attention")
SYSTEM = "host+memnode"
LINK_SCHEMA = "hetmem.link-calibration/3"  # 3: the transport, link time as the ledger's, decode-shaped calls
# with node compute (2: calls measured after head work; 1: back to back)


# ----------------------------------------------------------------------------------------- bytes per layout

# One-round attention layout on N > 1 nodes: each node attends its best ``attend_top(k, N)`` candidates, not all
# ``k`` (the budget's candidate pages): the striped selection spreads over the nodes, and a step where one node
# holds more of it takes a second round (``runtime.nodes.client``; counted as ``second_rounds`` in the record).
ATTEND_SLACK = 1.5


def attend_top(k: int, n_nodes: int, slack: float = ATTEND_SLACK) -> int:
    k = max(0, k)
    return k if n_nodes <= 1 else min(k, -(-int(slack * k) // n_nodes) + 1)


def layout_bytes(layout: str, n_nodes: int, *, kv_heads: int, group: int, head_dim: int, budget_pages: int,
                 page_size: int, batch: int = 1, elem: int = 4, rounds: int = 1, forced_pages: int = 0) -> dict:
    """What one decode step moves per sparse layer (all nodes together), by the layout: bytes each way,
    calls (round trips) and arrays (numpy arrays in the requests and results). Arrays only, as
    ``runtime.nodes.cluster.nbytes`` counts them.

    every layout: the new token's K (and V unless ``index``) to its owner, an empty append to the others;
    the query ``[B, H_kv, G, D]`` to every node; each node's ``budget`` candidates back (int64 id + float32).
    kv: the selection ``[B, H_kv, budget]`` (int64) to every node, the selected pages' K and V back.
    attention, ``rounds=2``: the selection and the query to every node, ``[B, H_kv, G, D]`` float32 + its lse
    back from each. attention, ``rounds=1`` (the default): no second call; with the candidates each node
    returns each attended page's id, partial output ``[G, D]`` and lse ``[G]`` (float32), for its best
    ``attend_top`` candidates and its share of the ``forced_pages`` sink and recent pages."""
    if layout not in LAYOUTS:
        raise HetmemError(f"unknown layout '{layout}': use one of {', '.join(LAYOUTS)}")
    B, H, G, D, k = batch, kv_heads, group, head_dim, budget_pages
    tok = B * H * D * elem * (1 if layout == "index" else 2)
    q = B * H * G * D * elem
    cand = n_nodes * B * H * k * (8 + 4)  # a node with fewer pages returns fewer
    to_node = tok + n_nodes * q
    to_head = cand
    kv_arrays = 1 if layout == "index" else 2
    arrays = n_nodes * (kv_arrays + 1 + 2)  # append K (V), the query (+ sinks: None), ids and scores back
    calls = 1
    if layout == "kv":
        to_node += n_nodes * B * H * k * 8
        to_head += B * H * k * page_size * D * elem * 2
        arrays += n_nodes * (1 + 2)  # the selection; K and V back
        calls = 2
    elif layout == "attention" and rounds == 1:
        pages = n_nodes * attend_top(k - forced_pages, n_nodes) + forced_pages
        to_head += B * H * pages * (8 + G * D * 4 + G * 4)
        arrays += n_nodes * 3  # page ids, partial outputs, lses back
    elif layout == "attention":
        to_node += n_nodes * (B * H * k * 8 + q)
        to_head += n_nodes * (B * H * G * D * 4 + B * H * G * 4)
        arrays += n_nodes * (2 + 2)  # the selection and the query; out and lse back
        calls = 2
    return {"to_node": to_node, "to_head": to_head, "total": to_node + to_head, "calls": calls, "arrays": arrays}


# ----------------------------------------------------------------------------------------- the link

@dataclass
class LinkModel:
    latency_ms: float  # empty round trip to all the nodes
    per_array_ms: float
    ms_per_byte: float
    n_nodes: int = 1
    plain_call_ms: float | None = None
    compute_share: float = 0.0  # link ms per ms of the slowest node's compute (cores shared)

    @property
    def bandwidth_gbs(self) -> float:
        return 1.0 / self.ms_per_byte / 1e6 if self.ms_per_byte > 0 else float("inf")

    def ms(self, calls: float, arrays: float, nbytes: float, node_ms: float = 0.0) -> float:
        """Link ms of ``calls`` round trips moving ``arrays`` arrays and ``nbytes`` bytes (all nodes, both ways)
        while the slowest node computes ``node_ms`` in all."""
        return (calls * self.latency_ms + arrays * self.per_array_ms + nbytes * self.ms_per_byte
                + node_ms * self.compute_share)

    @classmethod
    def of(cls, entry: dict) -> "LinkModel":
        f = entry["fit"]
        return cls(f["latency_ms"], f["per_array_ms"], f["ms_per_byte"], entry["key"]["n_nodes"],
                   entry.get("plain_call_ms"), f.get("compute_share", 0.0))


def fit_link(points: list[dict]) -> dict:
    """Least squares of ``ms = latency + arrays * per_array + bytes * ms_per_byte + node_ms * compute_share``
    over calibration calls (each ``{"arrays", "bytes", "ms"}``, ``node_ms`` 0 if absent), relative (each row divided by its ms: the fit minimises the relative
    error the MAPE measures, so a 20 ms call does not outweigh twenty 0.5 ms ones); a negative term is
    dropped and the rest refitted."""
    y = np.array([p["ms"] for p in points], dtype=float)
    cols = {"latency_ms": np.ones(len(points)), "per_array_ms": np.array([p["arrays"] for p in points], dtype=float),
            "ms_per_byte": np.array([p["bytes"] for p in points], dtype=float),
            "compute_share": np.array([p.get("node_ms", 0.0) for p in points], dtype=float)}
    names = [n for n in cols if cols[n].any()]
    while True:
        A = np.stack([cols[n] for n in names], 1)
        sol, *_ = np.linalg.lstsq(A / y[:, None], np.ones_like(y), rcond=None)
        neg = [n for n, v in zip(names, sol) if v < 0]
        if not neg or len(names) == 1:
            break
        names.remove(neg[0])
    fit = {n: 0.0 for n in cols}
    fit.update({n: float(max(0.0, v)) for n, v in zip(names, sol)})
    pred = sum(fit[n] * cols[n] for n in cols)
    fit["mape_pct"] = float(100 * np.mean(np.abs(pred - y) / y))
    return fit


def link_key(n_nodes: int, ray_version: str, torch_version: str, transport: str = "socket") -> dict:
    return {"hostname": socket.gethostname(), "cpu": cpu_model(), "cores_available": cores_available(),
            "ray": ray_version, "torch": torch_version, "n_nodes": n_nodes, "transport": transport}


def _key_id(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def link_cache_path() -> Path:
    return cache_dir() / "link-calibration.json"


def cached_link(key: dict) -> dict | None:
    """The cached calibration whose whole key equals ``key``, or None."""
    try:
        data = json.loads(link_cache_path().read_text())
        e = data["entries"][_key_id(key)] if data.get("schema") == LINK_SCHEMA else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(e, dict) or e.get("key") != key or not isinstance(e.get("fit"), dict):
        return None
    f = e["fit"]
    if not all(isinstance(f.get(k), (int, float)) and f[k] >= 0 for k in ("latency_ms", "per_array_ms", "ms_per_byte")):
        return None
    return e


def save_link(entry: dict) -> dict:
    p = link_cache_path()
    try:
        data = json.loads(p.read_text())
        if data.get("schema") != LINK_SCHEMA or not isinstance(data.get("entries"), dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    entry = dict(entry, key_id=_key_id(entry["key"]))
    data = {"schema": LINK_SCHEMA, "entries": {**data.get("entries", {}), entry["key_id"]: entry}}
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p, data)
    return entry


# ----------------------------------------------------------------------------------------- the layouts

NODE_STEPS = {"index": ("prepare", "relevancy"), "kv": ("prepare", "relevancy"),
              "attention": ("prepare", "relevancy", "apply")}


def plan_layouts(wl: Workload, host: Device, link: LinkModel, dims: dict) -> dict:
    """Modelled time per decode token of ``wl`` in-process and in each layout on ``link.n_nodes`` nodes.

    Compute: each step's modelled time on the calibrated host CPU (``hw.cost.step_time_us``) times its
    calls per token. The steps a layout runs on the nodes are split over them (each node holds 1/N of the
    pages); the rest runs on the head. ``kv`` adds the gather of the selected pages' K/V on the nodes at
    the host's copy bandwidth. Link: per sparse layer, ``layout_bytes``' calls, arrays and bytes through
    the calibrated link model. ``dims``: kv_heads, group, head_dim, budget_pages, page_size, batch, elem (and
    rounds, forced_pages: the attention layout's, ``layout_bytes``). In one round each node attends over all
    its candidates (about the budget), so the attention layout's Apply is not split over the nodes."""
    n = link.n_nodes
    st = wl.steps
    step_us = {s: step_time_us(sw, host) * sw.calls for s, sw in st.items()}
    layers = max([sw.calls for sw in st.values()] or [1.0])
    out = {"in-process": {"latency_us": round(sum(step_us.values()), 3), "step_us": _r(step_us), "link_us": 0.0,
                          "where": {s: "head" for s in st}}}
    for layout in LAYOUTS:
        b = layout_bytes(layout, n, **dims)
        where = {s: ("nodes" if s in NODE_STEPS[layout] else "head") for s in st}
        node_us = sum(step_us[s] for s in st if where[s] == "nodes") / n
        head_us = sum(step_us[s] for s in st if where[s] == "head")
        if layout == "attention" and dims.get("rounds", 1) == 1 and "apply" in step_us:
            node_us += step_us["apply"] * (n - 1) / n  # one round: each node attends its ``budget`` candidates
        if layout == "kv":
            gathered = dims["batch"] * dims["kv_heads"] * dims["budget_pages"] * dims["page_size"] * dims["head_dim"] * dims["elem"] * 2
            node_us += layers * gathered / (host.mem_bw_gbs * 1e3) / n
        link_us = layers * link.ms(b["calls"], b["arrays"], b["total"]) * 1e3 + link.compute_share * node_us
        out[layout] = {"latency_us": round(head_us + node_us + link_us, 3), "head_us": round(head_us, 3),
                       "node_us": round(node_us, 3), "link_us": round(link_us, 3),
                       "bytes_per_layer": b["total"], "calls_per_layer": b["calls"], "where": where}
    return out


def _r(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}
