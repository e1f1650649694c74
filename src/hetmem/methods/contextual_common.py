"""What the compressed-contextual-memory methods (memagent, hmt, lact) share.

These methods do not select from a KV cache inside each attention layer: they compress the context
into a memory that the model itself writes and reads (MemAgent's text notes, HMT's memory embeddings,
LaCT's fast weights). They answer through their own runner (``hetmem.runtime.contextual``), which hands
each method a ``ContextRequest`` and a MemoryPipeline whose four steps it drives.

``answering``: whether the method produces answers with the models hetmem loads. LaCT needs a model
trained with its fast-weight layer, which no embedded model has: it is a workload for the profiler and
the planner, not an answer-producing method (``hetmem run --method lact`` refuses in one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hetmem.methods.base import Method
from hetmem.ops import counts as C
from hetmem.ops.counts import OpCount


@dataclass
class ContextRequest:
    """The raw data and target of one contextual-memory run: a loaded model, the context, the question."""

    lm: object  # hetmem.llm.models.LoadedModel
    context: str
    question: str
    max_new_tokens: int = 32
    stats: dict = field(default_factory=lambda: {"llm_calls": 0, "tokens_read": 0, "tokens_prefilled": 0,
                                                 "tokens_written": 0, "prefill_ms": 0.0, "decode_ms": 0.0})


@dataclass
class ContextualMethod(Method):
    family: ClassVar[str] = "contextual-memory"
    answering: ClassVar[bool] = True  # produces answers with the models hetmem loads

    def run(self, request: ContextRequest, pipe) -> dict:
        """Drive the four steps of ``pipe`` over the request; return the method's own record fields
        (``answer`` included) to merge into the run record."""
        raise NotImplementedError


def scaled(ops: list[OpCount], k: float) -> list[OpCount]:
    """The ops of one call, each ``k`` times (e.g. one decoder layer's ops for every layer)."""
    return [OpCount(o.op, o.cls, o.flops * k, o.bytes_read * k, o.bytes_written * k) for o in ops]


def model_dims_of(config) -> dict:
    """Layer count and sizes of a transformers (Llama/Qwen2-like) config, for op counts."""
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size}


def forward_counts(dims: dict, tokens: int, past: int, e: int, logits: int = 1) -> list[OpCount]:
    """Analytic ops of a forward pass of ``tokens`` new tokens after ``past`` cached ones, through every
    layer (dense parts + causal attention), with ``logits`` positions through the LM head."""
    d = dims
    if tokens <= 0:
        return []
    layer = C.dense_layer(tokens, d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], d["intermediate"], e)
    layer.append(C.prefill_attention(1, d["heads"], d["kv_heads"], tokens, past + tokens, d["head_dim"], e))
    return scaled(layer, d["layers"]) + (C.lm_head(logits, d["hidden"], d["vocab"], e) if logits else [])


def decode_counts(dims: dict, n_new: int, past: int, e: int) -> list[OpCount]:
    """Analytic ops of ``n_new`` greedy decode steps after ``past`` tokens (one token per step)."""
    out: list[OpCount] = []
    for i in range(max(0, n_new - 1)):  # the first new token comes from the prefill's logits
        out += forward_counts(dims, 1, past + i, e)
    return out
