"""Figures of an existence analysis in the paper's style, written as PNG (matplotlib, no display needed).

Both take an ``AnalyzeResult`` (or one read back with ``AnalyzeResult.from_json``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _band(ax, rng, label="initial range"):
    if rng:
        ax.axvspan(rng[0] - 0.5, rng[1] + 0.5, color="tab:red", alpha=0.12, label=f"{label} {rng[0]}-{rng[1]}")


def plot_analysis(result, path: str | Path) -> Path:
    """Three mean±std cosine panels (N-N, M-M, N-M) and the angle-gap panel."""
    raw, cen = result.raw, result.centred
    layers = np.arange(result.num_layers)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    panels = [("N-N", raw.nn_mean, raw.nn_std, "tab:blue"), ("M-M", raw.mm_mean, raw.mm_std, "tab:orange"),
              ("N-M", raw.nm_mean, raw.nm_std, "tab:green")]
    for ax, (name, mean, std, color) in zip(axes, panels):
        mean, std = np.asarray(mean), np.asarray(std)
        ax.plot(layers, mean, color=color, lw=2, label=f"{name} mean")
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.2, label="±1 std")
        ax.set_title(f"{name} cosine similarity ({result.pairs} pairs, raw)")
        ax.set_xlabel("layer (0-based)")
        lo = float((mean - std).min())
        ax.set_ylim(lo - 0.05 * (1.0 - lo) - 1e-3, 1.0 + 0.05 * (1.0 - lo) + 1e-3)
        _band(ax, result.initial_range)
        ax.legend(fontsize=8, loc="lower left")
    ax = axes[3]
    ax.plot(layers, raw.gap_exact, color="black", lw=2, label="raw gap")
    ax.plot(layers, cen.gap_exact, color="tab:purple", lw=2, label="centred gap (joint N+M mean)")
    # the paper's definition (mean of per-pair angles, sampled pairs) beside the code's (angle of the mean)
    ax.plot(layers, raw.gap_paper, color="black", lw=1.5, ls=":", label="raw gap, paper's definition")
    if result.reference:
        ref = result.reference
        ax.plot(layers, ref["raw_gap"], color="black", lw=1, ls="--", label=f"raw gap, {ref['model']}")
        ax.plot(layers, ref["centred_gap"], color="tab:purple", lw=1, ls="--", label=f"centred gap, {ref['model']}")
    ax.axhline(0, color="grey", lw=0.5)
    _band(ax, result.initial_range)
    ax.set_title("angle gap: angle(N-M) − angle(N-N), degrees")
    ax.set_xlabel("layer (0-based)")
    ax.legend(fontsize=7)
    fig.suptitle(f"{result.model}: {result.normal} (N={result.n_normal}) vs {result.malicious} "
                 f"(M={result.n_malicious}), template {result.template}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probe(result, path: str | Path) -> Path | None:
    """Held-out accuracy of the per-layer linear probe (and the reference model's); None without a probe."""
    if not result.probe_accuracy:
        return None
    layers = np.arange(result.num_layers)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(layers, result.probe_accuracy, marker="o", ms=3, label=result.model)
    if result.reference and result.reference.get("probe_accuracy"):
        ax.plot(layers, result.reference["probe_accuracy"], ls="--", marker="o", ms=3, label=result.reference["model"])
    _band(ax, result.initial_range)
    ax.set_ylim(0.4, 1.02)
    ax.set_xlabel("layer (0-based)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("linear probe N vs M (5-fold CV)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
