"""The RULER-like generators (hetmem.tasks.ruler): deterministic for a seed, exact in length, and each sample
really contains what its answer says (checked by reading the generated text back, not by trusting the generator)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from hetmem.tasks.ruler import TASKS, grid_depth, make_sample
from hetmem.testing import char_tokenizer


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small BPE tokenizer trained here on essay text: tokens span several characters, so exact lengths need
    the generators' correction (the char tokenizer alone would not show that)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from hetmem.tasks.ruler import essays

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = essays()[:200_000]
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)],
                           trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _len(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("which", ["char", "bpe"])
def test_deterministic_and_exact_length(task, which, bpe_tokenizer):
    tok = char_tokenizer() if which == "char" else bpe_tokenizer
    n = 1200 if which == "char" else 700
    a = make_sample(task, tok, n, 1, 4)
    b = make_sample(task, tok, n, 1, 4)
    assert a == b  # same seed, same sample
    c = make_sample(task, tok, n, 2, 4)
    assert c.context != a.context and c.seed != a.seed  # another sample index, another sample
    assert make_sample(task, tok, n, 1, 4, base_seed=7).context != a.context
    got = _len(tok, a.context)
    assert got == a.context_tokens
    slack = 10 if task == "cwe" else 3  # cwe: within one list item ("123. word")
    assert abs(got - n) <= slack, (task, got, n)
    for ans in a.answers:
        assert ans in a.context
    assert a.question and a.max_new_tokens > 0


def test_niah_grid_walks_the_depths():
    tok = char_tokenizer()
    depths = [make_sample("niah-grid", tok, 800, i, 5).depth for i in range(5)]
    assert depths == [0.0, 0.25, 0.5, 0.75, 1.0] == [grid_depth(i, 5) for i in range(5)]
    first = make_sample("niah-grid", tok, 800, 0, 5)
    last = make_sample("niah-grid", tok, 800, 4, 5)
    needle = f"is: {first.answers[0]}."
    assert first.context.index(needle) < 200  # right after the instruction line
    assert last.context.rindex(f"is: {last.answers[0]}.") > len(last.context) - 100


def test_niah_needles_and_distractors():
    tok = char_tokenizer()
    mk = make_sample("niah-multikey", tok, 1500, 0, 1)
    assert len(mk.distractors) == 3 and mk.answers[0] not in mk.distractors
    key = re.search(r"number for (\S+) mentioned", mk.question).group(1)
    assert f"for {key} is: {mk.answers[0]}." in mk.context
    for d in mk.distractors:
        assert d in mk.context and f"for {key} is: {d}" not in mk.context
    mv = make_sample("niah-multivalue", tok, 1500, 0, 1)
    key = re.search(r"numbers for (\S+) mentioned", mv.question).group(1)
    assert sorted(re.findall(rf"for {re.escape(key)} is: (\d+)\.", mv.context)) == sorted(mv.answers)
    mq = make_sample("niah-multiquery", tok, 1500, 0, 1)
    for v in mq.answers:
        k = re.search(rf"for (\S+) is: {v}\.", mq.context).group(1)
        assert k in mq.question


def test_vt_chain_resolves_to_the_answer():
    s = make_sample("vt", char_tokenizer(), 1500, 3, 5)
    value = re.search(r"value (\d+)", s.question).group(1)
    binds = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context))

    def resolve(v):
        while binds[v].startswith("VAR "):
            v = binds[v][4:]
        return binds[v]

    assert sorted(v for v in binds if resolve(v) == value) == sorted(s.answers)
    assert len(binds) > len(s.answers)  # a distractor chain with another value


def test_cwe_common_words_are_the_most_frequent():
    s = make_sample("cwe", char_tokenizer(), 3000, 0, 1)
    words = re.findall(r"\d+\. ([a-z]+)", s.context)
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(len(s.answers))}
    assert top == set(s.answers)
    least_common = min(counts[w] for w in s.answers)
    assert all(c < least_common for w, c in counts.items() if w not in s.answers)


def test_qa_facts_states_the_asked_fact():
    s = make_sample("qa-facts", char_tokenizer(), 2500, 0, 1)
    name = re.search(r"(?:of|does|was) ([A-Z][a-z]+ [A-Z][a-z]+)", s.question).group(1)
    sentences = [x for x in re.split(r"(?<=\.) ", s.context) if name in x]
    assert any(s.answers[0] in x for x in sentences)


def test_too_short_is_one_line_error():
    from hetmem.errors import HetmemError

    with pytest.raises(HetmemError, match="too few for cwe"):
        make_sample("cwe", char_tokenizer(), 128, 0, 1)
    with pytest.raises(HetmemError, match="unknown task"):
        make_sample("nope", char_tokenizer(), 512, 0, 1)
