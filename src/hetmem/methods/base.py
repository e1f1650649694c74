"""Method registry: a method is a named choice of four step objects plus its parameters.

A method declares each parameter once, as a dataclass field made with ``param(default, help, ...)``:
its type (the annotation), default, help text and bounds. From that one declaration come the
command-line options of every subcommand (``hetmem.cli.common.add_method_options``), the listing of
``hetmem methods --json`` (``param_specs``), and the checks ``get_method`` runs on any source of values
(the CLI, a JSON request): unknown names, wrong types, NaN/inf and out-of-bounds values are one-line
errors naming the method's parameters. ``Method.validate`` adds the checks that involve several
parameters.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError

REGISTRY: dict[str, type["Method"]] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


def param(default: Any, help: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None) -> Any:
    """A method parameter: a dataclass field with its help text and inclusive bounds (or choices)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices})


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: type  # int, float, bool or str
    default: Any
    help: str
    optional: bool = False  # None is a valid value (e.g. no trained gates)
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def as_dict(self) -> dict:
        return {"name": self.name, "flag": self.flag, "type": self.type.__name__, "default": self.default,
                "help": self.help, "optional": self.optional, "min": self.low, "max": self.high,
                "choices": list(self.choices) if self.choices else None}

    def check(self, value: Any, method: str) -> Any:
        """The value converted to the declared type, or a one-line HetmemError."""
        if value is None:
            if self.optional:
                return None
            raise HetmemError(f"{method}: {self.flag} needs a value")
        want = self.type
        ok = (isinstance(value, bool) if want is bool else
              isinstance(value, int) and not isinstance(value, bool) if want is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
              isinstance(value, str))
        if not ok:
            raise HetmemError(f"{method}: {self.flag} must be {want.__name__} (got {value!r})")
        if want is float:
            value = float(value)
            if not math.isfinite(value):
                raise HetmemError(f"{method}: {self.flag} must be a finite number (got {value})")
        lo_ok = self.low is None or value >= self.low
        hi_ok = self.high is None or value <= self.high
        if not (lo_ok and hi_ok):
            if self.low is not None and self.high is not None:
                bound = f"between {self.low:g} and {self.high:g}"
            else:
                bound = f"at least {self.low:g}" if self.high is None else f"at most {self.high:g}"
            raise HetmemError(f"{method}: {self.flag} must be {bound} (got {value:g})")
        if self.choices and value not in self.choices:
            raise HetmemError(f"{method}: {self.flag} must be one of {', '.join(map(str, self.choices))} (got {value!r})")
        return value


def param_specs(cls: type["Method"]) -> list[ParamSpec]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        t = hints[f.name]
        args = typing.get_args(t)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), t) if args else t
        md = f.metadata
        out.append(ParamSpec(f.name, base, f.default if f.default is not MISSING else None, md.get("help", ""),
                             optional, md.get("low"), md.get("high"), md.get("choices")))
    return out


@dataclass
class Method:
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise HetmemError for combinations of parameter values that cannot work (each value alone has
        already been checked against its declaration)."""

    def notes(self) -> list[str]:
        """One-line facts about how the parameters were interpreted (e.g. a budget rounded to whole pages);
        the CLI prints them and the run record keeps them."""
        return []

    def pipeline(self, device: str, timer: StepTimer, layer_idx: int = 0) -> MemoryPipeline:
        """The four steps for one attention layer (methods may treat some layers differently)."""
        raise NotImplementedError

    def bind(self, model) -> None:
        """Called once per generation before ``pipeline``: methods with per-layer weights size/load them here."""

    def report(self, cache) -> dict | None:
        """Extra measured facts about the method's memory after a run (evictions, quantisation error)."""
        return None

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def get_method(name: str, **params) -> Method:
    """The method ``name`` with ``params`` (None = the default), every value checked against its declaration."""
    if name not in REGISTRY:
        raise HetmemError(f"unknown method '{name}': use one of {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    specs = {s.name: s for s in param_specs(cls)}
    unknown = sorted(k for k, v in params.items() if k not in specs and v is not None)
    if unknown:
        takes = ", ".join(s.flag for s in specs.values()) or "no parameters"
        given = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise HetmemError(f"{given} {'is' if len(unknown) == 1 else 'are'} not {'a parameter' if len(unknown) == 1 else 'parameters'} "
                          f"of method '{name}' (it takes: {takes})")
    values = {k: specs[k].check(v, name) for k, v in params.items() if v is not None}
    method = cls(**values)
    method.validate()
    return method
