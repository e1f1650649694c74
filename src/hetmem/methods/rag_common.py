"""What the three RAG methods (rag-bm25, rag-dense, rag-hybrid) share.

    raw data   a Corpus of passages (hetmem.rag.corpus)
    Memory     kind "bm25" / "dense" / "hybrid"; ``meta`` holds the BM25 statistics and/or the FAISS index
    Query      the question text (in --active mode: the question plus the sentence just generated)
    Retrieval  TopKPassages: the k best passages, best first (a RankedSelection, which also carries scores)
    Apply      PassagePromptApply: prompt = retrieved passages + question, dropping the lowest-ranked
               passages that do not fit the model's window, then greedy generation with the loaded LM
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.core.timer import StepTimer
from hetmem.llm.generate import generate
from hetmem.llm.prompt import build_prompt_ids, eos_ids
from hetmem.methods.base import Method, get_method, param
from hetmem.rag.corpus import check_passage_params
from hetmem.ops.rank_fusion import topk_ranked


@dataclass
class RankedSelection(Selection):
    """Top-k passage ids best first (``indices``), with the score that ranked each one."""

    scores: np.ndarray | None = None
    rounds: list[int] = field(default_factory=list)  # retrieval round that added each passage (active mode)

    @classmethod
    def of(cls, ids: np.ndarray, scores: np.ndarray, n_units: int, round_no: int = 0) -> "RankedSelection":
        ids = np.asarray(ids, dtype=np.int64)
        return cls(indices=torch.from_numpy(ids.copy()), n_units=n_units, length=n_units,
                   scores=np.asarray(scores, dtype=np.float64), rounds=[round_no] * len(ids))

    @property
    def ids(self) -> list[int]:
        return self.indices.tolist()

    def extended(self, ids, scores, round_no: int) -> "RankedSelection":
        return RankedSelection(
            indices=torch.cat([self.indices, torch.as_tensor(np.asarray(ids, dtype=np.int64))]),
            n_units=self.n_units, length=self.length,
            scores=np.concatenate([self.scores, np.asarray(scores, dtype=np.float64)]),
            rounds=self.rounds + [round_no] * len(ids),
        )


@dataclass
class CandidateScores(Scores):
    """Scores of only some passages (``ids``), best first: what a fused search (FAISS) hands on."""

    ids: np.ndarray | None = None


@register_impl("topk-passages", role="retrieval")
@dataclass
class TopKPassages:
    """Retrieval: the ``k`` best passages, best first (ties to the lower id).

    ``positive_only`` (BM25): a passage scoring 0 shares no term with the query, so it is never retrieved.
    """

    k: int
    positive_only: bool = False
    device: str = "cpu"
    name: str = "topk-passages"

    def select(self, scores: Scores, memory: Memory) -> RankedSelection:
        if isinstance(scores, CandidateScores):  # already ranked by a fused search: cut the list
            vals = scores.values.numpy()
            return RankedSelection.of(scores.ids[: self.k], vals[: self.k], memory.n_units)
        ids, vals = topk_ranked(scores.values.numpy(), self.k)
        if self.positive_only:
            ids, vals = ids[vals > 0], vals[vals > 0]
        return RankedSelection.of(ids, vals, memory.n_units)


# ---------------------------------------------------------------------------------------------- Apply

INSTRUCTION = "Answer the question using the passages below. Answer briefly, in one sentence."


@dataclass
class RagRequest:
    """The Apply target: what to generate, and under what limits."""

    lm: object  # hetmem.llm.models.LoadedModel
    question: str
    max_new_tokens: int
    prefix: str = ""  # the answer generated so far (active mode continues it)
    stop_at_sentence: bool = False
    max_prompt_tokens: int = 0  # 0: the model's window
    progress: bool = False


@dataclass
class RagOutput:
    text: str  # newly generated text (continues ``prefix``)
    used: list[int]  # positions in the selection that made it into the prompt
    dropped: list[int]  # positions dropped because they did not fit, lowest-ranked first
    prompt_tokens: int
    generated: int
    prefill_ms: float
    decode_ms: float
    finished: bool  # end of sequence or token budget reached
    window: int


_STOP_IDS: dict[int, set[int]] = {}


def sentence_stop_ids(tokenizer) -> set[int]:
    """Token ids whose text ends a sentence ('.', '!', '?' at the end, or a newline)."""
    key = id(tokenizer)
    if key not in _STOP_IDS:
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        _STOP_IDS[key] = {i for i, t in enumerate(texts) if "\n" in t or t.rstrip(" ").endswith((".", "!", "?"))}
    return _STOP_IDS[key]


def passage_block(rank: int, passage) -> str:
    head = f"[{rank}] {passage.title} ({passage.source})" if passage.title else f"[{rank}] {passage.source}"
    return f"{head}\n{passage.text.strip()}"


@register_impl("passage-prompt", role="apply")
@dataclass
class PassagePromptApply:
    """Apply: prepend the retrieved passages (best first) to the question and generate.

    The prompt must leave room for the new tokens inside the window (the model's, or ``max_prompt_tokens``);
    passages that do not fit are dropped lowest-ranked first, and the output lists them.
    """

    device: str = "cpu"
    name: str = "passage-prompt-generate"

    def _ids(self, tok, corpus, sel_ids, keep, question, prefix):
        blocks = [passage_block(r + 1, corpus.passages[sel_ids[i]]) for r, i in enumerate(keep)]
        context = INSTRUCTION + "\n\n" + ("\n\n".join(blocks) if blocks else "(no passages)")
        ids = build_prompt_ids(tok, context, f"Question: {question.strip()}")
        if prefix:
            extra = tok(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, extra], dim=1)
        return ids

    def apply(self, raw, selection: RankedSelection, target: RagRequest) -> RagOutput:
        lm, tok = target.lm, target.lm.tokenizer
        window = lm.max_context if target.max_prompt_tokens <= 0 else min(lm.max_context, target.max_prompt_tokens)
        sel_ids = selection.ids if selection is not None else []
        keep = list(range(len(sel_ids)))
        ids = self._ids(tok, raw, sel_ids, keep, target.question, target.prefix)
        limit = window - target.max_new_tokens
        if ids.shape[1] > limit and keep:
            # Estimate each passage's share, drop from the bottom until the estimate fits, then check exactly.
            lens = [len(tok(passage_block(r + 1, raw.passages[i]), add_special_tokens=False)["input_ids"]) + 2
                    for r, i in enumerate(sel_ids)]
            excess = ids.shape[1] - limit
            while keep and excess > 0:
                excess -= lens[keep.pop()]
            ids = self._ids(tok, raw, sel_ids, keep, target.question, target.prefix)
            while ids.shape[1] > limit and keep:
                keep.pop()
                ids = self._ids(tok, raw, sel_ids, keep, target.question, target.prefix)
        if ids.shape[1] > limit:
            raise HetmemError(
                f"the question alone needs {ids.shape[1]} prompt tokens; with {target.max_new_tokens} new tokens "
                f"that exceeds the {window}-token window"
            )
        dropped = list(range(len(keep), len(sel_ids)))
        eos = eos_ids(tok, lm.model)
        stops = eos | (sentence_stop_ids(tok) if target.stop_at_sentence else set())
        # The LM itself runs dense attention: RAG's memory is the corpus, not the KV cache. Its inner
        # per-layer steps are not timed here (the whole generation is this Apply step).
        res = generate(lm.model, ids, get_method("dense"), target.max_new_tokens, eos_token_ids=stops,
                       progress=target.progress, timer=StepTimer(enabled=False))
        out = res.token_ids
        hit_eos = bool(out) and out[-1] in eos
        text = tok.decode(out, skip_special_tokens=True)
        return RagOutput(text, keep, dropped, int(ids.shape[1]), len(out), res.prefill_ms, res.decode_ms,
                         hit_eos or len(out) >= target.max_new_tokens, window)


# --------------------------------------------------------------------------------------------- Method


@dataclass
class RagMethod(Method):
    """Parameters every RAG method has. Subclasses add their Prepare/Relevancy parameters."""

    family: ClassVar[str] = "rag"
    # Parameters fixed by the memory a method builds: a persisted memory must agree on them.
    memory_params: ClassVar[tuple[str, ...]] = ("passage_tokens", "passage_overlap")

    top_k: int = param(8, "passages retrieved per query", low=1)
    passage_tokens: int = param(128, "word tokens per passage", low=1)
    passage_overlap: int = param(32, "tokens shared by neighbouring passages", low=0)
    active: bool = param(False, "FLARE-like active retrieval: re-query after every generated sentence")
    max_rounds: int = param(3, "active mode: re-query rounds at most", low=0)
    new_per_round: int = param(3, "active mode: new passages per round at most", low=1)
    max_prompt_tokens: int = param(0, "prompt + answer token limit (0: the model's window)", low=0)

    def validate(self) -> None:
        if self.top_k < 1:
            raise HetmemError(f"--top-k must be at least 1 (got {self.top_k})")
        check_passage_params(self.passage_tokens, self.passage_overlap)
        if self.max_rounds < 0:
            raise HetmemError(f"--max-rounds must be at least 0 (got {self.max_rounds})")
        if self.new_per_round < 1:
            raise HetmemError(f"--new-per-round must be at least 1 (got {self.new_per_round})")
        if self.max_prompt_tokens < 0:
            raise HetmemError(f"--max-prompt-tokens must be at least 0 (got {self.max_prompt_tokens})")


def log(msg: str) -> None:
    print(f"[hetmem] {msg}", file=sys.stderr, flush=True)
