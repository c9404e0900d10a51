"""Figures of an attention run: one heatmap per example pair and the per-layer content shares.

Both take an :class:`~safety_layers.analysis.attention.AttentionResult` (or its result.json
read back with ``AttentionResult.from_json``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _mark_band(ax, band, horizontal: bool) -> None:
    if not band:
        return
    for edge in (band[0] - 0.5, band[1] + 0.5):
        (ax.axhline if horizontal else ax.axvline)(edge, color="white" if horizontal else "tab:red",
                                                    lw=1.4, ls="--")


def _heat(ax, side: dict, title: str, band) -> object:
    w = np.asarray(side["weights"])
    im = ax.imshow(w, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    labels = [t.replace("\n", "\\n").strip() or repr(t) for t in side["tokens"]]
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    for tick, kind in zip(ax.get_xticklabels(), side["kinds"]):
        tick.set_color("black" if kind == "content" else "grey")
    ax.set_ylabel("layer (0-based)")
    ax.set_title(title, fontsize=10)
    _mark_band(ax, band, horizontal=True)
    return im


def plot_pair(result, index: int, path: str | Path) -> Path:
    """Malicious and normal maps of pair ``index`` side by side (per-layer min-max; band dashed;
    function words in grey)."""
    pair = result.pairs[index]
    ref = (result.reference or {}).get("pairs")
    rows = [(result.model, pair)] + ([(result.reference["model"], ref[index])] if ref else [])
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), squeeze=False)
    for r, (name, p) in enumerate(rows):
        for c, side in enumerate(("malicious", "normal")):
            im = _heat(axes[r][c], p[side], f"{name}, {side}: last token -> question", result.band)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="attention, min-max per layer")
    band = f", band {result.band[0]}-{result.band[1]} dashed" if result.band else ""
    fig.suptitle(f"attention of the last prompt token to the question, mean over heads (template "
                 f"{result.template}{band})", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _lines(ax, shares: dict, key: str, style: str, label: str) -> None:
    layers = np.arange(len(shares["normal"][key]))
    for side, color in (("normal", "tab:blue"), ("malicious", "tab:red")):
        mean = np.asarray(shares[side][key])
        se = np.asarray(shares[side][key + "_se"])
        ax.plot(layers, mean, color=color, ls=style, lw=1.8, label=f"{side} (n={shares[side]['n']}), {label}")
        ax.fill_between(layers, mean - 1.96 * se, mean + 1.96 * se, color=color, alpha=0.12)
        if key == "content_share":
            ax.axhline(shares[side]["chance"], color=color, ls=":", lw=1)


def plot_shares(result, path: str | Path) -> Path:
    """Per layer: the content share of the question's attention (dotted: its chance level) and the
    question's share of all attention, N and M, with 95% intervals (and the reference model dashed)."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    ref = result.reference
    for ax, key, title in ((axes[0], "content_share", "content words' share of the attention on question words"),
                           (axes[1], "question_mass", "question tokens' share of all attention")):
        _lines(ax, result.shares, key, "-", result.model)
        if ref:
            _lines(ax, ref["shares"], key, "--", ref["model"])
        if result.band:
            ax.axvspan(result.band[0] - 0.5, result.band[1] + 0.5, color="tab:red", alpha=0.08,
                       label=f"band {result.band[0]}-{result.band[1]}")
        ax.set_xlabel("layer (0-based)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result.model}: {result.normal} (N) vs {result.malicious} (M), template {result.template}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
