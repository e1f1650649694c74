"""A RAG quality task generated offline: invented facts about invented people, one file per pair of people.

Every fact is stated exactly once in the whole corpus, and every file is shorter than one passage, so the
answer to each question sits in exactly one passage (``<file>#0``). The names are invented, so neither
model has seen them: an answer is right only if retrieval found the passage and the model read it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_ON = ["ta", "vel", "mor", "quin", "bra", "sol", "dre", "kes", "lum", "fa", "zor", "ni", "pel", "gar", "thi", "ob",
       "ran", "vi", "sk", "ul", "mer", "cas", "du", "len", "ro", "hal", "ix", "bel", "tor", "ka", "wyn", "ash"]
_TOWNS = ["Vellmoor", "Quistead", "Harrowmere", "Doskell", "Brindleford", "Ostwick", "Pellingrade", "Marrowdeep",
          "Talsbury", "Cressfall", "Ulverholt", "Zennick", "Rookhaven", "Fenwold", "Ashcombe", "Gallowmere"]
_JOBS = ["clockmaker", "beekeeper", "cartographer", "glassblower", "ferryman", "bookbinder", "lamplighter",
         "stonemason", "chandler", "cooper", "weaver", "tanner", "astronomer", "herbalist", "locksmith", "potter"]
_INSTRUMENTS = ["cello", "oboe", "harp", "bagpipes", "zither", "trombone", "lute", "accordion", "banjo", "marimba"]
_ANIMALS = ["tortoise", "ferret", "parrot", "goat", "hedgehog", "owl", "lizard", "rabbit"]
_COLOURS = ["teal", "crimson", "ochre", "violet", "amber", "indigo", "saffron", "olive"]

# attribute -> (statement, question); {n} the person, {v} the value, {a} an extra word
_FACTS = {
    "town": ("{n} lives in the town of {v}.", "In which town does {n} live?"),
    "job": ("{n} works as a {v}.", "What is the profession of {n}?"),
    "year": ("{n} was born in the year {v}.", "In which year was {n} born?"),
    "pet": ("{n} keeps a pet {a} called {v}.", "What is the name of the pet of {n}?"),
    "instrument": ("In the evenings {n} plays the {v}.", "Which musical instrument does {n} play?"),
    "colour": ("The favourite colour of {n} is {v}.", "What is the favourite colour of {n}?"),
}


@dataclass
class FactQuestion:
    question: str
    answer: str
    source: str  # the file whose only passage states the fact
    passage_id: str
    entity: str
    attribute: str

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "source": self.source, "passage_id": self.passage_id}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ON) for _ in range(syllables)).capitalize()


def invent_person(rng: random.Random, used: set[str]) -> str:
    """An invented full name not in ``used`` (added to it)."""
    while True:
        name = f"{_word(rng, 2)} {_word(rng, 3)}"
        if name not in used:
            used.add(name)
            return name


def invent_facts(rng: random.Random, name: str, facts_per_person: int, source: str) -> list[tuple[str, FactQuestion]]:
    """``facts_per_person`` invented facts about ``name``: (the sentence stating it, the question it answers)."""
    out = []
    for attr in rng.sample(sorted(_FACTS), facts_per_person):
        extra = rng.choice(_ANIMALS)
        value = {
            "town": lambda: rng.choice(_TOWNS), "job": lambda: rng.choice(_JOBS),
            "year": lambda: str(rng.randint(1650, 1990)), "pet": lambda: _word(rng, 2),
            "instrument": lambda: rng.choice(_INSTRUMENTS), "colour": lambda: rng.choice(_COLOURS),
        }[attr]()
        stmt, q = _FACTS[attr]
        out.append((stmt.format(n=name, v=value, a=extra), FactQuestion(q.format(n=name), value, source, f"{source}#0", name, attr)))
    return out


def generate_fact_corpus(out_dir: str | Path, n_files: int = 300, people_per_file: int = 2, facts_per_person: int = 3,
                         n_questions: int = 40, seed: int = 0) -> list[FactQuestion]:
    """Write ``n_files`` small .txt files under ``out_dir``; return questions about randomly chosen facts."""
    rng = random.Random(seed)
    out = Path(out_dir)
    used: set[str] = set()
    facts: list[FactQuestion] = []
    for f in range(n_files):
        rel = f"archive/{f // 100:02d}/record_{f:04d}.txt"
        lines = []
        for _ in range(people_per_file):
            name = invent_person(rng, used)
            for stmt, fq in invent_facts(rng, name, facts_per_person, rel):
                lines.append(stmt)
                facts.append(fq)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(lines) + "\n", encoding="utf-8")
    return rng.sample(facts, min(n_questions, len(facts)))


def write_questions(path: str | Path, questions: list[FactQuestion]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, q in enumerate(questions):
            fh.write(json.dumps({"id": f"q{i}", **q.to_json()}) + "\n")
