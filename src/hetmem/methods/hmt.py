"""``hmt``: a frozen backbone reads the context in segments and recalls memory embeddings of past segments.

He et al., NAACL 2025, "HMT: Hierarchical Memory Transformer for Efficient Long Context Language
Processing", arXiv 2405.06067. Per segment of ``--segment-tokens`` tokens:

    Prepare    summarise: the backbone's last hidden state after (summary prompt + the segment's first
               half) is the segment's summary query S_n
    Relevancy  cross-attention scores of S_n (query projection) over the last ``--memory-entries``
               memory embeddings (key projection)
    Retrieval  softmax-weighted recall of those embeddings (value projection): P_n
    Apply      run the segment with P_n and the sensory memory (the last ``--sensory-tokens`` tokens of
               the previous segment, HMT's "sensory memory") prepended and a memory token appended; the
               hidden state at the memory token is the segment's memory embedding M_n, kept for the next
               segments

P_n enters through a learned per-dimension gate initialised at zero, ``P_n = base + gate * (recall Wv)``
(``base``: a learned input embedding, initially the mean token embedding): a last-layer hidden state is not
an input embedding (far longer), so an untrained HMT prepends a neutral token and training
opens the gate as far as the recalled memory helps. (An exactly zero input vector is avoided: its RMSNorm
has no finite gradient.)

The backbone is frozen. The new parameters (memory token, summary prompt, cross-attention projections)
are trained with ``hetmem train --method hmt`` (train/distill.py's loop) and saved beside the model cache
(``settings.cache_dir()/hmt/<model>``), where ``hetmem run`` finds them. With no memory entries the
segment runs alone (after its sensory tokens): with ``--sensory-tokens 0`` too, its logits are exactly the
segment-only baseline's.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.timer import StepTimer
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.llm.prompt import build_prompt_ids, eos_ids
from hetmem.methods.base import param, register
from hetmem.methods.contextual_common import ContextRequest, ContextualMethod, forward_counts, model_dims_of
from hetmem.methods.gates import load_gates
from hetmem.ops import counts as C
from hetmem.settings import cache_dir

PARAM_NAMES = ("mem_token", "summary_prompt", "wq", "wk", "wv", "gate", "recall_base")


def init_params(hidden: int, attn_dim: int = 64, seed: int = 0, embed: torch.Tensor | None = None) -> dict:
    """Untrained HMT parameters: memory token and summary prompt = the mean token embedding (a neutral
    input), random query/key projections, identity value projection, a closed (zero) gate on the recall
    over a neutral base embedding."""
    g = torch.Generator().manual_seed(seed)
    base = embed.mean(0).detach().float().clone() if embed is not None else torch.zeros(hidden)
    return {"mem_token": base.clone(), "summary_prompt": base.clone(),
            "wq": torch.randn(hidden, attn_dim, generator=g) / hidden**0.5,
            "wk": torch.randn(hidden, attn_dim, generator=g) / hidden**0.5,
            "wv": torch.eye(hidden), "gate": torch.zeros(hidden), "recall_base": base.clone()}


def default_weights_dir(model_name: str) -> Path:
    return cache_dir() / "hmt" / re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)


def load_params(path, hidden: int) -> tuple[dict, dict]:
    tensors, meta = load_gates(path, "hmt")
    if tuple(tensors["mem_token"].shape) != (hidden,):
        raise HetmemError(f"hmt weights {path} are for hidden size {tensors['mem_token'].shape[0]}, this model has {hidden}")
    if "gate" not in tensors:  # weights from before the gate: the recall entered ungated
        tensors = {**tensors, "gate": torch.ones(hidden), "recall_base": torch.zeros(hidden)}
    return {k: tensors[k] for k in PARAM_NAMES}, meta


# -- the model computations (differentiable: training backpropagates through them) ------------------------------
def summarise(model, params: dict, emb: torch.Tensor, summary_len: int) -> torch.Tensor:
    """S_n ``[B, hidden]``: last hidden state after (summary prompt + the first ``summary_len`` segment tokens)."""
    B = emb.shape[0]
    x = torch.cat([params["summary_prompt"].to(emb.dtype).expand(B, 1, -1), emb[:, :summary_len]], 1)
    return model.model(inputs_embeds=x).last_hidden_state[:, -1]


def recall_scores(params: dict, summary: torch.Tensor, mems: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: (S Wq) . (M Wk) / sqrt(d) over the memory embeddings ``mems [B, N, hidden]``."""
    q = summary @ params["wq"].to(summary.dtype)
    k = mems @ params["wk"].to(mems.dtype)
    return torch.einsum("bd,bnd->bn", q, k) * q.shape[-1] ** -0.5


def recall(params: dict, scores: torch.Tensor, mems: torch.Tensor) -> torch.Tensor:
    """P ``[B, hidden]``: softmax-weighted memory embeddings through the value projection and the gate."""
    p = torch.einsum("bn,bnd->bd", torch.softmax(scores, -1), mems) @ params["wv"].to(mems.dtype)
    return params["recall_base"].to(p.dtype) + p * params["gate"].to(p.dtype)


def run_segment(model, params: dict, emb: torch.Tensor, recalled: torch.Tensor | None,
                sensory: torch.Tensor | None = None):
    """Logits at the segment's positions ``[B, L, vocab]`` and the new memory embedding ``[B, hidden]``.
    The input is [P_n, sensory tokens' embeddings, segment, memory token]."""
    B, L = emb.shape[:2]
    pre = ([recalled[:, None]] if recalled is not None else []) + ([sensory] if sensory is not None else [])
    parts = pre + [emb, params["mem_token"].to(emb.dtype).expand(B, 1, -1)]
    out = model(inputs_embeds=torch.cat(parts, 1), output_hidden_states=True)
    off = sum(p.shape[1] for p in pre)
    return out.logits[:, off : off + L], out.hidden_states[-1][:, -1]


# -- the four steps ---------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """Raw data of one step: the model, the parameters and one segment's token ids ``[B, L]``."""

    model: object
    params: dict
    ids: torch.Tensor


@register_impl("hmt-summary", role="prepare")
@dataclass
class SegmentSummaryPrepare:
    """Prepare: the segment's summary query S_n; the Memory holds the memory embeddings M (``[B, n, hidden]``)."""

    summary_len: int
    device: str = "cpu"
    name: str = "segment-summary"

    def prepare(self, raw: Segment, memory: Memory | None = None) -> Memory:
        emb = raw.model.get_input_embeddings()(raw.ids)
        if memory is None:
            memory = Memory(kind="hmt-embeddings", tensors={"M": emb.new_zeros(emb.shape[0], 0, emb.shape[-1])},
                            unit_size=raw.ids.shape[1])
        memory.meta["sensory"] = memory.meta.get("next_sensory")  # the previous segment's last tokens
        memory.meta["emb"] = emb
        memory.meta["summary"] = summarise(raw.model, raw.params, emb, min(self.summary_len, emb.shape[1]))
        return memory

    def op_counts(self, raw: Segment, memory=None):
        e = next(raw.model.parameters()).element_size()
        return {"prepare": forward_counts(model_dims_of(raw.model.config), min(self.summary_len, raw.ids.shape[1]) + 1,
                                          0, e, logits=0)}


@register_impl("hmt-cross-attention", role="relevancy")
@dataclass
class CrossAttentionRelevancy:
    """Relevancy: cross-attention scores of the summary query over the last ``entries`` memory embeddings."""

    entries: int
    params: dict | None = None
    device: str = "cpu"
    name: str = "memory-cross-attention"

    def score(self, memory: Memory, query: Query) -> Scores:
        M = memory.tensors["M"]
        mems = M[:, max(0, M.shape[1] - self.entries):] if self.entries else M[:, :0]
        if mems.shape[1] == 0:
            return Scores(M.new_zeros(M.shape[0], 0), offset=M.shape[1])
        return Scores(recall_scores(self.params, memory.meta["summary"], mems), offset=M.shape[1] - mems.shape[1])

    def op_counts(self, memory: Memory, query: Query):
        M = memory.tensors["M"]
        n = min(self.entries, M.shape[1])
        B, _, h = M.shape
        dc = self.params["wq"].shape[1] if self.params else 64
        e = M.element_size()
        return {"relevancy": [C.linear("hmt_wq", B, h, dc, e), C.linear("hmt_wk", B * n, h, dc, e),
                              C.OpCount("hmt_scores", "gemv", 2.0 * B * n * dc, float(e * B * (n + 1) * dc), 4.0 * B * n)]}


@register_impl("hmt-recall", role="retrieval")
@dataclass
class SoftmaxRecallRetrieval:
    """Retrieval: P_n = softmax(scores) . M (value projection); None when there is no memory yet."""

    params: dict | None = None
    device: str = "cpu"
    name: str = "softmax-recall"

    def select(self, scores: Scores, memory: Memory):
        if scores.values.shape[-1] == 0:
            return None
        mems = memory.tensors["M"][:, scores.offset :]
        return recall(self.params, scores.values, mems)

    def op_counts(self, scores: Scores, memory: Memory):
        B, n = scores.values.shape
        h = memory.tensors["M"].shape[-1]
        e = memory.tensors["M"].element_size()
        return {"retrieval": [C.elementwise("softmax", B * n, 5, 1, 1, 4),
                              C.OpCount("hmt_weighted_sum", "gemv", 2.0 * B * n * h, float(e * B * n * h), float(e * B * h)),
                              C.linear("hmt_wv", B, h, h, e)]}


@register_impl("hmt-segment", role="apply")
@dataclass
class PrependSegmentApply:
    """Apply: run the segment with the recalled embedding and the sensory memory (the previous segment's last
    ``sensory_tokens`` token embeddings) prepended; append its memory embedding to M.
    ``target`` is the Memory; returns the segment's logits ``[B, L, vocab]``."""

    sensory_tokens: int = 0
    device: str = "cpu"
    name: str = "prepend-and-run-segment"

    def apply(self, raw: Segment, selection, target: Memory) -> torch.Tensor:
        emb = target.meta["emb"]
        logits, m_new = run_segment(raw.model, raw.params, emb, selection, target.meta.get("sensory"))
        target.tensors["M"] = torch.cat([target.tensors["M"], m_new[:, None]], 1)
        target.n_units = target.tensors["M"].shape[1]
        target.meta["next_sensory"] = emb[:, emb.shape[1] - min(self.sensory_tokens, emb.shape[1]):] if self.sensory_tokens else None
        return logits

    def op_counts(self, raw: Segment, selection, target: Memory):
        e = next(raw.model.parameters()).element_size()
        sens = target.meta.get("sensory")
        n = raw.ids.shape[1] + 1 + (selection is not None) + (0 if sens is None else sens.shape[1])
        return {"apply": forward_counts(model_dims_of(raw.model.config), n, 0, e, logits=raw.ids.shape[1])}


def hmt_pipeline(params: dict, segment_tokens: int, memory_entries: int, device: str = "cpu", timer=None,
                 sensory_tokens: int = 0):
    return MemoryPipeline(SegmentSummaryPrepare(max(1, segment_tokens // 2), device),
                          CrossAttentionRelevancy(memory_entries, params, device), SoftmaxRecallRetrieval(params, device),
                          PrependSegmentApply(sensory_tokens, device), timer or StepTimer(enabled=False))


def process_segments(pipe, model, params: dict, ids: torch.Tensor, segment_tokens: int, memory: Memory | None = None):
    """Run ``ids [B, T]`` segment by segment through the four steps; returns (per-segment logits, memory)."""
    out = []
    for a in range(0, ids.shape[1], segment_tokens):
        raw = Segment(model, params, ids[:, a : a + segment_tokens])
        memory = pipe.build(raw, memory)
        sel = pipe.select(memory, Query())
        with pipe.timer.step("apply", pipe.apply.device):
            out.append(pipe.apply.apply(raw, sel, memory))
    return out, memory


@register
@dataclass
class HMT(ContextualMethod):
    name = "hmt"
    summary = "frozen backbone over segments; memory embeddings recalled by cross-attention, prepended (HMT)"

    segment_tokens: int = param(256, "tokens per segment", low=4)
    memory_entries: int = param(32, "memory embeddings the cross-attention recalls over (the most recent)", low=0)
    sensory_tokens: int = param(32, "the previous segment's last tokens prepended to each segment (HMT's sensory memory)",
                                low=0)
    hmt_weights: str | None = param(None, "directory of trained HMT weights (default: found beside the model cache)")

    def pipeline(self, device, timer, layer_idx: int = 0, lm=None, stats=None):
        params = self.params_for(lm)[0] if lm is not None else None
        return hmt_pipeline(params, self.segment_tokens, self.memory_entries, device, timer, self.sensory_tokens)

    def params_for(self, lm) -> tuple[dict, dict]:
        """(parameters, info): trained weights from --hmt-weights or beside the model cache, else untrained."""
        cached = getattr(self, "_loaded", None)
        if cached is not None and cached[0] is lm:
            return cached[1], cached[2]
        hidden = lm.model.config.hidden_size
        path = Path(self.hmt_weights) if self.hmt_weights else default_weights_dir(lm.name)
        if self.hmt_weights or (path / "gates.json").is_file():
            params, meta = load_params(path, hidden)
            info = {"trained": True, "weights": str(path), "trained_steps": meta.get("steps"),
                    "trained_segment_tokens": meta.get("segment_tokens")}
        else:
            params = init_params(hidden, embed=lm.model.get_input_embeddings().weight)
            info = {"trained": False, "weights": None,
                    "note": f"untrained HMT parameters: no weights in {path} (train them: hetmem train --method hmt)"}
        dtype = next(lm.model.parameters()).dtype
        params = {k: v.to(dtype) for k, v in params.items()}
        object.__setattr__(self, "_loaded", (lm, params, info))
        return params, info

    @torch.no_grad()
    def run(self, request: ContextRequest, pipe) -> dict:
        lm, st = request.lm, request.stats
        model, tok = lm.model, lm.tokenizer
        params, info = self.params_for(lm)
        timer = pipe.timer
        timer.phase = "memory"
        ids = torch.tensor([tok(request.context.strip(), add_special_tokens=False)["input_ids"]])
        t0 = time.perf_counter()
        _, memory = process_segments(pipe, model, params, ids, self.segment_tokens)
        st["prefill_ms"] += (time.perf_counter() - t0) * 1e3
        n_seg = memory.n_units
        st["llm_calls"] += 2 * n_seg
        st["tokens_read"] += ids.shape[1]
        st["tokens_prefilled"] += ids.shape[1]
        # the question is the last segment: recall for it, prepend, then generate greedily
        timer.phase = "answer"
        q_ids = build_prompt_ids(tok, "Answer from what you remember of the document.", request.question)
        raw = Segment(model, params, q_ids)
        memory = pipe.build(raw, memory)
        sel = pipe.select(memory, Query(text=request.question))
        with timer.step("apply", pipe.apply.device):
            out_ids, ms = _generate_prepended(model, memory.meta["emb"], sel, request.max_new_tokens, eos_ids(tok, model),
                                              memory.meta.get("sensory"))
        st["prefill_ms"] += ms[0]
        st["decode_ms"] += ms[1]
        st["llm_calls"] += 1
        st["tokens_read"] += q_ids.shape[1]
        st["tokens_written"] += len(out_ids)
        M = memory.tensors["M"]
        return {"answer": tok.decode(out_ids, skip_special_tokens=True).strip(),
                "tokens": {"prompt": int(q_ids.shape[1]), "generated": len(out_ids), "context": int(ids.shape[1])},
                "segments": n_seg, "hmt": info,
                "memory_after_segment": [{"segment": i, "entries": min(i + 1, self.memory_entries) if self.memory_entries else 0,
                                          "embedding_norm": round(float(M[0, i].float().norm()), 4)} for i in range(n_seg)]}


def _generate_prepended(model, emb, recalled, max_new: int, eos: set[int], sensory=None):
    t0 = time.perf_counter()
    x = torch.cat(([recalled[:, None]] if recalled is not None else []) + ([sensory] if sensory is not None else []) + [emb], 1)
    out = model(inputs_embeds=x, use_cache=True)
    t1 = time.perf_counter()
    cache, logits, ids = out.past_key_values, out.logits[:, -1], []
    for i in range(max_new):
        nxt = int(logits.argmax(-1)[0])
        ids.append(nxt)
        if nxt in eos or i == max_new - 1:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=x.device), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return ids, ((t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)
