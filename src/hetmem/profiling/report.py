"""Readable per-step tables. Every figure printed here is measured wall time on this machine."""

from __future__ import annotations

from hetmem.core.steps import STEP_NAMES


def step_table(runs: dict[str, dict]) -> str:
    """``runs``: label -> run record (as printed by ``hetmem run --json``). One column block per run."""
    labels = list(runs)
    head = f"{'step':<10}" + "".join(f" | {lab:^33}" for lab in labels)
    sub = f"{'':<10}" + "".join(f" | {'prefill ms':>10} {'decode ms':>10} {'calls':>10}" for _ in labels)
    lines = ["Per-step time (measured wall time on this machine, summed over all layers)", head, sub, "-" * len(sub)]
    for step in STEP_NAMES:
        row = f"{step:<10}"
        for lab in labels:
            s = runs[lab]["steps"][step]
            pre = s["phases"].get("prefill", {}).get("ms", 0.0)
            dec = s["phases"].get("decode", {}).get("ms", 0.0)
            row += f" | {pre:>10.1f} {dec:>10.1f} {s['calls']:>10d}"
        lines.append(row)
    lines.append("-" * len(sub))
    row = f"{'end-to-end':<10}"
    for lab in labels:
        r = runs[lab]
        row += f" | {r['prefill_ms']:>10.1f} {r['decode_ms']:>10.1f} {'':>10}"
    lines.append(row)
    return "\n".join(lines)
