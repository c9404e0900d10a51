"""Small statistics for judge results: confidence intervals, rater agreement, rank correlation.

Refusal counts are proportions over a few hundred prompts (721 over-rejection queries, 520
AdvBench prompts), so every rate we report carries a Wilson interval, and every pair of judges
carries its agreement so a reader can see how much a number depends on the judge.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

from .errors import SafetyLayersError


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (z=1.96 gives 95%).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k=0 or k=n,
    which matters for refusal counts such as 4/520.
    """
    if n <= 0:
        raise SafetyLayersError(f"wilson_interval needs n > 0 trials, got n={n}; count at least one prompt")
    if not 0 <= k <= n:
        raise SafetyLayersError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}; pass the number of successes as k")
    if z <= 0:
        raise SafetyLayersError(f"wilson_interval needs z > 0, got z={z}; use 1.96 for a 95% interval")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp only float rounding; mathematically the bounds already lie in [0, 1].
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_pair(a: Sequence[bool], b: Sequence[bool], what: str) -> None:
    if len(a) != len(b):
        raise SafetyLayersError(f"{what} needs two verdict lists of equal length, got {len(a)} and {len(b)}; judge the same prompts with both")
    if len(a) == 0:
        raise SafetyLayersError(f"{what} needs at least one verdict, got empty lists; judge some prompts first")


def percent_agreement(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Fraction (0..1) of items on which the two raters give the same verdict."""
    _check_pair(a, b, "percent_agreement")
    return sum(bool(x) == bool(y) for x, y in zip(a, b)) / len(a)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa for two binary raters: (p_o - p_e) / (1 - p_e).

    Degenerate case: p_e = 1 only when both raters give the same constant verdict on every
    item (e.g. both say "refused" for all prompts). Kappa is 0/0 there; we return 1.0 because
    the raters agree perfectly (sklearn returns nan). Two raters that are constant but opposite
    have p_e = 0 and get kappa = 0 from the formula, not a special case.
    """
    _check_pair(a, b, "cohen_kappa")
    n = len(a)
    pos_a = sum(bool(x) for x in a)
    pos_b = sum(bool(y) for y in b)
    agree = sum(bool(x) == bool(y) for x, y in zip(a, b))
    # Integer numerators so the p_e == 1 test is exact, not a float comparison.
    expected_num = pos_a * pos_b + (n - pos_a) * (n - pos_b)  # p_e * n^2
    if expected_num == n * n:
        return 1.0
    p_o = agree / n
    p_e = expected_num / (n * n)
    return (p_o - p_e) / (1.0 - p_e)


def agreement_table(verdicts: dict[str, Sequence[bool]]) -> list[dict]:
    """Percent agreement and kappa for every pair of judges, in the dict's order.

    ``verdicts`` maps a judge name to its refused/not-refused flags on the same prompts. Each row
    also gives both judges' refusal counts, since kappa alone hides a difference in base rates.
    """
    if len(verdicts) < 2:
        raise SafetyLayersError(f"agreement_table needs verdicts from at least two judges, got {len(verdicts)}; run a second judge")
    lengths = {name: len(v) for name, v in verdicts.items()}
    if len(set(lengths.values())) != 1:
        raise SafetyLayersError(f"agreement_table needs every judge to rate the same prompts, got lengths {lengths}")
    rows = []
    for (name_a, a), (name_b, b) in combinations(verdicts.items(), 2):
        rows.append(
            {
                "judge_a": name_a,
                "judge_b": name_b,
                "n": len(a),
                "refused_a": sum(bool(x) for x in a),
                "refused_b": sum(bool(y) for y in b),
                "percent": percent_agreement(a, b),
                "kappa": cohen_kappa(a, b),
            }
        )
    return rows


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation; ties get their average rank.

    Returns nan when either input is constant (the correlation is undefined there), so a flat
    sweep shows up as nan in a table instead of stopping a run.
    """
    from scipy.stats import rankdata

    if len(x) != len(y):
        raise SafetyLayersError(f"spearman needs two sequences of equal length, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise SafetyLayersError(f"spearman needs at least 2 points, got {len(x)}")
    rx = rankdata(x)
    ry = rankdata(y)
    mx, my = rx.mean(), ry.mean()
    dx, dy = rx - mx, ry - my
    sxx, syy = float((dx * dx).sum()), float((dy * dy).sum())
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    return float((dx * dy).sum()) / math.sqrt(sxx * syy)
