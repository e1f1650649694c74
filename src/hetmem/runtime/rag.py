"""Answering questions with a RAG method: one record per question (what ``hetmem run --json`` prints).

Plain mode: Relevancy + Retrieval for the question, then Apply (prompt + generate).
Active mode (FLARE/DRAGIN-like): generate one sentence at a time; after each sentence, query again with
that sentence plus the question, add up to ``new_per_round`` passages not already retrieved, and continue
the answer with the enlarged prompt. At most ``max_rounds`` such rounds; the last part is generated to the
end. ``retrievals`` counts every Relevancy + Retrieval pass.
"""

from __future__ import annotations

import dataclasses
import time

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Query
from hetmem.methods.rag_common import RagOutput, RagRequest, RankedSelection, log
from hetmem.core.timer import StepTimer
from hetmem.rag.corpus import Corpus
from hetmem.runtime.rag_shards import LocalShards, sharded_info, sharded_pipeline


@dataclasses.dataclass
class RagSession:
    """A method with its prepared memory: build (or load) once, answer many questions."""

    method: object
    corpus: Corpus
    memory: object
    device: str = "cpu"
    build_steps: dict | None = None  # StepTimer.summary() of the build (None when loaded from disk)
    memory_info: dict = dataclasses.field(default_factory=dict)
    shards: object = None  # a sharded memory's shards (rag_shards.LocalShards | NodeShards); in-process by default

    def __post_init__(self):
        if self.memory is not None and "sharded" in self.memory.meta:
            if self.shards is None:
                self.shards = LocalShards(self.memory)
            self.memory_info = {**self.memory_info, "sharded": sharded_info(self.memory, self.shards)}

    def _pipeline(self, method, timer: StepTimer) -> MemoryPipeline:
        pipe = method.pipeline(self.device, timer)
        return pipe if self.shards is None else sharded_pipeline(pipe, self.shards)

    @classmethod
    def build(cls, method, corpus: Corpus, device: str = "cpu") -> "RagSession":
        timer = StepTimer()
        timer.phase = "build"
        pipe = method.pipeline(device, timer)
        t0 = time.perf_counter()
        memory = pipe.build(corpus)
        ms = (time.perf_counter() - t0) * 1e3
        info = {"source": "built", "corpus": corpus.path, "passages": len(corpus), "build_ms": round(ms, 3)}
        return cls(method, corpus, memory, device, timer.summary(), info)

    def _pipelines(self, timer: StepTimer) -> tuple[MemoryPipeline, MemoryPipeline]:
        pipe = self._pipeline(self.method, timer)
        m = self.method
        if not m.active:
            return pipe, pipe
        # Re-queries look deeper so that up to new_per_round passages not yet used can be found.
        deeper = {"top_k": m.top_k + m.max_rounds * m.new_per_round}
        if hasattr(m, "candidates"):
            deeper["candidates"] = max(m.candidates, deeper["top_k"])
        return pipe, self._pipeline(dataclasses.replace(m, **deeper), timer)

    def _apply(self, pipe: MemoryPipeline, sel: RankedSelection, req: RagRequest) -> RagOutput:
        with pipe.timer.step("apply", pipe.apply.device):
            return pipe.apply.apply(self.corpus, sel, req)

    def answer(self, lm, question: str, max_new_tokens: int = 32, progress: bool = True) -> dict:
        m = self.method
        t0 = time.perf_counter()
        timer = StepTimer()
        timer.phase = "query"
        pipe, requery = self._pipelines(timer)
        sel = pipe.select(self.memory, Query(text=question))
        retrievals = 1
        rounds = []
        req = RagRequest(lm, question, max_new_tokens, max_prompt_tokens=m.max_prompt_tokens, progress=progress)
        if not m.active:
            out = self._apply(pipe, sel, req)
            answer, outs = out.text, [out]
        else:
            answer, outs = "", []
            for r in range(m.max_rounds + 1):
                remaining = max_new_tokens - sum(o.generated for o in outs)
                req = dataclasses.replace(req, max_new_tokens=remaining, prefix=answer, stop_at_sentence=r < m.max_rounds)
                out = self._apply(pipe, sel, req)
                outs.append(out)
                answer += out.text
                if out.finished or r == m.max_rounds or out.generated >= remaining:
                    break
                sentence = out.text.strip()
                if not sentence:
                    continue
                again = requery.select(self.memory, Query(text=f"{question} {sentence}"))
                retrievals += 1
                have = set(sel.ids)
                new = [(i, s) for i, s in zip(again.ids, again.scores) if i not in have][: m.new_per_round]
                if new:
                    sel = sel.extended([i for i, _ in new], [s for _, s in new], round_no=r + 1)
                rounds.append({"round": r + 1, "query": sentence, "added": [self.corpus.passages[i].id for i, _ in new]})
        last = outs[-1]
        dropped = [sel.ids[j] for j in last.dropped]
        if dropped:
            log(f"dropped {len(dropped)} lowest-ranked of {len(sel.ids)} retrieved passages: they did not fit the "
                f"{last.window}-token window with {max_new_tokens} new tokens ({', '.join(self.corpus.passages[i].id for i in dropped)})")
        steps = timer.summary()
        if self.build_steps is not None:
            steps["prepare"] = self.build_steps["prepare"]
        p0 = next(lm.model.parameters())
        return {
            "answer": answer.strip(),
            "question": question,
            "method": m.name,
            "params": m.params(),
            "model": lm.name,
            "device": str(p0.device),
            "dtype": str(p0.dtype).replace("torch.", ""),
            "time_source": "measured",
            "total_ms": round((time.perf_counter() - t0) * 1e3, 3),
            "prefill_ms": round(sum(o.prefill_ms for o in outs), 3),
            "decode_ms": round(sum(o.decode_ms for o in outs), 3),
            "tokens": {"prompt": last.prompt_tokens, "generated": sum(o.generated for o in outs), "window": last.window},
            "steps": steps,
            "retrieved": [
                {"id": self.corpus.passages[i].id, "source": self.corpus.passages[i].source,
                 "score": round(float(s), 6), "rank": j + 1, "round": rd, "in_prompt": j in set(last.used)}
                for j, (i, s, rd) in enumerate(zip(sel.ids, sel.scores, sel.rounds))
            ],
            "dropped": [{"id": self.corpus.passages[i].id, "source": self.corpus.passages[i].source} for i in dropped],
            "retrievals": retrievals,
            "active": bool(m.active),
            **({"rounds": rounds} if m.active else {}),
            "memory": self.memory_info,
        }

    def retrieve(self, question: str, k: int | None = None) -> list[int]:
        """Passage indices retrieved for ``question`` (best first), without generating: for recall tests."""
        m = self.method if k is None else dataclasses.replace(self.method, top_k=k, **(
            {"candidates": max(k, self.method.candidates)} if hasattr(self.method, "candidates") else {}))
        return self._pipeline(m, StepTimer(enabled=False)).select(self.memory, Query(text=question)).ids
