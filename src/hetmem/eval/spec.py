"""What ``hetmem eval`` is asked to run: lengths, budgets and method specs, parsed into one-line errors.

    length   4k = 4096 tokens, 16k, 1.5k, or a token count (512)
    budget   a fraction of the prompt (1/8, 0.125) or a token count (512)
    method   a registered method name, optionally with parameters: seer:gates=DIR:page_size=32
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

from hetmem.errors import HetmemError
from hetmem.methods import REGISTRY, get_method, param_specs

MIN_LENGTH = 128


def parse_length(text: str) -> int:
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", t)
    if not m:
        raise HetmemError(f"--lengths: '{text}' is not a length (use 4k, 16k or a token count such as 4096)")
    n = float(m.group(1)) * (1024 if m.group(2) else 1)
    if n != int(n) or int(n) < MIN_LENGTH:
        raise HetmemError(f"--lengths: '{text}' must be a whole number of at least {MIN_LENGTH} tokens")
    return int(n)


def parse_list(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",")]
    if not text or any(not x for x in items):
        raise HetmemError(f"{flag} needs a comma-separated list without empty items (got '{text}')")
    if len(set(items)) != len(items):
        dup = sorted({x for x in items if items.count(x) > 1})
        raise HetmemError(f"{flag} lists {', '.join(dup)} more than once")
    return items


@dataclass(frozen=True)
class Budget:
    label: str  # as given: "1/8", "512"
    fraction: Fraction | None = None
    tokens: int | None = None

    def resolve(self, prompt_tokens: int) -> int:
        if self.tokens is not None:
            return self.tokens
        return max(1, int(self.fraction * prompt_tokens))


def parse_budget(text: str) -> Budget:
    t = text.strip()
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            f = Fraction(int(num), int(den))
        elif re.fullmatch(r"\d+", t):
            n = int(t)
            if n < 1:
                raise ValueError
            return Budget(t, tokens=n)
        else:
            v = float(t)
            if not math.isfinite(v):
                raise ValueError
            f = Fraction(v).limit_denominator(1 << 16)
    except (ValueError, ZeroDivisionError):
        raise HetmemError(f"--budgets: '{text}' is not a budget (use a fraction of the prompt such as 1/8 or 0.125, "
                          "or a token count such as 512)") from None
    if not 0 < f <= 1:
        raise HetmemError(f"--budgets: '{text}' must be a fraction in (0, 1] or a whole token count")
    return Budget(t, fraction=f)


@dataclass(frozen=True)
class MethodSpec:
    label: str  # as given: "quest", "seer:gates=runs/g"
    name: str
    params: dict = field(default_factory=dict, hash=False)

    @property
    def takes_budget(self) -> bool:
        return any(s.name == "budget" for s in param_specs(REGISTRY[self.name])) and "budget" not in self.params

    @property
    def family(self) -> str:
        return REGISTRY[self.name].family

    def build(self, budget: int | None = None):
        """The method through the registry (every value checked against its declaration)."""
        extra = {"budget": budget} if budget is not None else {}
        return get_method(self.name, **self.params, **extra)


def _convert(spec, raw: str, method: str):
    if raw.lower() == "none" and spec.optional:
        return None
    try:
        if spec.type is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        return spec.type(raw)
    except ValueError:
        raise HetmemError(f"--methods: {method}: {spec.name}={raw} is not a {spec.type.__name__}") from None


def parse_method(text: str) -> MethodSpec:
    name, *pairs = text.split(":")
    if name not in REGISTRY:
        raise HetmemError(f"--methods: unknown method '{name}': use one of {', '.join(sorted(REGISTRY))}")
    specs = {s.name: s for s in param_specs(REGISTRY[name])}
    params = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise HetmemError(f"--methods: '{text}': parameters are written name:key=value[:key=value]")
        if key not in specs:
            takes = ", ".join(specs) or "no parameters"
            raise HetmemError(f"--methods: '{key}' is not a parameter of method '{name}' (it takes: {takes})")
        params[key] = _convert(specs[key], raw.strip(), name)
    spec = MethodSpec(text, name, params)
    spec.build()  # bounds, choices, gates directories, combinations: checked now, before any model loads
    return spec
