"""``hetmem run``: answer a question about a context with one method (optionally on a placement)."""

from __future__ import annotations

import json
import sys

from hetmem.cli.common import RUNNERS, add_method_options, method_from_args, model_args, validated_context
from hetmem.errors import HetmemError
from hetmem.hw.memnode import SYSTEM as MEMNODE_SYSTEM
from hetmem.llm.models import load_model
from hetmem.llm.prompt import build_prompt_ids
from hetmem.llm.run import answer_question
from hetmem.methods import REGISTRY
from hetmem.profiling.report import step_table
from hetmem.runtime.executor import apply_ledger, pick_rule, place, placement_table, read_schedule
from hetmem.runtime.nodes.client import LAYOUTS
from hetmem.runtime.nodes.run import answer_on_nodes


def emit(args, method, rec: dict, note: str | None = None) -> None:
    """The run's output: its JSON record with --json, else the answer on stdout and the step table (and ``note``)
    on stderr."""
    if args.json:
        print(json.dumps(rec))
        return
    print(rec["answer"])
    print(step_table({method.name: rec}), file=sys.stderr)
    if note:
        print(note, file=sys.stderr)


def cmd_run(args) -> int:
    if getattr(args, "placement", None):
        return cmd_run_placed(args)
    if args.memory_nodes is not None or args.ray_address:
        return cmd_run_nodes(args)
    if args.layout:
        raise HetmemError("--layout needs --memory-nodes N (or --ray-address)")
    if args.split_budget:
        raise HetmemError("--split-budget needs --memory-nodes N (or --ray-address)")
    if args.attention_rounds != 1:
        raise HetmemError("--attention-rounds needs --memory-nodes N (or --ray-address)")
    method = method_from_args(args)
    if method.family in RUNNERS:
        return RUNNERS[method.family](args, method)
    context = validated_context(args, method)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    rec = answer_question(lm, method, context, args.question, args.max_new_tokens, recall=args.recall,
                          step_timing=not args.no_step_timing, kv_dtype=args.kv_dtype)
    emit(args, method, rec)
    return 0


def cmd_run_nodes(args) -> int:
    """The method's memory on Ray memory nodes (local, or those of the cluster at --ray-address)."""
    method = method_from_args(args)
    n = args.memory_nodes if args.memory_nodes is not None else 1
    if n < 1:
        raise HetmemError(f"--memory-nodes must be at least 1 (got {n})")
    if method.family == "rag":  # a sharded memory's shards on the nodes (cli/index.run_rag)
        if args.layout:
            raise HetmemError("--layout is for sparse-attention methods; a RAG memory's nodes hold its shards")
        if args.split_budget:
            raise HetmemError("--split-budget is for sparse-attention methods (a RAG top-k is merged exactly on the head)")
        return RUNNERS["rag"](args, method)
    if method.family != "sparse-attention":
        raise HetmemError(f"--memory-nodes runs sparse-attention methods; '{method.name}' is {method.family}")
    if args.device != "cpu":
        raise HetmemError("--memory-nodes runs the model on cpu (the nodes exchange host memory)")
    context = validated_context(args, method)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    rec = answer_on_nodes(lm, method, context, args.question, n_nodes=n, layout=args.layout or "attention",
                          address=args.ray_address, max_new_tokens=args.max_new_tokens,
                          step_timing=not args.no_step_timing, split_budget=args.split_budget, recall=args.recall,
                          rounds=args.attention_rounds)
    mn = rec["memory_nodes"]
    emit(args, method, rec, f"memory nodes: {mn['n']} ({mn['layout']} layout, {mn['calls']}), threads: head "
                            f"{mn['head_threads']}, {mn['threads']['per_node']} per node; restarts: {mn['restarts']}")
    return 0


def cmd_run_planned_nodes(args, schedule: dict) -> int:
    """A ``hetmem plan --system host+memnode`` schedule: the rule for the prompt's size names the layout and
    the node count; the run is ``--memory-nodes N --layout L`` (``--layout``/``--memory-nodes`` override it)."""
    method = method_from_args(args)
    pick_rule(schedule, method.name, 1)  # the method has rules: fail before loading a model
    if args.device != "cpu":
        raise HetmemError("--memory-nodes runs the model on cpu (the nodes exchange host memory)")
    context = validated_context(args, method)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    size = build_prompt_ids(lm.tokenizer, context, args.question).shape[1]
    rule = pick_rule(schedule, method.name, size)
    layout = args.layout or rule.get("layout")
    n = args.memory_nodes if args.memory_nodes is not None else rule.get("memory_nodes")
    if layout not in LAYOUTS or not isinstance(n, int) or n < 1:
        raise HetmemError(f"placement file {args.placement}: a {MEMNODE_SYSTEM} rule needs a 'layout' "
                          f"({', '.join(LAYOUTS)}) and 'memory_nodes' (a positive integer)")
    rec = answer_on_nodes(lm, method, context, args.question, n_nodes=n, layout=layout, address=args.ray_address,
                          max_new_tokens=args.max_new_tokens, step_timing=not args.no_step_timing,
                          rounds=args.attention_rounds)
    rec["placement_rule"] = {"file": str(args.placement), "size": size, "max_size": rule.get("max_size"),
                             "layout": layout, "memory_nodes": n,
                             "predicted_latency_us": rule.get("predicted_latency_us"), "source": "modelled"}
    emit(args, method, rec)
    return 0


def cmd_run_placed(args) -> int:
    schedule = read_schedule(args.placement)
    if schedule.get("system") == MEMNODE_SYSTEM:
        return cmd_run_planned_nodes(args, schedule)
    method = method_from_args(args)
    if method.family in RUNNERS:
        raise HetmemError(f"--placement runs in-model attention methods; '{method.name}' ({method.family}) is not one yet")
    context = validated_context(args, method)
    rule = pick_rule(schedule, method.name, 1)  # validate the method has rules before loading a model
    placed, placement, ledger = place(method, rule)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    size = build_prompt_ids(lm.tokenizer, context, args.question).shape[1]
    rule = pick_rule(schedule, method.name, size)
    placed, placement, ledger = place(method, rule)
    rec = answer_question(lm, placed, context, args.question, args.max_new_tokens)
    rec["placement_rule"] = {"file": str(args.placement), "size": size, "max_size": rule.get("max_size")}
    apply_ledger(rec, placement, ledger)
    if args.json:
        print(json.dumps(rec))
    else:
        print(rec["answer"])
        print(placement_table(rec), file=sys.stderr)
    return 0


def register(sub):
    """Adds ``run``; returns its parser so method families add their own options to it."""
    r = sub.add_parser("run", help="answer a question about a context with one method")
    r.add_argument("--method", required=True, choices=sorted(REGISTRY))
    r.add_argument("--context", help="a UTF-8 text file (attention methods)")
    r.add_argument("--question")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--placement", default=None,
                   help="schedule.json (from hetmem plan, or hand written): run each step on its device's "
                        "backend (cpu, cuda, fpga-emu)")
    r.add_argument("--no-step-timing", action="store_true",
                   help="do not time each step (on CUDA the step timer synchronises the device around every step)")
    r.add_argument("--kv-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="store the KV cache in this dtype (default: the model's), attention accumulating in float32; "
                        "bf16/fp16 halve the bytes decode reads (dense and quest)")
    r.add_argument("--recall", action="store_true",
                   help="also report attention-mass recall vs the oracle top-k at the same budget (sparse methods)")
    r.add_argument("--memory-nodes", type=int, default=None, metavar="N",
                   help="run the method's memory on N Ray memory nodes (a local Ray; default: in-process); "
                        "RAG: the shards of a memory built with 'hetmem index --shards'")
    r.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="with --memory-nodes: index (nodes select, K/V on the head), kv (nodes hold K/V too and "
                        "return the selected pages) or attention (nodes attend, the head merges; default)")
    r.add_argument("--attention-rounds", type=int, choices=(1, 2), default=1,
                   help="with --memory-nodes, attention layout, exact selection: 1 (default) = one call per layer, the "
                        "nodes return every candidate page's attention and the head merges the selected ones; 2 = the "
                        "nodes return candidates, then attend over the selection (fewer bytes, two round trips)")
    r.add_argument("--split-budget", action="store_true",
                   help="with --memory-nodes, attention layout: each node selects budget/N of its own pages and attends "
                        "at once, in one round with few bytes (approximate: with --recall the record holds its "
                        "attention-mass recall and the exact mode's)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join the Ray cluster at ADDR (started with `ray start --head`) instead of a local Ray")
    model_args(r)
    add_method_options(r)
    r.set_defaults(func=cmd_run)
    return r
