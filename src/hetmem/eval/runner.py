"""The eval sweep: every (task, length, sample) context, answered by every (method, budget), one JSONL line each.

Methods come only from the registry (``MethodSpec.build`` -> ``hetmem.methods.get_method``); a sweep budget
goes to a method's ``budget`` parameter when it declares one (the others run once per context, budget "-").
What differs by family is only how a context reaches the method, and that is decided by the interfaces:

- in-model methods (sparse attention, compressed KV, the dense baseline): one dense prefill per context is
  shared (``hetmem.llm.generate.prefill``); each method gets a copy of its KV, over which its own Prepare runs,
  and decodes from there. Methods for which that would differ from their own prefill
  (``prefill_unshareable``: Prepare steps that observe the prefill's queries, own cache layers) prefill
  again, and their line says so (``prefill: "own"`` and ``prefill_note``);
- RAG methods (family ``rag``): the context is their corpus (``hetmem.runtime.rag.RagSession``).

The results file is appended one flushed, fsynced line at a time, so an interrupted sweep resumes where it
stopped: finished lines (answered or skipped) are not run again.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError
from hetmem.eval.scoring import score_sample
from hetmem.eval.spec import Budget, MethodSpec
from hetmem.files import write_atomic
from hetmem.llm.generate import generate, prefill_once, prefill_unshareable, shared_prefill_mode
from hetmem.llm.prompt import build_prompt_ids, eos_ids
from hetmem.methods.shared import model_dims
from hetmem.rag.corpus import Corpus, Document, split_passages
from hetmem.runtime.contextual import answer_contextual
from hetmem.runtime.rag import RagSession

# Families that read the context through their own runner, not through a prefilled KV cache.
OWN_RUNNER = ("rag", "contextual-memory")
from hetmem.tasks.ruler import make_sample

RESULTS = "results.jsonl"
RUNS = "runs.jsonl"
KEY = ("task", "length", "sample", "method", "budget")
NO_BUDGET = "-"  # the method has no budget parameter (or fixes it in its spec)
DEFAULT_BUDGET = "default"  # no --budgets given: the method's own default


@dataclass
class EvalPlan:
    tasks: list[str]
    lengths: list[tuple[str, int]]  # (label as given, tokens)
    methods: list[MethodSpec]
    budgets: list[Budget] = field(default_factory=list)
    samples: int = 5
    seed: int = 0
    share_prefill: bool = True

    def arms(self) -> list[tuple[MethodSpec, Budget | None, str]]:
        """(method, budget, budget label) in sweep order."""
        out = []
        for m in self.methods:
            if m.takes_budget and self.budgets:
                out += [(m, b, b.label) for b in self.budgets]
            else:
                out.append((m, None, DEFAULT_BUDGET if m.takes_budget else NO_BUDGET))
        return out

    def keys(self) -> list[tuple]:
        return [(t, ll, i, m.label, bl) for t in self.tasks for ll, _ in self.lengths for i in range(self.samples)
                for m, _, bl in self.arms()]


def line_key(line: dict) -> tuple:
    return tuple(line[k] for k in KEY)


class ResultsFile:
    """``results.jsonl``: read once (a torn last line from a crash is dropped), then appended line by line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lines: list[dict] = []
        if self.path.exists():
            raw = self.path.read_text(encoding="utf-8")
            good, torn = [], False
            for n, text in enumerate(raw.splitlines(keepends=True), start=1):
                try:
                    obj = json.loads(text)
                    if not text.endswith("\n") or not isinstance(obj, dict) or any(k not in obj for k in KEY):
                        raise ValueError
                except ValueError:
                    torn = True
                    print(f"hetmem: note: {self.path} line {n} is incomplete (an interrupted write): dropped",
                          file=sys.stderr)
                    continue
                good.append(text)
                self.lines.append(obj)
            if torn:
                write_atomic(self.path, "".join(good))
        self.done = {line_key(x) for x in self.lines}

    def check_compatible(self, model: str, seed: int) -> None:
        for x in self.lines:
            if x.get("model") != model or x.get("base_seed") != seed:
                raise HetmemError(f"{self.path} holds results for model '{x.get('model')}' with --seed "
                                  f"{x.get('base_seed')}; resume with those, or give another --out")

    def append(self, line: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.lines.append(line)
        self.done.add(line_key(line))


def append_run(out: Path, info: dict) -> None:
    with open(out / RUNS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(info) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def kv_bytes_per_token(model) -> int:
    n_layers, n_kv, d = model_dims(model)
    return 2 * n_layers * n_kv * d * next(model.parameters()).element_size()


def _rag_corpus(context: str, method) -> Corpus:
    passages = split_passages(Document("context", context), method.passage_tokens, method.passage_overlap)
    return Corpus(passages, "the generated context", 1, method.passage_tokens, method.passage_overlap)


class Sweep:
    def __init__(self, plan: EvalPlan, lm, out: Path, run_id: str | None = None, progress: bool = True):
        self.plan, self.lm, self.out = plan, lm, Path(out)
        self.results = ResultsFile(self.out / RESULTS)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.progress = progress
        p0 = next(lm.model.parameters())
        self.device, self.dtype = str(p0.device), str(p0.dtype).replace("torch.", "")
        self.eos = eos_ids(lm.tokenizer, lm.model)

    def pending(self) -> int:
        return sum(k not in self.results.done for k in self.plan.keys())

    def run(self) -> int:
        """Run every pending line; returns how many were run now."""
        plan, total = self.plan, len(self.plan.keys())
        todo = self.pending()
        bar = tqdm(total=total, initial=total - todo, desc="eval", unit="line", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        ran = 0
        try:
            for task in plan.tasks:
                for length, n_tokens in plan.lengths:
                    for i in range(plan.samples):
                        arms = [a for a in plan.arms() if (task, length, i, a[0].label, a[2]) not in self.results.done]
                        if not arms:
                            continue
                        bar.set_postfix_str(f"{task} {length} #{i}", refresh=True)
                        for line in self._context(task, length, n_tokens, i, arms):
                            self.results.append(line)
                            ran += 1
                            bar.update(1)
        finally:
            bar.close()
        return ran

    # -- one context, every pending (method, budget) -------------------------------------------------
    def _base(self, task, length, n_tokens, i, spec: MethodSpec, blabel: str) -> dict:
        return {"task": task, "length": length, "sample": i, "method": spec.label, "budget": blabel,
                "n_tokens": n_tokens, "method_name": spec.name, "family": spec.family, "model": self.lm.name,
                "base_seed": self.plan.seed, "device": self.device, "dtype": self.dtype, "run_id": self.run_id}

    def _context(self, task, length, n_tokens, i, arms):
        tok = self.lm.tokenizer
        try:
            sample = make_sample(task, tok, n_tokens, i, self.plan.samples, self.plan.seed)
        except HetmemError as exc:
            for spec, _, bl in arms:
                yield {**self._base(task, length, n_tokens, i, spec, bl), "status": "skipped",
                       "reason": f"no sample: {exc}"}
            return
        ids = build_prompt_ids(tok, sample.context, sample.question)
        n_prompt = ids.shape[1]
        facts = {"seed": sample.seed, "depth": sample.depth, "context_tokens": sample.context_tokens,
                 "prompt_tokens": n_prompt, "expected": sample.answers, "distractors": sample.distractors,
                 "max_new_tokens": sample.max_new_tokens}
        too_long = n_prompt + sample.max_new_tokens > self.lm.max_context
        built = []
        for spec, budget, bl in arms:
            base = {**self._base(task, length, n_tokens, i, spec, bl), **facts}
            try:
                btok = budget.resolve(n_prompt) if budget is not None else None
                method = spec.build(btok)
                if btok is not None:
                    base["budget_tokens"] = btok
            except HetmemError as exc:
                built.append((base, None, f"cannot build the method: {exc}"))
                continue
            if too_long and spec.family not in OWN_RUNNER:
                built.append((base, None, f"the prompt ({n_prompt} tokens) + {sample.max_new_tokens} new tokens do "
                                          f"not fit {self.lm.name}'s {self.lm.max_context}-token window"))
                continue
            built.append((base, method, None))
        share, modes = {}, {}  # share: None (shares the prefill) or why not; modes: how it shares
        for base, method, why in built:
            if method is not None and method.family not in OWN_RUNNER:
                try:
                    if not self.plan.share_prefill:
                        share[id(method)] = "--no-shared-prefill"
                        continue
                    modes[id(method)] = shared_prefill_mode(method, self.lm.model)
                    share[id(method)] = None if modes[id(method)] else prefill_unshareable(method, self.lm.model)
                except HetmemError as exc:
                    share[id(method)] = exc
        shared = None
        for base, method, why in built:
            if why is None and isinstance(share.get(id(method)), HetmemError):
                why = f"cannot run: {share[id(method)]}"
            if why is not None:
                yield {**base, "status": "skipped", "reason": why}
                continue
            base["params"] = method.params()
            base["notes"] = method.notes()
            try:
                if method.family == "rag":
                    out = self._rag(method, sample)
                elif method.family == "contextual-memory":
                    out = self._contextual(method, sample)
                else:
                    reason = share[id(method)]
                    if reason is None and shared is None:
                        hidden = any(getattr(m, "needs_hidden", False) for _, m, w in built
                                     if m is not None and w is None and share.get(id(m)) is None)
                        shared = prefill_once(self.lm.model, ids, keep_hidden=hidden, progress=False)
                    out = self._in_model(method, ids, sample, shared if reason is None else None, reason)
                    if reason is None:
                        out["shared_prefill"] = modes[id(method)]
            except (HetmemError, RuntimeError, ValueError) as exc:  # recorded; the sweep goes on
                yield {**base, "status": "skipped", "reason": f"failed: {type(exc).__name__}: {exc}"}
                continue
            out["score"] = score_sample(sample, out["answer"])
            out["correct"] = out["score"] == 1.0
            yield {**base, "status": "ok", **out}

    def _in_model(self, method, ids, sample, shared, own_reason) -> dict:
        res = generate(self.lm.model, ids, method, sample.max_new_tokens, eos_token_ids=self.eos, progress=False,
                       recall=True, timer=StepTimer(enabled=False), prefilled=shared)
        steps = max(1, len(res.token_ids) - 1)  # the first token comes from the prefill's logits
        out = {
            "answer": self.lm.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip(),
            "time_source": "measured",
            "prefill": "shared" if shared is not None else "own",
            "prefill_ms": round(shared.prefill_ms if shared is not None else res.prefill_ms, 3),
            "kv_load_ms": round(res.prefill_ms, 3) if shared is not None else None,
            "decode_ms": round(res.decode_ms, 3),
            "generated_tokens": len(res.token_ids),
            "decode_ms_per_token": round(res.decode_ms / steps, 3),
            "kv_bytes": res.memory.get("kv_bytes"),
            "kv_bytes_source": "measured: bytes allocated for K/V at the end of decoding",
            "attention_mass_recall": (res.recall or {}).get("attention_mass_recall"),
            "recall_measure_ms": round(res.measurement_ms, 3),
        }
        if shared is None:
            out["prefill_note"] = own_reason
        return out

    def _contextual(self, method, sample) -> dict:
        """Compressed contextual memory (memagent, hmt, ...): the method reads the context through its own runner."""
        rec = answer_contextual(self.lm, method, sample.context, sample.question, sample.max_new_tokens,
                                step_timing=False)
        gen = rec["tokens"]["generated"]
        return {
            "answer": rec["answer"],
            "time_source": "measured",
            "prefill": "contextual",
            "prefill_ms": rec.get("prefill_ms"),
            "decode_ms": rec.get("decode_ms"),
            "generated_tokens": gen,
            "decode_ms_per_token": round(rec["decode_ms"] / max(1, gen - 1), 3) if rec.get("decode_ms") else None,
            "kv_bytes": None,
            "kv_bytes_source": "not measured for contextual memory (its memory is text or embeddings)",
            "attention_mass_recall": None,
        }

    def _rag(self, method, sample) -> dict:
        session = RagSession.build(method, _rag_corpus(sample.context, method), self.device)
        rec = session.answer(self.lm, sample.question, sample.max_new_tokens, progress=False)
        gen = rec["tokens"]["generated"]
        return {
            "answer": rec["answer"],
            "time_source": "measured",
            "prefill": "rag",
            "prefill_ms": rec["prefill_ms"],
            "prepare_ms": session.memory_info.get("build_ms"),
            "decode_ms": rec["decode_ms"],
            "generated_tokens": gen,
            "decode_ms_per_token": round(rec["decode_ms"] / max(1, gen - 1), 3),
            "rag_prompt_tokens": rec["tokens"]["prompt"],
            "passages": session.memory_info.get("passages"),
            "kv_bytes": (rec["tokens"]["prompt"] + gen) * kv_bytes_per_token(self.lm.model),
            "kv_bytes_source": "computed: (RAG prompt + generated tokens) x K/V bytes per token",
            "attention_mass_recall": None,
        }


