"""``hetmem run --memory-nodes N``: answer a question with the method's memory on Ray memory nodes."""

from __future__ import annotations

import torch

from hetmem.llm.recall import RecallMeter
from hetmem.llm.run import answer_question
from hetmem.runtime.nodes.client import NodeMethod
from hetmem.runtime.nodes.cluster import NodeCluster


def annotate(rec: dict, nm: NodeMethod, cluster: NodeCluster) -> dict:
    """Add to a run record where each step ran and the measured transfers."""
    remote = {"prepare", "relevancy"} | ({"apply"} if nm.layout in ("kv", "attention") else set())
    nodes = [f"node{i}" for i in range(cluster.n)]
    for step, s in rec["steps"].items():
        if not s.get("calls"):
            continue
        s["ran_on"] = nodes if step in remote else ["head"]
        if step == "apply" and nm.layout == "kv":
            s["ran_on"] = ["head"]
            s["note"] = "the selected pages' K/V come from the nodes (timed inside apply); attention runs on the head"
        if step == "apply" and nm.layout == "attention" and nm.rounds == 2:
            s["note"] = "partial attention on each node, merged on the head by log-sum-exp (timed inside apply)"
        if nm.layout == "attention" and nm.rounds == 1 and not nm.split_budget:
            if step == "relevancy":
                s["note"] = ("one call per layer: the nodes score their pages and attend over each candidate page "
                             "on its own (timed inside relevancy)")
            if step == "apply":
                s["note"] = ("attention over each candidate page ran on the nodes inside the relevancy call; apply's "
                             "time is the head merging the selected pages' partial outputs by log-sum-exp")
        if step in ("prepare", "relevancy") and getattr(nm, "dense_layers", 0):
            s["note"] = f"the first {nm.dense_layers} layers are dense (no memory): they run on the head"
    annotate_cluster(rec, cluster)
    rec["memory_nodes"]["layout"] = nm.layout
    # this sequence's own transfers (the cluster's ledger sums every sequence that used the nodes)
    rec["memory_nodes"]["transfers_total"] = {ph: dict(t) for ph, t in nm.transfers.items()}
    if nm.layout == "attention" and nm.rounds == 1 and not nm.split_budget:
        rec["memory_nodes"]["second_rounds"] = nm.second_rounds
    return rec


def annotate_cluster(rec: dict, cluster: NodeCluster, remote_steps: tuple[str, ...] = ()) -> dict:
    """Add to a run record the nodes (threads, restarts) and the measured transfers; ``remote_steps``: the
    steps that ran on the nodes (the rest ran on the head)."""
    for step in remote_steps:
        s = rec.get("steps", {}).get(step)
        if s and s.get("calls"):
            s["ran_on"] = [f"node{i}" for i in range(cluster.n)]
    rec["memory_nodes"] = {**cluster.record(), "head_threads": torch.get_num_threads(),
                           "transfers_total": cluster.ledger.summary(),
                           "source": "measured: bytes of the arrays sent and returned; ms = call round trip minus "
                                     "the node's own compute"}
    rec["transfers"] = cluster.ledger.transfers()
    return rec


def answer_on_nodes(lm, method, context: str, question: str, *, n_nodes: int, layout: str, address: str | None = None,
                    max_new_tokens: int = 32, progress: bool = True, cluster: NodeCluster | None = None,
                    step_timing: bool = True, split_budget: bool = False, recall: bool = False, rounds: int = 1) -> dict:
    """``rounds``: the exact attention layout in one call per layer or two (``client``). ``split_budget``: the
    approximate one-round mode (``client``); with ``recall`` its record holds the split
    selections' attention-mass recall (``recall``) and the exact mode's from the same run (``recall_exact``)."""
    own = cluster is None
    cluster = cluster or NodeCluster(n_nodes, address=address)
    try:
        torch.set_num_threads(cluster.threads["head"])
        exact = RecallMeter(lm.model.config.num_hidden_layers) if split_budget and recall else None
        nm = NodeMethod(method, cluster, layout, split_budget=split_budget, exact_meter=exact, rounds=rounds)
        rec = answer_question(lm, nm, context, question, max_new_tokens, progress=progress, step_timing=step_timing,
                              recall=recall)
        nm.close_session()
        if exact is not None:
            rec["recall_exact"] = exact.summary()
            # the exact mode's recall was measured inside decode: its time is measurement, not the method's
            for k in ("decode_ms", "total_ms"):
                rec[k] = round(rec[k] - exact.ms, 3)
            rec["measurement_ms"]["recall_exact"] = round(exact.ms, 3)
        annotate(rec, nm, cluster)
        rec["memory_nodes"]["split_budget"] = split_budget
        rec["memory_nodes"]["attention_rounds"] = nm.rounds if layout == "attention" else None
        if split_budget:
            rec["memory_nodes"]["split_note"] = (
                "one round per layer: each node selected its share of the budget and attended at once"
                + ("; its calls also carried the candidates the exact mode's selection (recall_exact) is measured "
                   "from" if recall else ""))
        return rec
    finally:
        if own:
            cluster.close()
