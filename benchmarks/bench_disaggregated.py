"""Disaggregated memory on Ray memory nodes: call overhead, bytes per decode step, decode speed, link model.

All figures are measured on this machine (head and nodes share its cores), except the byte model and the
link model's predictions, which are modelled and compared with the measured transfers:

1. round-trip overhead per call to 1 and 2 nodes, an empty batch and a decode-shaped request (echoed):
   plain actor calls vs a Ray Compiled Graph vs the direct socket channel (the default transport), and
   the CPU an idle node process burns under each (a compiled graph's actors poll their channels);
2. the link, calibrated per node count as ``hetmem plan --system host+memnode`` calibrates it
   (``runtime.nodes.linkcal``: socket-channel calls with payloads from empty to 4 MiB, 4 .. 64 small arrays
   and decode-shaped requests with the nodes computing 0 .. 4 ms, after head work), fitted to
   ``latency(N) + arrays * per_array + bytes / bandwidth + compute_share * node_ms`` (and cached for the
   planner);
3. decode ms/token with SmolLM2 at ``--tokens`` of context: in-process vs 1 and 2 nodes for each layout
   (quest at ``--budget``; the attention layout in one round per layer, the default, and in two:
   ``attention_2round``), and the bytes per decode step per layout, measured vs
   ``runtime.nodes.client.modelled_decode_bytes``; the generated tokens must equal the in-process run's;
4. the link model's MAPE: for each (layer, step) of decode, the measured link ms of its calls (round trip
   minus the slowest node's compute) against the model with that node count's calibration, the calls, and
   the arrays and bytes all nodes exchanged and the slowest node's compute; the link is calibrated again
   right before and right after each run and fitted on both calibrations' points (the shared machine's
   load drifts over minutes), and the MAPE against the calibration right before alone and against the one
   at the start is recorded beside it;
5. the split-budget mode (attention layout, 2 nodes: one round with few bytes, approximate): decode ms/token
   and its attention-mass recall next to the exact mode's (measured from the same calls, ``llm/recall.py``).

    python benchmarks/bench_disaggregated.py [--tokens 8192] [--budget 1024] [--new 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402

from _record import Record  # noqa: E402
from hetmem.llm.arch import describe  # noqa: E402
from hetmem.llm.generate import generate  # noqa: E402
from hetmem.llm.models import load_model  # noqa: E402
from hetmem.methods import get_method  # noqa: E402
from hetmem.hw.memnode import LinkModel, fit_link  # noqa: E402
from hetmem.llm.recall import RecallMeter  # noqa: E402
from hetmem.runtime.nodes.client import LAYOUTS, NodeMethod, modelled_decode_bytes  # noqa: E402
from hetmem.runtime.nodes.cluster import NodeCluster, cores  # noqa: E402
from hetmem.runtime.nodes.linkcal import calibrate_link, decode_request  # noqa: E402


def decode_batch() -> list[dict]:
    """A decode-shaped request (``linkcal.decode_request``: query, new K/V, plain fields), echoed, no node work."""
    return [decode_request(0.0)]


def idle_cpu(pids: list[int], seconds: float = 2.0) -> float:
    """CPU seconds per second an idle node process uses (mean over ``pids``, from /proc)."""
    def cpu(pid):
        with open(f"/proc/{pid}/stat") as f:
            x = f.read().split(")")[-1].split()
        return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")
    a = [cpu(p) for p in pids]
    time.sleep(seconds)
    return statistics.mean(cpu(p) - x for p, x in zip(pids, a)) / seconds


def per_call_us(cluster: NodeCluster, batches, n: int) -> float:
    cluster.call(batches, phase="bench", step="warmup")
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        cluster.call(batches, phase="bench", step="noop")
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def recalibrate(cl: NodeCluster, n: int, args) -> dict:
    """The link calibrated again on ``cl`` (right before and right after a run): on a shared machine the load
    (and with it every round trip) drifts over minutes, so the model is compared with the calibration made at
    the time."""
    return calibrate_link(n, force=True, cluster=cl, repeats=max(10, args.calls // 10), others=False)


def around(before: dict, after: dict, n: int) -> LinkModel:
    """The link model fitted on the points of the calibrations right before and right after a run together
    (the machine's load during the run lies between the two)."""
    return LinkModel.of({"key": {"n_nodes": n}, "fit": fit_link(before["points"] + after["points"])})


def link_errors(ledger, link: LinkModel) -> list[float]:
    """|model - measured| / measured of each decode (layer, step): the calls' link ms (the same on every node:
    round trip minus the slowest node's compute) against the model with all nodes' arrays and bytes and the
    slowest node's compute (round trip minus link, summed over the calls)."""
    agg: dict = {}
    for (node, layer, phase, step), r in ledger.rows.items():
        if phase != "decode":
            continue
        a = agg.setdefault((layer, step), {"calls": r["calls"], "ms": r["link_ms"], "arrays": 0, "bytes": 0,
                                           "node_ms": r["rt_ms"] - r["link_ms"]})
        a["arrays"] += r["arrays"]
        a["bytes"] += r["to_node"] + r["to_head"]
    return [abs(link.ms(a["calls"], a["arrays"], a["bytes"], a["node_ms"]) - a["ms"]) / a["ms"]
            for a in agg.values() if a["ms"] > 0]


def prompt_ids(tok, n: int) -> torch.Tensor:
    text = ("Memory grows faster than compute. A page of keys is summarised by its bounds, and the query "
            "asks which pages may matter. ") * (n // 20 + 10)
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    return ids


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    rec = Record().setting(**vars(args), model="smollm2", method="quest")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ok = True

    # 1. per-call overhead: plain actor calls, the compiled graph, the socket channel; 1 and 2 nodes; an empty
    # batch and a decode-shaped request; an idle node's CPU under each
    nodes = NodeCluster(2)
    us: dict = {}
    for transport in ("plain", "compiled", "socket"):
        for n in (1, 2):
            cl = NodeCluster(n, actors=nodes.actors, transport=transport)
            us[transport, n] = per_call_us(cl, [[] for _ in range(n)], args.calls)
            if n == 2:
                us[transport, "decode"] = per_call_us(cl, [decode_batch() for _ in range(n)], args.calls)
                rec.figure(f"idle_node_cpu.{transport}", round(idle_cpu(nodes.pids), 3), "cores",
                           note="CPU seconds per second of an idle node process, its transport set up (2 nodes)")
            cl.release_graph()  # an actor runs one compiled graph at a time
            cl.close()
    names = {"plain": "plain_actor", "compiled": "compiled_graph", "socket": "socket"}
    for t, name in names.items():
        rec.figure(f"call_us.{name}", round(us[t, 2], 1), "us/call", note="2 nodes, empty batch, median")
        rec.figure(f"call_us.{name}.1node", round(us[t, 1], 1), "us/call", note="1 node, empty batch, median")
        rec.figure(f"call_us.{name}.decode_request", round(us[t, "decode"], 1), "us/call",
                   note="2 nodes, a decode-shaped request echoed (4 arrays each way per node), median")
    rec.figure("call_overhead_ratio", round(us["plain", 2] / us["compiled", 2], 2), "x", note="plain / compiled")
    rec.figure("call_overhead_ratio.socket", round(us["plain", 2] / us["socket", 2], 2), "x", note="plain / socket")
    rec.setting(transport="socket")
    for t in names:
        print(f"per call ({t}): 1 node {us[t, 1]:.0f} us, 2 nodes {us[t, 2]:.0f} us, 2 nodes decode-shaped "
              f"{us[t, 'decode']:.0f} us", flush=True)
    print(f"idle node CPU: " + ", ".join(f"{t} {rec.figures[f'idle_node_cpu.{t}']['value']:.2f} cores" for t in names),
          flush=True)

    # 2. link calibration per node count (what hetmem plan --system host+memnode uses; refreshed in its cache)
    links = {}
    for n in (1, 2):
        sub = NodeCluster(n, actors=nodes.actors)
        e = calibrate_link(n, force=True, cluster=sub, repeats=max(10, args.calls // 10))
        sub.close()
        links[n] = LinkModel.of(e)
        lk = links[n]
        rec.figure(f"link.{n}node.latency_us", round(lk.latency_ms * 1e3, 1), "us",
                   note="fitted round trip through the run's transport at 0 arrays, 0 bytes, 0 node compute")
        rec.figure(f"link.{n}node.per_array_us", round(lk.per_array_ms * 1e3, 2), "us", note="fitted, per numpy array")
        rec.figure(f"link.{n}node.bandwidth_gbs", round(lk.bandwidth_gbs, 3), "GB/s", note="fitted, both directions")
        rec.figure(f"link.{n}node.compute_share", round(lk.compute_share, 3), "ms/ms",
                   note="fitted, link ms per ms of the slowest node's compute (cores shared)")
        for t, ms in e["other_transports_call_ms"].items():
            rec.figure(f"link.{n}node.{names[t]}_call_us", round(ms * 1e3, 1), "us",
                       note="empty call after head work, trimmed mean (the calibration's conditions)")
        rec.figure(f"link.{n}node.fit_mape", round(e["fit"]["mape_pct"], 1), "%", source="modelled",
                   note="the fit against its own calibration calls")
        rec.detail(f"link_points_{n}node", e["points"])
        print(f"link, {n} node(s): {lk.latency_ms * 1e3:.0f} us + {lk.per_array_ms * 1e3:.1f} us/array + bytes / "
              f"{lk.bandwidth_gbs:.2f} GB/s + {lk.compute_share:.2f} x node ms (fit MAPE {e['fit']['mape_pct']:.0f}%); "
              f"other transports after head work: {e['other_transports_call_ms']} ms", flush=True)

    # 3. decode, in-process vs nodes
    lm = load_model("smollm2")
    arch = describe(lm.model)
    ids = prompt_ids(lm.tokenizer, args.tokens)
    params = dict(budget=args.budget)
    # in-process at every core and at one thread (the head's count with nodes): the faster is the baseline
    base, base_ms, best = None, float("inf"), None
    for th in sorted({cores(), 1}):
        torch.set_num_threads(th)
        r = generate(lm.model, ids, get_method("quest", **params), args.new, progress=False)
        ms = r.decode_ms / max(1, len(r.token_ids) - 1)
        rec.figure(f"decode_ms_per_token.in_process_{th}thread", round(ms, 2), "ms/token")
        print(f"in-process, {th} thread(s): {ms:.1f} ms/token", flush=True)
        if base is not None and r.token_ids != base.token_ids:
            ok = False
        base = base or r
        if ms < base_ms:
            base_ms, best = ms, th
    rec.setting(prompt_tokens=ids.shape[1], in_process_threads=best)
    rec.figure("decode_ms_per_token.in_process", round(base_ms, 2), "ms/token", note=f"the faster: {best} thread(s)")
    method = get_method("quest", **params)
    sparse_layers = arch.n_layers - method.dense_layers
    errs, errs_start, errs_before = [], [], []
    for n in (1, 2):
        cl = NodeCluster(n, actors=nodes.actors)
        torch.set_num_threads(cl.threads["head"])
        for layout, rounds in [(x, 1) for x in LAYOUTS] + [("attention", 2)]:
            before = recalibrate(cl, n, args)
            cl.ledger.rows.clear()
            nm = NodeMethod(get_method("quest", **params), cl, layout, rounds=rounds)
            res = generate(lm.model, ids, nm, args.new, progress=False)
            nm.close_session()
            now = around(before, recalibrate(cl, n, args), n)
            steps = max(1, len(res.token_ids) - 1)
            ms = res.decode_ms / steps
            same = res.token_ids == base.token_ids
            ok &= same
            dec = cl.ledger.summary().get("decode", {})
            measured = (dec.get("bytes_to_node", 0) + dec.get("bytes_to_head", 0)) / steps / sparse_layers
            model = modelled_decode_bytes(layout, n, kv_heads=arch.kv_heads, group=lm.model.config.num_attention_heads // arch.kv_heads,
                                          head_dim=arch.key_dim, budget_pages=method.budget_pages,
                                          page_size=method.page_size, rounds=rounds,
                                          forced_pages=method.sink_pages + method.recent_pages)["total"]
            key = f"{layout}{'_2round' if layout == 'attention' and rounds == 2 else ''}.{n}node"
            rec.figure(f"decode_ms_per_token.{key}", round(ms, 2), "ms/token")
            rec.figure(f"decode_ratio.{key}", round(ms / base_ms, 3), "x", note="nodes / in-process")
            rec.figure(f"bytes_per_layer_step.{key}", round(measured), "B", note="measured, per sparse layer")
            rec.figure(f"bytes_per_layer_step_model.{key}", model, "B", source="modelled")
            rec.figure(f"tokens_identical.{key}", int(same), "1 = identical")
            errs += link_errors(cl.ledger, now)
            errs_start += link_errors(cl.ledger, links[n])
            errs_before += link_errors(cl.ledger, LinkModel.of(before))
            e_run = link_errors(cl.ledger, now)
            rec.figure(f"link_model_mape.{key}", round(100 * statistics.mean(e_run), 1) if e_run else None, "%",
                       source="modelled", note="calibrated just before and just after this run")
            print(f"{n} node(s) {key.split('.')[0]:<17}: {ms:.1f} ms/token ({ms / base_ms:.2f}x), {measured:.0f} B/layer/step "
                  f"(model {model}), tokens identical: {same}", flush=True)
        if n == 2:  # 5. split budget: one round per layer; its recall next to the exact mode's
            before = recalibrate(cl, n, args)
            nm = NodeMethod(get_method("quest", **params), cl, "attention", split_budget=True)
            cl.ledger.rows.clear()
            res = generate(lm.model, ids, nm, args.new, progress=False)
            nm.close_session()
            now = around(before, recalibrate(cl, n, args), n)
            steps = max(1, len(res.token_ids) - 1)
            ms = res.decode_ms / steps
            dec = cl.ledger.summary().get("decode", {})
            measured = (dec.get("bytes_to_node", 0) + dec.get("bytes_to_head", 0)) / steps / sparse_layers
            errs += link_errors(cl.ledger, now)
            errs_start += link_errors(cl.ledger, links[n])
            errs_before += link_errors(cl.ledger, LinkModel.of(before))
            exact = RecallMeter(arch.n_layers)
            nm = NodeMethod(get_method("quest", **params), cl, "attention", split_budget=True, exact_meter=exact)
            rr = generate(lm.model, ids, nm, args.new, progress=False, recall=True)
            nm.close_session()
            r_split = rr.recall["attention_mass_recall"]
            r_exact = exact.summary()["attention_mass_recall"]
            rec.figure("decode_ms_per_token.attention_split.2node", round(ms, 2), "ms/token")
            rec.figure("decode_ratio.attention_split.2node", round(ms / base_ms, 3), "x", note="nodes / in-process")
            rec.figure("bytes_per_layer_step.attention_split.2node", round(measured), "B", note="measured, per sparse layer")
            rec.figure("calls_per_layer_step.attention_split.2node", round(dec.get("calls", 0) / steps / sparse_layers, 3),
                       "calls", note="measured (the exact attention layout makes 1, or 2 with --attention-rounds 2)")
            rec.figure("recall.attention_split.2node", r_split, "attention-mass recall",
                       note="split budget's selections, llm/recall.py")
            rec.figure("recall.exact.2node", r_exact, "attention-mass recall",
                       note="the exact mode's selections at the same steps (from the same calls)")
            print(f"2 node(s) attention, split budget: {ms:.1f} ms/token ({ms / base_ms:.2f}x), {measured:.0f} "
                  f"B/layer/step; recall {r_split:.4f} vs exact {r_exact:.4f}", flush=True)
        cl.close()
    mape = 100 * statistics.mean(errs) if errs else None
    rec.figure("link_model_mape", None if mape is None else round(mape, 1), "%", source="modelled",
               note="link model (per node count: latency + arrays + bytes) vs the measured link ms of every decode "
                    "(layer, step)")
    rec.figure("link_model_entries", len(errs), "entries")
    rec.figure("link_model_mape_before_calibration", round(100 * statistics.mean(errs_before), 1) if errs_before else None,
               "%", source="modelled", note="the same entries against the calibration right before each run alone")
    rec.figure("link_model_mape_start_calibration", round(100 * statistics.mean(errs_start), 1) if errs_start else None,
               "%", source="modelled", note="the same entries against the calibration made once at the start")
    print(f"link model MAPE vs measured decode transfers: {mape:.1f}% over {len(errs)} (layer, step) entries "
          f"(calibrated right before and after each run; {100 * statistics.mean(errs_before):.1f}% with the calibration "
          f"before it alone, {100 * statistics.mean(errs_start):.1f}% with the calibration at the start)",
          flush=True)
    nodes.close()
    ray.shutdown()
    rec.write(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
