"""Deterministic scoring of an answer against a generated sample (RULER's ``string_match_all``, Hsieh et al.,
2024, plus a distractor rule for niah-multikey).

Every task scores the same way, from what its sample carries:

    score = (references found in the answer) / (references)       0 if any distractor is found

A reference is found when it appears as a whole word, case-insensitively (so ``1234567`` is not found in
``12345678``, and ``ABCDE`` not in ``ABCDEF``). For the single-answer tasks (niah-single, niah-grid,
niah-multikey, qa-facts) the score is 0 or 1; for the multi-answer tasks (niah-multivalue,
niah-multiquery, vt, cwe) a partial answer gets partial credit. niah-multikey's distractors are the values
of the other keys: answering with one of them (or with all the numbers) scores 0.
"""

from __future__ import annotations

import re


def found(reference: str, answer: str) -> bool:
    """``reference`` appears in ``answer`` as a whole word (letters/digits not continuing it), any case."""
    ref = reference.strip()
    if not ref:
        return False
    pat = r"(?<![0-9A-Za-z])" + re.escape(ref) + r"(?![0-9A-Za-z])"
    return re.search(pat, answer, flags=re.IGNORECASE) is not None


def score_answer(answer: str, answers: list[str], distractors: list[str] | None = None) -> float:
    """The share of ``answers`` found in ``answer``; 0 if any of ``distractors`` is found."""
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    if any(found(d, answer) for d in distractors or ()):
        return 0.0
    return sum(found(a, answer) for a in answers) / len(answers)


def score_sample(sample, answer: str) -> float:
    """Score ``answer`` for a ``hetmem.tasks.ruler.Sample`` (or its JSON form)."""
    get = sample.get if isinstance(sample, dict) else lambda k: getattr(sample, k)
    return score_answer(answer, list(get("answers")), list(get("distractors") or ()))
