"""``memagent``: the model reads the context chunk by chunk and rewrites a bounded text memory (MemAgent).

Yu et al., 2025, "MemAgent: Reshaping Long-Context LLM with Multi-Conv RL-based Memory Agent",
arXiv 2507.02259. The prompts below follow the paper's templates in spirit (question first, then the
previous memory and one section, then "write the updated memory"); the wording is hetmem's own.

    Prepare    the context tokenised and split into chunks; the fixed prompt prefix (instructions +
               question) prefilled once into a KV cache                                    (llm.generate.prefill)
    Relevancy  the model reads question, current memory and one chunk: a copy of the prefix KV,
               then prefill of (memory + chunk + closing instruction) only              (llm.generate.fork_cache)
    Retrieval  it writes the new memory: greedy, at most ``memory_tokens`` tokens; it overwrites the old
    Apply      the answer from the question and the final memory alone

``--chunk-tokens`` is what the model reads per call: the prompt, the question, the memory (at most
``--memory-tokens``) and a context chunk, which gets what is left. A chunk size that leaves no room for
context is an error naming the smallest that works. Works with any model hetmem loads (with or without a
chat template); an instruct model writes useful memories.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.llm.generate import fork_cache, greedy_continue, prefill
from hetmem.llm.prompt import eos_ids
from hetmem.methods.base import param, register
from hetmem.methods.contextual_common import (ContextRequest, ContextualMethod, decode_counts, forward_counts,
                                              model_dims_of)

READ_INTRO = ("You are given a question, your memory so far and the next section of a long document. Update the "
              "memory with the information from the section that is relevant to the question, and keep what in "
              "the previous memory still matters. The memory is all you will have when you answer.\n\n")
READ_MEMORY = "Previous memory:\n"
NO_MEMORY = "(empty)"
READ_SECTION = "\n\nSection:\n"
READ_CLOSE = ("\n\nQuestion: {question}\nIf the section holds information that answers the question, copy those "
              "sentences exactly, together with the relevant facts of the previous memory. Otherwise write the "
              "previous memory unchanged. Write only the updated memory.")
ANSWER_INTRO = "Answer the question from your memory of a long document.\n\nMemory:\n"
ANSWER_CLOSE = "\n\nAnswer briefly."
SENTINEL = "\u2063HETMEM_SLOT\u2063"


@dataclass
class TextMemory:
    """MemAgent's memory: the token ids the model wrote (at most ``bound``), and their text."""

    ids: list[int]
    text: str
    bound: int


def _template(tok) -> tuple[list[int], list[int]]:
    """Token ids before and after the user message in the model's prompt format."""
    if getattr(tok, "chat_template", None):
        full = tok.apply_chat_template([{"role": "user", "content": SENTINEL}], add_generation_prompt=True,
                                       tokenize=False)
        head, tail = full.split(SENTINEL)
        return _enc(tok, head), _enc(tok, tail)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos, _enc(tok, "\nAnswer:")


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass
class PromptParts:
    prefix: list[int]  # fixed for every chunk: its KV is computed once
    memory_label: list[int]
    empty: list[int]
    section_label: list[int]
    close: list[int]  # closing instruction + the template's tail

    @property
    def overhead(self) -> int:
        return len(self.prefix) + len(self.memory_label) + len(self.section_label) + len(self.close)


def prompt_parts(tok, question: str) -> PromptParts:
    head, tail = _template(tok)
    return PromptParts(head + _enc(tok, f"{READ_INTRO}Question: {question.strip()}\n\n"), _enc(tok, READ_MEMORY),
                       _enc(tok, NO_MEMORY), _enc(tok, READ_SECTION), _enc(tok, READ_CLOSE.format(question=question.strip())) + tail)


def chunk_room(chunk_tokens: int, memory_tokens: int, parts: PromptParts) -> int:
    """Context tokens per chunk; an error naming the smallest --chunk-tokens when none are left."""
    room = chunk_tokens - parts.overhead - max(memory_tokens, len(parts.empty))
    if room < 1:
        need = parts.overhead + max(memory_tokens, len(parts.empty)) + 1
        raise HetmemError(f"memagent: --chunk-tokens {chunk_tokens} cannot hold the prompt ({parts.overhead} tokens) "
                          f"plus the memory ({memory_tokens}) and any context: the smallest that works is {need}")
    return room


def _timed_call(stats: dict, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    stats[key] += (time.perf_counter() - t0) * 1e3
    return out


@register_impl("memagent-chunks", role="prepare")
@dataclass
class ChunkPrepare:
    """Prepare: raw = ContextRequest -> Memory(kind="text") with the chunks and the prefilled prompt prefix."""

    chunk_tokens: int
    memory_tokens: int
    device: str = "cpu"
    name: str = "chunk-and-prefill-prefix"

    def prepare(self, raw: ContextRequest, memory: Memory | None = None) -> Memory:
        tok, model = raw.lm.tokenizer, raw.lm.model
        parts = prompt_parts(tok, raw.question)
        room = chunk_room(self.chunk_tokens, self.memory_tokens, parts)
        window = raw.lm.max_context
        if self.chunk_tokens + self.memory_tokens > window:
            raise HetmemError(f"memagent: --chunk-tokens {self.chunk_tokens} + --memory-tokens {self.memory_tokens} "
                              f"exceed {raw.lm.name}'s {window}-token window")
        ids = _enc(tok, raw.context.strip())
        chunks = [ids[i : i + room] for i in range(0, len(ids), room)] or [[]]
        cache, _ = _timed_call(raw.stats, "prefill_ms", lambda: prefill(model, torch.tensor([parts.prefix])))
        raw.stats["tokens_prefilled"] += len(parts.prefix)
        return Memory(kind="text", n_units=len(chunks), unit_size=room,
                      meta={"chunks": chunks, "parts": parts, "prefix_cache": cache, "cursor": 0,
                            "memory": TextMemory([], "", self.memory_tokens), "history": [], "context_tokens": len(ids)})

    def op_counts(self, raw: ContextRequest, memory=None):
        parts = prompt_parts(raw.lm.tokenizer, raw.question)
        e = next(raw.lm.model.parameters()).element_size()
        return {"prepare": forward_counts(model_dims_of(raw.lm.model.config), len(parts.prefix), 0, e)}


@dataclass
class ReadState(Scores):
    """What reading one chunk leaves: the KV cache after (prefix + memory + chunk), and the next-token logits."""

    cache: object = None
    read_tokens: int = 0


def _suffix(memory: Memory) -> list[int]:
    p: PromptParts = memory.meta["parts"]
    mem = memory.meta["memory"].ids or p.empty
    return p.memory_label + mem + p.section_label + memory.meta["chunks"][memory.meta["cursor"]] + p.close


@register_impl("memagent-read", role="relevancy")
@dataclass
class ReadChunkRelevancy:
    """Relevancy: the model reads question + current memory + the next chunk (prefix KV reused, not recomputed)."""

    lm: object
    device: str = "cpu"
    name: str = "read-chunk"
    stats: dict = field(default_factory=dict)

    def score(self, memory: Memory, query: Query) -> ReadState:
        model = self.lm.model
        p: PromptParts = memory.meta["parts"]
        suffix = _suffix(memory)
        reserve = len(p.prefix) + len(suffix) + memory.meta["memory"].bound + 1

        def run():
            cache = fork_cache(model, memory.meta["prefix_cache"], reserve)
            return prefill(model, torch.tensor([suffix]), cache)

        cache, logits = _timed_call(self.stats, "prefill_ms", run)
        self.stats["llm_calls"] += 1
        self.stats["tokens_read"] += len(p.prefix) + len(suffix)
        self.stats["tokens_prefilled"] += len(suffix)
        return ReadState(logits, cache=cache, read_tokens=len(p.prefix) + len(suffix))

    def op_counts(self, memory: Memory, query: Query):
        e = next(self.lm.model.parameters()).element_size()
        n = len(memory.meta["parts"].prefix)
        return {"relevancy": forward_counts(model_dims_of(self.lm.model.config), len(_suffix(memory)), n, e)}


@register_impl("memagent-write", role="retrieval")
@dataclass
class WriteMemoryRetrieval:
    """Retrieval: the model writes the new memory (greedy, at most ``memory_tokens``); it overwrites the old."""

    lm: object
    memory_tokens: int
    device: str = "cpu"
    name: str = "write-memory"
    stats: dict = field(default_factory=dict)

    def select(self, scores: ReadState, memory: Memory) -> TextMemory:
        model, tok = self.lm.model, self.lm.tokenizer
        eos = eos_ids(tok, model)
        out = _timed_call(self.stats, "decode_ms",
                          lambda: greedy_continue(model, scores.cache, scores.values, self.memory_tokens, eos))
        ids = [t for t in out if t not in eos][: self.memory_tokens]
        self.stats["tokens_written"] += len(out)
        mem = TextMemory(ids, tok.decode(ids, skip_special_tokens=True).strip(), self.memory_tokens)
        memory.meta["memory"] = mem
        memory.meta["history"].append({"chunk": memory.meta["cursor"], "read_tokens": scores.read_tokens,
                                       "memory_tokens": len(ids), "memory": mem.text})
        memory.meta["cursor"] += 1
        scores.cache = None  # the chunk's KV is not kept: the memory is all that carries over
        return mem

    def op_counts(self, scores: ReadState, memory: Memory):
        e = next(self.lm.model.parameters()).element_size()
        return {"retrieval": decode_counts(model_dims_of(self.lm.model.config), self.memory_tokens, scores.read_tokens, e)}


def answer_ids(tok, question: str, memory: TextMemory) -> list[int]:
    head, tail = _template(tok)
    return (head + _enc(tok, ANSWER_INTRO) + (memory.ids or _enc(tok, NO_MEMORY))
            + _enc(tok, f"\n\nQuestion: {question.strip()}{ANSWER_CLOSE}") + tail)


@register_impl("memagent-answer", role="apply")
@dataclass
class AnswerFromMemoryApply:
    """Apply: answer from the question and the final memory alone (the context is not in this prompt)."""

    device: str = "cpu"
    name: str = "answer-from-memory"

    def apply(self, raw: ContextRequest, selection: TextMemory, target: ContextRequest) -> dict:
        lm = target.lm
        ids = answer_ids(lm.tokenizer, target.question, selection)
        if len(ids) + target.max_new_tokens > lm.max_context:
            raise HetmemError(f"memagent: the answer prompt ({len(ids)} tokens) with {target.max_new_tokens} new tokens "
                              f"exceeds {lm.name}'s {lm.max_context}-token window")
        st = target.stats
        cache, logits = _timed_call(st, "prefill_ms", lambda: prefill(lm.model, torch.tensor([ids])))
        eos = eos_ids(lm.tokenizer, lm.model)
        out = _timed_call(st, "decode_ms", lambda: greedy_continue(lm.model, cache, logits, target.max_new_tokens, eos))
        st["llm_calls"] += 1
        st["tokens_read"] += len(ids)
        st["tokens_prefilled"] += len(ids)
        st["tokens_written"] += len(out)
        return {"answer": lm.tokenizer.decode(out, skip_special_tokens=True).strip(), "prompt_tokens": len(ids),
                "generated": len(out)}

    def op_counts(self, raw: ContextRequest, selection: TextMemory, target: ContextRequest):
        lm = target.lm
        n = len(answer_ids(lm.tokenizer, target.question, selection))
        e = next(lm.model.parameters()).element_size()
        dims = model_dims_of(lm.model.config)
        return {"apply": forward_counts(dims, n, 0, e) + decode_counts(dims, target.max_new_tokens, n, e)}


@register
@dataclass
class MemAgent(ContextualMethod):
    name = "memagent"
    summary = "reads the context chunk by chunk, rewriting a bounded text memory; answers from it (MemAgent)"

    chunk_tokens: int = param(1024, "tokens the model reads per call: prompt + question + memory + a context chunk",
                              low=16)
    memory_tokens: int = param(256, "the memory's bound in tokens (each rewrite overwrites the old)", low=8)

    def pipeline(self, device, timer, layer_idx: int = 0, lm=None, stats=None):
        stats = stats if stats is not None else {}
        return MemoryPipeline(
            ChunkPrepare(self.chunk_tokens, self.memory_tokens, device),
            ReadChunkRelevancy(lm, device, stats=stats),
            WriteMemoryRetrieval(lm, self.memory_tokens, device, stats=stats),
            AnswerFromMemoryApply(device),
            timer,
        )

    def run(self, request: ContextRequest, pipe) -> dict:
        timer = pipe.timer
        timer.phase = "memory"
        memory = pipe.build(request)
        query = Query(text=request.question)
        mem = memory.meta["memory"]
        for _ in range(memory.n_units):
            mem = pipe.select(memory, query)
        timer.phase = "answer"
        with timer.step("apply", pipe.apply.device):
            out = pipe.apply.apply(request, mem, request)
        return {"answer": out["answer"], "tokens": {"prompt": out["prompt_tokens"], "generated": out["generated"],
                                                     "context": memory.meta["context_tokens"]},
                "chunks": memory.n_units, "chunk_context_tokens": memory.unit_size,
                "prefix_tokens": len(memory.meta["parts"].prefix), "memory_after_chunk": memory.meta["history"],
                "final_memory": {"text": mem.text, "tokens": len(mem.ids)}}
