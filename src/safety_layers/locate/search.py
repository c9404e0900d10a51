"""The sweep logic of localization, free of side effects: no model, no files.

Every function here takes the counting as a callable (``screen(range) -> refusals``), so the
rules can be checked on the paper's own Table 1 counts. What the paper leaves open is decided
here, and each rule's text is written into every result (``rules``):

- **alpha** (A.3.4): without a given alpha, try 1 ± 0.05, 1 ± 0.10, ... and stop at the first
  alpha whose upper-bound window sweep (the 2·window+1 ranges [i, j-window] .. [i, j+window],
  before any widening, scored by the screening method) has a *sample* standard deviation
  (ddof = 1, which reproduces the paper's Table 4 figure of 2.4) of at least ``threshold``
  refusals. The default threshold is the paper's N_u = 15-20 per 721 prompts scaled to the
  set: 17.5 / 721 · n. If no alpha within ``max_steps`` reaches it, the alpha with the largest
  std is used (the one closer to 1 on a tie).
- **ties**: among equal counts the narrower band wins (the smaller claim; within one sweep one
  bound is fixed, so the width decides uniquely).
- **edges**: when the optimum lies on the edge of the evaluated window, ``window`` more
  candidates are added beyond that edge (never past layer 0 or the last layer, or the fixed
  bound), until the optimum is inside, the model ends, or ``max_widen`` extensions were made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange

#: the paper's N_u (15-20 refusals of 721 prompts) as a share of the set: 17.5 / 721
PAPER_STD_SHARE = 17.5 / 721
DIRECTIONS = ("up", "down")

ALPHA_RULE = ("alpha search: |alpha - 1| grows by alpha_step from 1; stop at the first alpha whose upper-bound "
              "window sweep [i, j-window]..[i, j+window] (before widening, screening counts) has a sample std "
              "(ddof=1) >= std_threshold; if none does within max_alpha_steps, take the alpha with the largest std "
              "(closer to 1 on a tie)")
TIE_RULE = "ties: the narrower band wins"
EDGE_RULE = ("edges: an optimum on the window's edge adds `window` more candidates beyond it (never past the model "
             "or the fixed bound) until it is inside, the model ends or max_widen extensions were made")
STD_RULE = "sample standard deviation (ddof=1) of the screening counts"


# --------------------------------------------------------------------------- alphas

def check_alpha(alpha: float, direction: str) -> float:
    """``alpha`` if it lies on the side of 1 that ``direction`` needs, else a one-line error."""
    if not alpha > 0:
        raise SafetyLayersError(f"alpha must be > 0, got {alpha}: use alpha > 1 (direction up) "
                                "or 0 < alpha < 1 (direction down)")
    if alpha == 1:
        raise SafetyLayersError("alpha = 1 scales nothing: use alpha > 1 with direction up "
                                "or alpha < 1 with direction down")
    if direction == "up" and alpha < 1:
        raise SafetyLayersError(f"alpha {alpha} < 1 weakens the band, but direction is up: "
                                "pass --direction down or an alpha > 1")
    if direction == "down" and alpha > 1:
        raise SafetyLayersError(f"alpha {alpha} > 1 amplifies the band, but direction is down: "
                                "pass --direction up or an alpha < 1")
    return float(alpha)


def parse_sanity_alphas(text: str) -> tuple[float, float]:
    """``"0.8,1.2"`` -> (0.8, 1.2): one alpha below 1 and one above."""
    try:
        down, up = (float(x) for x in str(text).replace(" ", "").split(","))
    except ValueError:
        raise SafetyLayersError(f"sanity_alphas must be DOWN,UP such as 0.8,1.2, got {text!r}") from None
    if not (0 < down < 1 < up):
        raise SafetyLayersError(f"sanity_alphas need 0 < DOWN < 1 < UP, got {down},{up}: e.g. 0.8,1.2")
    return down, up


def mirror_alpha(alpha: float) -> float:
    """The alpha on the other side of 1 at the same distance (1.2 <-> 0.8); 1/alpha when that would be <= 0."""
    m = 2.0 - alpha
    return round(m if m > 0 else 1.0 / alpha, 6)


def search_alpha(sweep_counts: Callable[[float], list[int]], direction: str, step: float, max_steps: int,
                 threshold: float) -> tuple[float, list[dict], bool]:
    """The paper's alpha rule (A.3.4, see :data:`ALPHA_RULE`): returns (alpha, history, reached).

    ``sweep_counts(alpha)`` gives the counts of the upper-bound window sweep at ``alpha``.
    """
    history: list[dict] = []
    for k in range(1, max_steps + 1):
        alpha = round(1 + k * step if direction == "up" else 1 - k * step, 6)
        if alpha <= 0:
            break
        counts = [int(c) for c in sweep_counts(alpha)]
        std = sample_std(counts)
        history.append({"alpha": alpha, "std": std, "counts": counts, "threshold": threshold})
        if std >= threshold:
            return alpha, history, True
    if not history:
        raise SafetyLayersError(f"alpha_step {step} leaves no alpha in (0, 1) to try: use a smaller step")
    best = min(history, key=lambda h: (-h["std"], abs(h["alpha"] - 1)))
    return best["alpha"], history, False


# --------------------------------------------------------------------------- sweeps

def rank_key(count: int, rng: LayerRange, direction: str) -> tuple:
    """Sort key, best first: most (up) or fewest (down) refusals, then the narrower band."""
    return (-count if direction == "up" else count, len(rng), rng.start)


def sample_std(counts) -> float:
    """Sample standard deviation (ddof = 1); 0 for fewer than two values."""
    return float(np.std(np.asarray(counts, dtype=np.float64), ddof=1)) if len(counts) > 1 else 0.0


def bound_window(centre: int, lo: int, hi: int, w: int) -> list[int]:
    """The bound values ``centre - w .. centre + w``, kept within ``lo .. hi``."""
    return list(range(max(lo, centre - w), min(hi, centre + w) + 1))


def upper_window(init: LayerRange, num_layers: int, w: int) -> list[LayerRange]:
    """The upper-bound window sweep [i, j-w] .. [i, j+w] of the initial range [i, j] (the alpha rule's sweep)."""
    return [LayerRange(init.start, e) for e in bound_window(init.end, init.start, num_layers - 1, w)]


def sweep_bound(bound: Literal["upper", "lower"], fixed: int, centre: int, num_layers: int, *,
                direction: str, window: int, screen: Callable[[LayerRange], int],
                confirm: Callable[[LayerRange], int] | None = None, confirm_top: int = 2,
                max_widen: int | None = None) -> tuple[LayerRange, list[dict]]:
    """Sweep one bound; returns the chosen range and the stages (``bound``, then ``bound-widened`` ...).

    ``upper``: ranges [fixed, e] for e around ``centre``; ``lower``: [s, fixed]. ``screen(range)``
    gives every candidate's count. With ``confirm`` (generation + judge) the ``confirm_top`` best
    screened candidates and every one within the proxy's measured error of the best are recounted
    (:data:`CONFIRM_RULE`) and the best recount decides; the last stage then records
    ``proxy_error``, ``proxy_winner``, ``disagree`` and ``rule``; without it the screening
    counts are generation counts and decide directly. Widening follows :data:`EDGE_RULE`.
    Each stage is ``{"stage", "bound", "fixed", "rows": [{"range", "proxy_count", "count",
    "confirmed"}], "chosen"}`` with rows ordered from the narrowest band.
    """
    lo, hi = (fixed, num_layers - 1) if bound == "upper" else (0, fixed)
    make = (lambda v: LayerRange(fixed, v)) if bound == "upper" else (lambda v: LayerRange(v, fixed))
    screened: dict[int, int] = {}
    confirmed: dict[int, int] = {}
    stages: list[tuple[str, list[int]]] = [(bound, bound_window(centre, lo, hi, window))]
    widened = 0
    while True:
        for v in stages[-1][1]:
            if v not in screened:
                screened[v] = screen(make(v))
        if confirm is None:
            pool = screened
        else:
            error = _confirm_close(screened, confirmed, confirm, make, direction, confirm_top)
            pool = confirmed or screened
        best = min(pool, key=lambda v: rank_key(pool[v], make(v), direction))
        new = _widening(best, min(screened), max(screened), lo, hi, window)
        if not new or (max_widen is not None and widened >= max_widen):
            break
        widened += 1
        stages.append((f"{bound}-widened", new))
    chosen = make(best)
    out = [_stage(name, bound, fixed, values, make, screened, None if confirm is None else confirmed, chosen)
           for name, values in stages]
    if confirm is not None:
        proxy_best = make(min(screened, key=lambda v: rank_key(screened[v], make(v), direction)))
        out[-1].update(proxy_error=error, proxy_winner=[proxy_best.start, proxy_best.end],
                       disagree=proxy_best != chosen, rule=CONFIRM_RULE)
    return chosen, out


#: How many screened candidates generation recounts (recorded with each sweep).
CONFIRM_RULE = ("generation recounts the confirm_top best proxy candidates, then every candidate whose proxy count "
                "lies within the proxy's measured error of the best proxy count, the error being the largest "
                "|proxy - generation| seen on recounted candidates, until no such candidate is left; the "
                "generation counts decide")


def _confirm_close(screened: dict, confirmed: dict, confirm, make, direction: str, top: int) -> int:
    """Recount by generation the ``top`` best screened candidates and every one within the proxy's measured
    error of the best (:data:`CONFIRM_RULE`); returns that error."""
    ranked = sorted(screened, key=lambda v: rank_key(screened[v], make(v), direction))
    todo = ranked[:top]
    while True:
        for v in todo:
            if v not in confirmed:
                confirmed[v] = confirm(make(v))
        error = max(abs(screened[v] - confirmed[v]) for v in confirmed)
        best = screened[ranked[0]]
        todo = [v for v in ranked if v not in confirmed and abs(screened[v] - best) <= error]
        if not todo:
            return error


def _widening(best: int, vmin: int, vmax: int, lo: int, hi: int, w: int) -> list[int]:
    """The values beyond the window's edge when ``best`` sits on it (:data:`EDGE_RULE`), else []."""
    if best == vmax and vmax < hi:
        return list(range(vmax + 1, min(hi, vmax + w) + 1))
    if best == vmin and vmin > lo:
        return list(range(max(lo, vmin - w), vmin))
    return []


def _stage(name: str, bound: str, fixed: int, values: list[int], make, screened: dict, confirmed: dict | None,
           chosen: LayerRange) -> dict:
    rows = []
    for v in sorted(values, key=lambda v: len(make(v))):
        r = make(v)
        gen = screened[v] if confirmed is None else confirmed.get(v)
        rows.append({"range": [r.start, r.end], "proxy_count": None if confirmed is None else screened[v],
                     "count": gen, "confirmed": gen is not None})
    return {"stage": name, "bound": bound, "fixed": fixed, "rows": rows, "chosen": [chosen.start, chosen.end]}


def sweep_table(sweeps: list[dict], direction: str) -> str:
    """One line per sweep in the style of the paper's Table 1; ``~`` marks a proxy estimate, ``**`` the choice."""
    names = {"upper": "Upper bound", "lower": "Lower bound"}
    lines = []
    for s in sweeps:
        cells = []
        for r in s["rows"]:
            value = f"{r['count']}" if r["confirmed"] else f"~{r['proxy_count']}"
            cell = f"[{r['range'][0]},{r['range'][1]}] {value}"
            cells.append(f"**{cell}**" if r["range"] == s["chosen"] else cell)
        label = names.get(s["stage"], s["stage"].replace("-", " "))
        other = "lower" if s["bound"] == "upper" else "upper"
        lines.append(f"{label} ({other} fixed at {s['fixed']}, {'argmax' if direction == 'up' else 'argmin'}): "
                     + " · ".join(cells))
    return "\n".join(lines)
