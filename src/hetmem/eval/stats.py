"""Intervals for small samples.

Accuracy: the Wilson score interval (Wilson, 1927) with n = the number of scored samples and the summed
scores as successes (exact for 0/1 scores; for partial-credit tasks it treats the mean score as a
proportion, an approximation). It stays honest at 5/5: [0.57, 1.00], where a bootstrap would claim [1, 1].

Ratio to dense: MOVER-R (Donner & Zou, 2012, Stat. Methods Med. Res. 21(4)), which combines the two Wilson
intervals into one for p_method / p_dense. It treats the two as independent, which is conservative for the
paired samples here (method and dense answer the same contexts, so their errors are positively correlated).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def ratio_interval(s1: float, n1: int, s2: float, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """(ratio, low, high) of p1/p2 with p = s/n, by MOVER-R; the upper bound is inf when p2's lower Wilson
    bound is 0, and everything is nan when p2 = 0."""
    if n1 <= 0 or n2 <= 0:
        return (float("nan"),) * 3
    p1, p2 = s1 / n1, s2 / n2
    if p2 == 0:
        return (float("nan"),) * 3
    l1, u1 = wilson(s1, n1, z)
    l2, u2 = wilson(s2, n2, z)
    r = p1 / p2
    a = p1 * p2
    lo_den = u2 * (2 * p2 - u2)
    lo = (a - math.sqrt(max(0.0, a * a - l1 * u2 * (2 * p1 - l1) * (2 * p2 - u2)))) / lo_den if lo_den > 0 else 0.0
    hi_den = l2 * (2 * p2 - l2)
    hi = (a + math.sqrt(max(0.0, a * a - u1 * l2 * (2 * p1 - u1) * (2 * p2 - l2)))) / hi_den if hi_den > 0 else math.inf
    return (r, max(0.0, min(lo, r)), max(hi, r))


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two equally long lists (nan for fewer than two items or no variation)."""
    n = len(x)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    den = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / den if den else float("nan")
