"""Layer-wise statistics of normal (N) and malicious (M) hidden states: pure functions on tensors.

For each decoder block the last-token vectors of N-N, M-M and N-M prompt pairs are compared
(paper §3.2). Besides the paper's sampled statistics (r pairs per type, drawn with the
released code's seeds) we compute exact all-pairs means from Gram matrices, a mean-centred
variant (raw cosines of small models sit near 1 because one shared direction dominates), a
cross-validated linear probe per layer, an automatic initial safety-layer range and a
bootstrap interval for it.

Angle gap definitions: ``paper`` (§3.3): mean over pairs of the N-M angle minus mean over
pairs of the N-N angle; ``code``: arccos(mean N-M cosine) - arccos(mean N-N cosine), as the
released plot script computes it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import SafetyLayersError

#: the released code's pair seeds: ``random.seed(seed + k)`` before the k-th draw of each pair type
PAPER_SEEDS = {"nn": 10, "mm": 100, "nm": 1000}


@dataclass
class Curves:
    """Per-layer statistics for one centring choice (lists indexed by layer)."""

    centre: str                      # "none" or "joint" (mean of N and M subtracted)
    nn_mean: list[float]             # sampled pairs (r of them), as the paper's figures
    nn_std: list[float]
    mm_mean: list[float]
    mm_std: list[float]
    nm_mean: list[float]
    nm_std: list[float]
    nn_exact: list[float]            # exact mean over all distinct pairs
    mm_exact: list[float]
    nm_exact: list[float]
    gap_code: list[float]            # degrees, from the sampled means
    gap_paper: list[float]           # degrees, mean of per-pair angles (sampled)
    gap_exact: list[float]           # degrees, code definition on exact means
    gap_exact_paper: list[float]     # degrees, paper definition over all pairs


# --------------------------------------------------------------------------- cosine statistics

def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pair_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[layer, len(a), len(b)] cosines between prompts of two sets ([prompt, layer, hidden])."""
    ua, ub = _unit(a.double()), _unit(b.double())
    return torch.einsum("ikd,jkd->kij", ua, ub)


def _deg(c: torch.Tensor | np.ndarray):
    return np.degrees(np.arccos(np.clip(np.asarray(c, dtype=np.float64), -1.0, 1.0)))


def sample_pairs(n: int, m: int | None, r: int, seed: int) -> list[tuple[int, int]]:
    """The released code's draw: ``random.seed(seed + k)`` before each of the r draws.

    Within one set (``m is None``) the two prompts are distinct (``random.sample``); across
    sets one index is drawn from each.
    """
    out = []
    for k in range(r):
        random.seed(seed + k)
        if m is None:
            i, j = random.sample(range(n), 2)
        else:
            i, j = random.randrange(n), random.randrange(m)
        out.append((i, j))
    return out


def curves(hn: torch.Tensor, hm: torch.Tensor, r: int = 500, centre: str = "none",
           seeds: dict | None = None) -> Curves:
    """All statistics for N ([n, layer, hidden]) and M ([m, layer, hidden])."""
    if centre == "joint":
        mu = torch.cat([hn, hm]).double().mean(0, keepdim=True)
        hn, hm = hn.double() - mu, hm.double() - mu
    elif centre != "none":
        raise SafetyLayersError(f"unknown centring {centre!r}: use none or joint")
    seeds = seeds or PAPER_SEEDS
    n, m = len(hn), len(hm)
    cnn, cmm, cnm = pair_cosines(hn, hn), pair_cosines(hm, hm), pair_cosines(hn, hm)
    off_n = ~torch.eye(n, dtype=torch.bool)
    off_m = ~torch.eye(m, dtype=torch.bool)
    all_nn, all_mm, all_nm = cnn[:, off_n], cmm[:, off_m], cnm.reshape(cnm.shape[0], -1)

    def sampled(c, pairs):
        idx_i = torch.tensor([p[0] for p in pairs])
        idx_j = torch.tensor([p[1] for p in pairs])
        return c[:, idx_i, idx_j]                       # [layer, r]

    snn = sampled(cnn, sample_pairs(n, None, r, seeds["nn"]))
    smm = sampled(cmm, sample_pairs(m, None, r, seeds["mm"]))
    snm = sampled(cnm, sample_pairs(n, m, r, seeds["nm"]))
    ls = lambda t: [float(v) for v in t]  # noqa: E731
    return Curves(
        centre=centre,
        nn_mean=ls(snn.mean(1)), nn_std=ls(snn.std(1, unbiased=False)),
        mm_mean=ls(smm.mean(1)), mm_std=ls(smm.std(1, unbiased=False)),
        nm_mean=ls(snm.mean(1)), nm_std=ls(snm.std(1, unbiased=False)),
        nn_exact=ls(all_nn.mean(1)), mm_exact=ls(all_mm.mean(1)), nm_exact=ls(all_nm.mean(1)),
        gap_code=ls(_deg(snm.mean(1)) - _deg(snn.mean(1))),
        gap_paper=ls(_deg(snm).mean(1) - _deg(snn).mean(1)),
        gap_exact=ls(_deg(all_nm.mean(1)) - _deg(all_nn.mean(1))),
        gap_exact_paper=ls(_deg(all_nm).mean(1) - _deg(all_nn).mean(1)),
    )


# --------------------------------------------------------------------------- probe

def probe_accuracy(hn: torch.Tensor, hm: torch.Tensor, folds: int = 5, seed: int = 0,
                   ridge: float = 1.0) -> list[float]:
    """Per-layer held-out accuracy of a linear probe N vs M (stratified k-fold).

    The probe is a ridge classifier on standardised features, solved in closed form in its
    dual (prompts < hidden size) for all layers at once: seconds instead of minutes of
    iterative logistic-regression fits, with the same kind of linear decision rule. The
    penalty is ``ridge * hidden_size``, so it scales with the feature count.
    """
    x = torch.cat([hn, hm]).double().transpose(0, 1)             # [layer, P, hidden]
    y = torch.cat([-torch.ones(len(hn)), torch.ones(len(hm))]).double()
    folds = max(2, min(folds, len(hn), len(hm)))
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=int)
    for cls in (np.flatnonzero(y.numpy() < 0), np.flatnonzero(y.numpy() > 0)):
        fold_of[rng.permutation(cls)] = np.arange(len(cls)) % folds
    correct = torch.zeros(x.shape[0], dtype=torch.float64)
    lam = ridge * x.shape[-1]
    for f in range(folds):
        tr, te = torch.from_numpy(fold_of != f), torch.from_numpy(fold_of == f)
        mu, sd = x[:, tr].mean(1, keepdim=True), x[:, tr].std(1, keepdim=True).clamp_min(1e-8)
        xtr, xte = (x[:, tr] - mu) / sd, (x[:, te] - mu) / sd
        ytr = y[tr]
        b = ytr.mean()
        k = xtr @ xtr.transpose(1, 2) + lam * torch.eye(int(tr.sum()), dtype=torch.float64)
        alpha = torch.linalg.solve(k, (ytr - b).expand(x.shape[0], -1).unsqueeze(-1))
        pred = (xte @ xtr.transpose(1, 2) @ alpha).squeeze(-1) + b
        correct += (torch.sign(pred) == y[te]).double().sum(1)
    return [float(c) / len(y) for c in correct]


# --------------------------------------------------------------------------- initial range

RANGE_RULE = ("smooth the gap curve over 3 layers; baseline = its minimum before the peak; the range "
              "starts at the first layer whose gap exceeds baseline + {lo:.0%} of the total rise (the gap "
              "leaves early-layer noise) and ends at the first layer reaching {hi:.0%} of it (the gap levels off)")


def _smooth(g: np.ndarray) -> np.ndarray:
    if len(g) < 3:
        return g.copy()
    padded = np.r_[g[0], g, g[-1]]
    return np.convolve(padded, np.ones(3) / 3, mode="valid")


def initial_range(gap, lo: float = 0.2, hi: float = 0.8, min_rise: float = 0.5) -> list[int] | None:
    """The band where the gap rises out of early-layer noise to where it levels off.

    Returns ``[start, end]`` (0-based, inclusive) or None when the curve never rises by
    ``min_rise`` degrees, i.e. there is no gap to speak of, or is undefined somewhere (a
    bootstrap resample of a tiny set that drew one prompt only has no pairs to compare).
    """
    g = _smooth(np.asarray(gap, dtype=np.float64))
    if not np.isfinite(g).all():
        return None
    peak = int(np.argmax(g))
    base_idx = int(np.argmin(g[: peak + 1]))
    base, rise = g[base_idx], g[peak] - g[base_idx]
    if rise < min_rise:
        return None
    start = next(i for i in range(base_idx, peak + 1) if g[i] >= base + lo * rise)
    end = next(i for i in range(start, peak + 1) if g[i] >= base + hi * rise)
    return [start, end]


def _gram_gap(G: torch.Tensor, n: int, w: torch.Tensor, centre: bool) -> np.ndarray:
    """Code-definition gap per layer from raw Gram matrices [layer, P, P] and prompt weights w.

    Weights are bootstrap counts; pairs of a prompt with itself are excluded, as in the
    exact statistics. Centring uses the weighted joint mean, done in Gram space.
    """
    w = w.double()
    if centre:
        s = w.sum()
        a = G @ w / s                                            # [layer, P]: <x_i, mu>
        c = (w @ G @ w) / s**2                                   # [layer]: |mu|^2
        G = G - a[:, :, None] - a[:, None, :] + c[:, None, None]
    d = torch.sqrt(torch.diagonal(G, dim1=1, dim2=2).clamp_min(1e-24))
    C = G / d[:, :, None] / d[:, None, :]
    wn, wm = w[:n], w[n:]
    cnn = C[:, :n, :n]
    diag = torch.diagonal(cnn, dim1=1, dim2=2)
    nn = ((wn @ cnn @ wn) - (wn**2 * diag).sum(-1)) / (wn.sum() ** 2 - (wn**2).sum())
    nm = (wn @ C[:, :n, n:] @ wm) / (wn.sum() * wm.sum())
    return _deg(nm.numpy()) - _deg(nn.numpy())


def layer_interval(values, level: float = 0.95) -> list[int]:
    """The central ``level`` interval of integer layer indices, widened to observed layers: the lower
    end is the percentile rounded down to a sample (``method="lower"``), the upper end rounded up
    (``"higher"``), so at most (1 - level) / 2 of the samples lie beyond either end."""
    tail = (1 - level) / 2 * 100
    return [int(np.percentile(values, tail, method="lower")), int(np.percentile(values, 100 - tail, method="higher"))]


def bootstrap_range(hn: torch.Tensor, hm: torch.Tensor, centre: bool, samples: int = 200, seed: int = 0,
                    lo: float = 0.2, hi: float = 0.8) -> dict:
    """Resample N and M prompts with replacement; distribution of the initial range."""
    if samples <= 0:
        return {}
    x = torch.cat([hn, hm]).double()                             # [P, layer, hidden]
    G = torch.einsum("ikd,jkd->kij", x, x)
    n, m = len(hn), len(hm)
    rng = np.random.default_rng(seed)
    starts, ends, none = [], [], 0
    for _ in range(samples):
        w = torch.zeros(n + m, dtype=torch.float64)
        w[:n] = torch.from_numpy(np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64))
        w[n:] = torch.from_numpy(np.bincount(rng.integers(0, m, m), minlength=m).astype(np.float64))
        rr = initial_range(_gram_gap(G, n, w, centre), lo, hi)
        if rr is None:
            none += 1
            continue
        starts.append(rr[0])
        ends.append(rr[1])
    if not starts:
        return {"samples": samples, "no_range": none}
    pairs = list(zip(starts, ends))
    mode = max(set(pairs), key=pairs.count)
    return {"samples": samples, "no_range": none,
            "start_ci": layer_interval(starts), "end_ci": layer_interval(ends),
            "mode": list(mode), "mode_share": pairs.count(mode) / samples}


# --------------------------------------------------------------------------- whole analysis

#: Gap curves the initial range can be read from, and what each one is. ``paper`` is the paper's
#: own definition (docs/paper.md §2): the mean of per-pair angles over the r pairs sampled with
#: the released code's seeds, on raw states. Its bootstrap interval resamples the exact raw gap.
RANGE_CURVES = {
    "centred": "centred gap, exact all-pairs means",
    "raw": "raw gap, exact all-pairs means",
    "paper": "raw gap in the paper's definition: mean of per-pair angles over the sampled pairs",
}


def analyze_states(hn: torch.Tensor, hm: torch.Tensor, *, pairs: int = 500, range_curve: str = "centred",
                   bootstrap: int = 200, seed: int = 0, probe: bool = True, rise=(0.2, 0.8),
                   seeds: dict | None = None) -> dict:
    """Everything computed from two stacks of hidden states ([prompt, layer, hidden])."""
    if len(hn) < 2 or len(hm) < 2:
        raise SafetyLayersError(
            f"need at least 2 normal and 2 malicious prompts, got {len(hn)} and {len(hm)}: use larger sets")
    if range_curve not in RANGE_CURVES:
        raise SafetyLayersError(f"unknown range curve {range_curve!r}: use {', '.join(RANGE_CURVES)}")
    raw = curves(hn, hm, pairs, "none", seeds)
    cen = curves(hn, hm, pairs, "joint", seeds)
    gap = {"centred": cen.gap_exact, "raw": raw.gap_exact, "paper": raw.gap_paper}[range_curve]
    lo, hi = rise
    return {
        "raw": raw, "centred": cen,
        "probe_accuracy": probe_accuracy(hn, hm, seed=seed) if probe else [],
        "initial_range": initial_range(gap, lo, hi),
        "bootstrap": bootstrap_range(hn, hm, range_curve == "centred", bootstrap, seed, lo, hi),
        "range_rule": RANGE_RULE.format(lo=lo, hi=hi) + f" ({RANGE_CURVES[range_curve]})",
    }
