"""``hetmem methods``: list the memory methods and their parameters (from each method's own declarations)."""

from __future__ import annotations

import json

from hetmem.llm.families import supported_model_types
from hetmem.methods import REGISTRY, param_specs


def cmd_methods(args) -> int:
    families = supported_model_types()  # every method runs on every family of the tested table
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        specs = param_specs(cls)
        rows.append({"name": name, "family": cls.family, "summary": cls.summary,
                     "params": {s.name: s.default for s in specs}, "param_specs": [s.as_dict() for s in specs],
                     "families": families})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            ps = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
            print(f"{r['name']:<10} {r['family']:<18} {r['summary']}  [{ps}]")
        print(f"\nmodel families (model types): {', '.join(families)} (README: model families)")
    return 0


def register(sub) -> None:
    m = sub.add_parser("methods", help="list the memory methods and their parameters")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)
