"""Figures of the report: the PNGs a run wrote, or ones drawn here from its JSON.

Every plot is drawn by one function, owned by the step whose result it shows: the analysis
curves and the probe by :mod:`safety_layers.analysis.plots`, the sweeps by
:mod:`safety_layers.locate`, the drift panels by :mod:`safety_layers.experiment.drift`. The
report calls them when a run's PNG is missing; the results chart, which no step saves, is the
only one drawn here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..core.runs import atomic_write
from .render import Figure, fmt_lr

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_DIR = "report-figures"
RESULTS_DPI = 100


class Figures:
    """Figures of the report: PNGs the run wrote, or ones drawn here into ``report-figures/``."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.drawn: list[Path] = []
        self.notes: list[str] = []

    def existing(self, path: Path, caption: str) -> Figure | None:
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            if f.read(8) != PNG_MAGIC:
                self.notes.append(f"{path.name} is not a PNG file; left out")
                return None
        return Figure(path, caption)

    def draw(self, name: str, caption: str, fn, *args) -> Figure | None:
        """Call ``fn(fig_path, *args)`` in a scratch folder; store the PNG atomically."""
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp) / name
            try:
                fn(scratch, *args)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                _plt().close("all")
                self.notes.append(f"could not draw {name} from the run's JSON ({e.__class__.__name__}: {e})")
                return None
            if not scratch.is_file():
                return None
            path = atomic_write(self.out_dir / FIGURE_DIR / name, scratch.read_bytes())
        self.drawn.append(path)
        return Figure(path, caption)

    def pick(self, path: Path, caption: str, name: str, fn, *args) -> Figure | None:
        return self.existing(path, caption) or self.draw(name, caption, fn, *args)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def analyze_result(path: Path):
    """An analyze run's result.json as the AnalyzeResult its plots take."""
    from ..analysis import AnalyzeResult

    return AnalyzeResult.from_json(path)


def locate_result(path: Path):
    """A locate run's result.json as the LocateResult its sweeps plot takes."""
    from ..locate import LocateResult

    return LocateResult.from_json(path)


def draw_analysis(path: Path, result_json: Path) -> None:
    from ..analysis.plots import plot_analysis

    plot_analysis(analyze_result(result_json), path)


def draw_probe(path: Path, result_json: Path) -> None:
    from ..analysis.plots import plot_probe

    plot_probe(analyze_result(result_json), path)


def draw_sweeps(path: Path, result_json: Path) -> None:
    from ..locate.plots import plot_sweeps

    plot_sweeps(locate_result(result_json), path)


def draw_drift(path: Path, drift: dict, band) -> None:
    from ..experiment.drift import plot_drift_overview

    plot_drift_overview({**drift, "band": band or drift.get("band")}, path)


def draw_results(path: Path, res: dict) -> None:
    """Bars of each metric after fine-tuning per scenario and method, the interval as error bars, before dashed."""
    import numpy as np

    plt = _plt()
    rows = res.get("rows") or []
    metrics = [m for m in res.get("metrics") or []
               if any((r.get("metrics") or {}).get(m, {}).get("after_mean") is not None for r in rows)]
    if not metrics:
        return
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    multi_lr = len({r.get("lr") for r in rows}) > 1
    label = lambda r: f"{r['method']} lr={fmt_lr(r.get('lr'))}" if multi_lr else str(r["method"])  # noqa: E731
    series = list(dict.fromkeys(label(r) for r in rows))
    cmap = plt.get_cmap("tab10")
    panel = max(4.0, 0.5 * len(scenarios) * len(series) + 1.5)
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(20.0, panel * len(metrics)), 3.8), squeeze=False)
    width = 0.8 / len(series)
    for ax, m in zip(axes[0], metrics):
        for k, s in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for r in rows:
                cell = (r.get("metrics") or {}).get(m) or {}
                if label(r) != s or cell.get("after_mean") is None:
                    continue
                x = scenarios.index(r["scenario"]) - 0.4 + width * (k + 0.5)
                y = cell["after_mean"]
                ci = cell.get("after_ci") or [y, y]
                xs.append(x)
                ys.append(y)
                lo.append(max(0.0, y - ci[0]))
                hi.append(max(0.0, ci[1] - y))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=cmap(k % 10), label=s)
        for i, sc in enumerate(scenarios):
            befores = {(r.get("metrics") or {}).get(m, {}).get("before") for r in rows if r["scenario"] == sc}
            befores.discard(None)
            for b in befores:
                ax.hlines(b, i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1.2)
        ax.set_xticks(np.arange(len(scenarios)), scenarios)
        ax.set_title(f"{m} after fine-tuning (dashed: before)", fontsize=10)
        ax.set_xlabel("scenario")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=RESULTS_DPI)
    plt.close(fig)

