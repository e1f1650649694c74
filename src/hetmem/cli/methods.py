"""``hetmem methods``: list the memory methods and their parameters."""

from __future__ import annotations

import json
from dataclasses import fields

from hetmem.methods import REGISTRY


def cmd_methods(args) -> int:
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        params = {f.name: f.default for f in fields(cls)}
        rows.append({"name": name, "family": cls.family, "summary": cls.summary, "params": params})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            ps = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
            print(f"{r['name']:<10} {r['family']:<18} {r['summary']}  [{ps}]")
    return 0


def register(sub) -> None:
    m = sub.add_parser("methods", help="list the memory methods and their parameters")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)
