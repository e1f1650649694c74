"""Scorers, intervals and the sweep's input parsing (no model)."""

from __future__ import annotations

import math

import pytest

from hetmem.errors import HetmemError
from hetmem.eval.scoring import found, score_answer, score_sample
from hetmem.eval.spec import parse_budget, parse_length, parse_method
from hetmem.eval.stats import kendall_tau, ratio_interval, wilson
from hetmem.tasks.ruler import TASKS, make_sample
from hetmem.testing import char_tokenizer


def test_whole_word_any_case():
    assert found("1234567", "The number is 1234567.")
    assert not found("1234567", "The number is 12345678.")
    assert not found("1234567", "91234567")
    assert found("ABCDE", "variables: abcde, FGHIJ")
    assert not found("ABCDE", "ABCDEF")
    assert not found("", "anything")


@pytest.mark.parametrize("task", TASKS)
def test_every_task_scores_right_and_wrong(task):
    s = make_sample(task, char_tokenizer(), 2500, 0, 3)
    right = "Answer: " + ", ".join(s.answers) + "."
    assert score_sample(s, right) == 1.0
    assert score_sample(s.to_json(), right) == 1.0  # the JSON form scores the same
    assert score_sample(s, "I do not know.") == 0.0
    if len(s.answers) > 1:  # partial credit for a partial answer
        half = s.answers[: len(s.answers) // 2]
        assert score_sample(s, " ".join(half)) == pytest.approx(len(half) / len(s.answers))


def test_multikey_distractor_scores_zero():
    s = make_sample("niah-multikey", char_tokenizer(), 1500, 0, 1)
    assert score_sample(s, s.answers[0]) == 1.0
    assert score_sample(s, s.distractors[0]) == 0.0
    assert score_sample(s, " ".join([s.answers[0]] + s.distractors)) == 0.0  # listing every number is not an answer


def test_partial_multivalue():
    assert score_answer("11, 22", ["11", "22", "33", "44"]) == 0.5
    assert score_answer("44 and 11 and 33", ["11", "22", "33", "44"]) == 0.75
    assert score_answer("112", ["11"]) == 0.0
    with pytest.raises(ValueError):
        score_answer("x", [])


def test_wilson_and_ratio():
    lo, hi = wilson(5, 5)
    assert lo == pytest.approx(0.5655, abs=1e-3) and hi == 1.0
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-3)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    r, lo, hi = ratio_interval(5, 5, 5, 5)
    assert r == 1.0 and lo < 1 < hi and lo == pytest.approx(0.5655, abs=1e-3)
    r, lo, hi = ratio_interval(80, 100, 100, 100)
    assert r == pytest.approx(0.8) and lo < 0.8 < hi and hi < 1.0  # a real loss on 100 samples is resolved
    assert all(math.isnan(v) for v in ratio_interval(1, 5, 0, 5))  # dense got nothing: no ratio


def test_kendall():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([1, 2], [5, 5]))


def test_parse_lengths_budgets_methods():
    assert parse_length("4k") == 4096 and parse_length("16K") == 16384 and parse_length("1.5k") == 1536
    assert parse_length("512") == 512
    for bad in ("4x", "0", "100", "1.3"):
        with pytest.raises(HetmemError):
            parse_length(bad)
    assert parse_budget("1/8").resolve(4000) == 500
    assert parse_budget("0.25").resolve(4000) == 1000
    assert parse_budget("512").resolve(4000) == 512
    for bad in ("0", "2/1", "1/0", "lots", "nan", "-1"):
        with pytest.raises(HetmemError):
            parse_budget(bad)
    m = parse_method("seer:page_size=32:threshold=0.1")
    assert m.name == "seer" and m.params == {"page_size": 32, "threshold": 0.1} and m.takes_budget
    assert not parse_method("quest:budget=512").takes_budget  # fixed in the spec: the sweep's budgets do not apply
    assert not parse_method("dense").takes_budget and not parse_method("rag-bm25").takes_budget
    with pytest.raises(HetmemError, match="unknown method"):
        parse_method("nope")
    with pytest.raises(HetmemError, match="not a parameter of method 'quest'"):
        parse_method("quest:threshold=0.1")
    with pytest.raises(HetmemError, match="is not a int"):
        parse_method("quest:page_size=big")
    with pytest.raises(HetmemError, match="--threshold must be between"):
        parse_method("seer:threshold=2")
