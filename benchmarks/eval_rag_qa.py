"""Answer accuracy of RAG with a real model on the invented-facts task (hetmem.tasks.rag_facts).

Generates a corpus of invented facts about invented people in small files (each answer in exactly one
passage), builds each method's memory once, loads the model once, asks every question and counts an
answer correct when it contains the expected value. Prints recall@k of retrieval too, so a wrong answer
can be told apart: retrieval missed it, or the model misread it. Times are measured wall time.

    .venv/bin/python benchmarks/eval_rag_qa.py [--model qwen2.5-coder-0.5b] [--methods rag-hybrid]
                                               [--questions 20] [--files 300] [--top-k 8]

Appends its record to benchmarks/results/eval_rag_qa.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the embedded default model (Qwen2.5-Coder-0.5B)")
    ap.add_argument("--methods", default="rag-hybrid", help="comma-separated: rag-bm25, rag-dense, rag-hybrid")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--min-accuracy", type=float, default=0.5, help="exit 1 below this (default 0.5: 'most')")
    args = ap.parse_args()
    from _record import Record

    record = Record().setting(**vars(args))

    from hetmem.tasks.rag_facts import generate_fact_corpus
    from hetmem.llm.models import load_model
    from hetmem.methods import get_method
    from hetmem.rag.corpus import load_corpus
    from hetmem.runtime.rag import RagSession

    td = tempfile.mkdtemp(prefix="hetmem-rag-eval-")
    qs = generate_fact_corpus(td, n_files=args.files, n_questions=args.questions, seed=args.seed)
    corpus = load_corpus(td)
    lm = load_model(args.model)
    record.setting(model_name=lm.name, dtype=str(lm.model.dtype).replace("torch.", ""))
    ok_all = True
    for name in args.methods.split(","):
        session = RagSession.build(get_method(name, top_k=args.top_k), corpus)
        right = found = 0
        rows = []
        t0 = time.perf_counter()
        for i, q in enumerate(qs):
            rec = session.answer(lm, q.question, args.max_new_tokens, progress=False)
            hit = q.passage_id in [r["id"] for r in rec["retrieved"] if r["in_prompt"]]
            good = q.answer.lower() in rec["answer"].lower()
            right += good
            found += hit
            rows.append({"right": bool(good), "retrieved": bool(hit), "prompt_tokens": rec["tokens"]["prompt"],
                         "expected": q.answer, "answer": rec["answer"]})
            print(f"{name} q{i:02d} {'RIGHT' if good else 'wrong'} retrieved={'yes' if hit else 'NO '} "
                  f"prompt={rec['tokens']['prompt']:>5} expected={q.answer!r:<15} answer={rec['answer'][:70]!r}",
                  flush=True)
        secs = time.perf_counter() - t0
        acc = right / len(qs)
        ok_all &= acc >= args.min_accuracy
        print(f"{name}: model {lm.name}, top-k {args.top_k}: accuracy {right}/{len(qs)} = {acc:.0%}, "
              f"recall@{args.top_k} (in prompt) {found}/{len(qs)}; {secs / len(qs):.1f} s/question (measured)",
              flush=True)
        record.figure(f"{name}.right", right, "questions").figure(f"{name}.questions", len(qs), "questions")
        record.figure(f"{name}.in_prompt", found, "questions", note=f"answer passage among the top-{args.top_k} in the prompt")
        record.figure(f"{name}.s_per_question", round(secs / len(qs), 2), "s/question")
        record.detail(name, rows)
    record.write(ok_all)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
