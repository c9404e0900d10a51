"""Report: one self-contained HTML page and a Markdown twin, read from a run folder.

``report`` never recomputes: it reads the JSON and PNG files a run wrote and only draws
figures the run did not save (the results bar chart, or a plot whose PNG is missing).
The HTML embeds every figure as a base64 PNG and carries its own CSS, so it opens offline
and can be mailed as one file; a Content-Security-Policy forbids anything but inline data.
Model completions are never read: the report shows counts, rates and settings only, and
all text from the run is HTML-escaped.

Inputs (detected from the files present):
``experiment``: a folder with ``experiment.json`` (layout in :mod:`safety_layers.experiment`);
``analyze``: an analyze run folder (``result.json`` with raw/centred curves);
``locate``: a locate run folder (``result.json`` with ``safety_layers`` and ``sweeps``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import SafetyLayersError
from ..experiment import EXPERIMENT_VERSION
from ..core.runs import atomic_write

#: ``experiment.json`` format versions this module can read: the one :mod:`experiment` writes.
EXPERIMENT_VERSIONS = (EXPERIMENT_VERSION,)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_DIR = "report-figures"


@dataclass
class ReportConfig:
    """Settings of ``safety-layers report``."""

    run: str = field(default="", metadata={"help": "run folder: an experiment run, or an analyze or locate run"})
    out: str | None = field(default=None, metadata={
        "help": "folder for report.html and report.md, or an .html path (default: the run folder)"})
    title: str | None = field(default=None, metadata={"help": "page title (default: safety-layers report: <model>)"})
    dpi: int = field(default=100, metadata={"help": "resolution of the figures the report draws itself"})

    def __post_init__(self):
        if self.dpi < 20:
            raise SafetyLayersError(f"--dpi must be at least 20, got {self.dpi}")


@dataclass
class ReportResult:
    kind: str                          # experiment | analyze | locate
    run: str
    html: str
    markdown: str
    sections: list[str]                # ids of the sections present, in page order
    images: int                        # figures embedded in the HTML
    drawn: list[str] = field(default_factory=list)   # figures drawn from JSON (saved under report-figures/)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- document model

@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    strong: set[int] = field(default_factory=set)   # highlighted row indices (e.g. the found band)


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Details:
    title: str
    blocks: list


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def _kv(items, caption: str = "") -> Table:
    return Table(["item", "value"], [[str(k), str(v)] for k, v in items], caption)


# --------------------------------------------------------------------------- formatting

def fmt(v, signed: bool = False) -> str:
    """A number as the report prints it: 3 significant digits below 1, else 3 decimals; '–' if missing."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:+d}" if signed else str(v)
    if isinstance(v, float):
        if v != v:
            return "–"
        spec = "+" if signed else ""
        if v == 0:
            return "0"
        if abs(v) < 1:
            return f"{v:{spec}#.3g}"
        return f"{v:{spec}.1f}" if abs(v) >= 100 else f"{v:{spec}.3f}"
    return str(v)


def fmt_lr(v) -> str:
    return f"{v:g}" if isinstance(v, float) else fmt(v)


def fmt_band(b) -> str:
    if not b:
        return "–"
    return f"{b[0]}-{b[1]}"


def fmt_ci(ci) -> str:
    if not ci or len(ci) != 2 or ci[0] is None:
        return "–"
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _short(value, limit: int = 240) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, fmt(v) if isinstance(v, (int, float, bool)) or v is None else _short(v)))
    return out


def _rate(r: dict | None) -> str:
    """``rate [ci] (count/n, judge)`` of an evaluate RateResult dict."""
    if not r or r.get("rate") is None:
        return "–"
    extra = f"{r.get('count')}/{r.get('decided', r.get('n'))}" if r.get("count") is not None else ""
    if r.get("judge"):
        extra += f", {r['judge']}" if extra else r["judge"]
    return f"{fmt(r['rate'])} {fmt_ci(r.get('ci'))}" + (f" ({extra})" if extra else "")


# --------------------------------------------------------------------------- reading

def _read_json(path: Path, what: str) -> dict | None:
    """The JSON object in ``path``; None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetyLayersError(f"{path} is not valid JSON ({e.__class__.__name__}): rerun the {what} step "
                                "that wrote it") from None
    if not isinstance(data, dict):
        raise SafetyLayersError(f"{path} holds a {type(data).__name__}, not a JSON object: rerun the {what} step")
    return data


def _is_analyze(d: dict) -> bool:
    return {"raw", "centred", "num_layers"} <= d.keys()


def _is_locate(d: dict) -> bool:
    return {"safety_layers", "sweeps"} <= d.keys()


def detect(run_dir: str | Path) -> str:
    """``experiment``, ``analyze`` or ``locate``; a SafetyLayersError for anything else."""
    run = Path(run_dir)
    expected = ("expected an experiment run folder (experiment.json) or an analyze/locate run folder "
                "(result.json)")
    if not run.is_dir():
        raise SafetyLayersError(f"run folder {run} does not exist: {expected}")
    exp = _read_json(run / "experiment.json", "experiment")
    if exp is not None:
        version = exp.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise SafetyLayersError(f"{run / 'experiment.json'} has no integer 'version': it was not written by "
                                    "safety-layers experiment; rerun the experiment")
        if version not in EXPERIMENT_VERSIONS:
            known = ", ".join(map(str, EXPERIMENT_VERSIONS))
            hint = "upgrade safety-layers (pip install -U safety-layers)" if version > max(EXPERIMENT_VERSIONS) \
                else "rerun the experiment with this version"
            raise SafetyLayersError(f"{run / 'experiment.json'} has format version {version}, this safety-layers "
                                    f"reads version {known}: {hint}")
        return "experiment"
    res = _read_json(run / "result.json", "analyze or locate")
    if res is not None:
        if _is_analyze(res):
            return "analyze"
        if _is_locate(res):
            return "locate"
        raise SafetyLayersError(f"{run / 'result.json'} is neither an analyze result (raw/centred curves) nor a "
                                f"locate result (safety_layers/sweeps): {expected}")
    raise SafetyLayersError(f"{run} holds neither experiment.json nor result.json: {expected}")


# --------------------------------------------------------------------------- figures

class _Figures:
    """Figures of the report: PNGs the run wrote, or ones drawn here into ``report-figures/``."""

    def __init__(self, out_dir: Path, dpi: int):
        self.out_dir, self.dpi = out_dir, dpi
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
        import tempfile

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


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)


def _analyze_object(d: dict):
    from ..analysis.run import AnalyzeResult, Curves

    def build(cls, data):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    return build(AnalyzeResult, {**d, "raw": build(Curves, d["raw"]), "centred": build(Curves, d["centred"])})


def _draw_analysis(path: Path, d: dict, dpi: int) -> None:
    from ..analysis.plots import plot_analysis

    plot_analysis(_analyze_object(d), path)


def _draw_probe(path: Path, d: dict, dpi: int) -> None:
    from ..analysis.plots import plot_probe

    plot_probe(_analyze_object(d), path)


def _draw_sweeps(path: Path, loc: dict, dpi: int) -> None:
    plt = _plt()
    sweeps = [s for s in loc["sweeps"] if s.get("rows")]
    if not sweeps:
        return
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    found = list(loc.get("safety_layers") or [])
    base = (loc.get("baseline") or {}).get("count")
    for ax, s in zip(axes[0], sweeps):
        labels = [fmt_band(r["range"]) for r in s["rows"]]
        gen = [r.get("count") for r in s["rows"]]
        prox = [r.get("proxy_count") for r in s["rows"]]
        colors = ["tab:red" if list(r["range"]) == found else "tab:blue" for r in s["rows"]]
        x = range(len(labels))
        ax.bar(x, [g if g is not None else 0 for g in gen], color=colors, alpha=0.75, label="generation count")
        if any(p is not None for p in prox):
            ax.plot([i for i, p in zip(x, prox) if p is not None], [p for p in prox if p is not None],
                    "k.", ms=8, label="proxy count")
        if base is not None:
            ax.axhline(base, color="grey", ls="--", lw=1, label=f"baseline R_o={base}")
        ax.set_xticks(list(x), labels, rotation=45, fontsize=8)
        ax.set_title(f"{s.get('stage')} (fixed {s.get('fixed')})", fontsize=10)
        ax.set_xlabel("scaled range")
        ax.set_ylabel("over-rejection refusals")
        ax.legend(fontsize=7)
    fig.suptitle(f"{loc.get('model')}: {loc.get('direction')} sweep, alpha={loc.get('alpha')}, "
                 f"found {fmt_band(found)}", fontsize=10)
    _save(fig, path, dpi)


def _draw_results(path: Path, res: dict, dpi: int) -> None:
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
    _save(fig, path, dpi)


def _draw_drift(path: Path, drift: dict, band, dpi: int) -> None:
    plt = _plt()
    cells = drift.get("cells") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for cid, c in cells.items():
        norms = (c.get("weight_change") or {}).get("per_layer_rel_norm")
        if norms:
            axes[0].plot(range(len(norms)), norms, marker="o", ms=3, label=cid)
        if c.get("gap_curve"):
            axes[1].plot(range(len(c["gap_curve"])), c["gap_curve"], lw=1, label=cid)
    if drift.get("baseline_gap_curve"):
        g = drift["baseline_gap_curve"]
        axes[1].plot(range(len(g)), g, color="black", lw=2, label="before fine-tuning")
    for ax in axes:
        if band:
            ax.axvspan(band[0] - 0.5, band[1] + 0.5, color="tab:red", alpha=0.12)
        ax.set_xlabel("layer (0-based)")
        if ax.lines:
            ax.legend(fontsize=6)
    axes[0].set_title("relative weight change per layer", fontsize=10)
    axes[1].set_title("angle gap after fine-tuning (degrees)", fontsize=10)
    _save(fig, path, dpi)


# --------------------------------------------------------------------------- sections

def _analysis_section(d: dict, run: Path, figs: _Figures) -> Section:
    sec = Section("analysis", "Existence analysis")
    sec.blocks.append(Para(
        f"Last-token cosine similarity of {d.get('n_normal')} normal (N) and {d.get('n_malicious')} malicious (M) "
        f"prompts per layer, {d.get('pairs')} sampled pairs per type, template {d.get('template')}. The angle gap "
        "is angle(N-M) − angle(N-N) in degrees; the initial range is where it rises."))
    boot = d.get("bootstrap") or {}
    items = [("model", d.get("model")), ("layers", d.get("num_layers")),
             ("prompt sets", f"{d.get('normal')} (N={d.get('n_normal')}) vs {d.get('malicious')} "
                             f"(M={d.get('n_malicious')})"),
             ("initial range", fmt_band(d.get("initial_range")) + f" (from the {d.get('range_curve')} gap)")]
    if boot.get("samples"):
        items.append(("bootstrap", f"start {fmt_ci(boot.get('start_ci'))}, end {fmt_ci(boot.get('end_ci'))}, "
                                   f"mode {fmt_band(boot.get('mode'))} in {fmt(boot.get('mode_share'))} of "
                                   f"{boot.get('samples')} resamples, no range in {boot.get('no_range', 0)}"))
    if d.get("reference"):
        ref = d["reference"]
        items.append(("reference model",
                      f"{ref.get('model')} (its initial range {fmt_band(ref.get('initial_range'))})"))
    items.append(("range rule", d.get("range_rule") or "–"))
    sec.blocks.append(_kv(items))
    for fig in (figs.pick(run / "analysis.png", "cosine similarity (mean ± std) per pair type and angle gap",
                          "analysis.png", _draw_analysis, d, figs.dpi),
                figs.pick(run / "probe.png", "held-out accuracy of a linear probe N vs M per layer",
                          "probe.png", _draw_probe, d, figs.dpi) if d.get("probe_accuracy") else None):
        if fig:
            sec.blocks.append(fig)
    raw, cen = d["raw"], d["centred"]
    probe = d.get("probe_accuracy") or []
    ref = d.get("reference") or {}
    header = ["layer", "N-N cos", "M-M cos", "N-M cos", "raw gap °", "centred gap °"]
    header += ["probe acc."] if probe else []
    header += ["centred gap − reference °"] if ref.get("centred_gap_difference") else []
    rng = d.get("initial_range")
    rows, strong = [], set()
    for i in range(d["num_layers"]):
        row = [str(i), fmt(raw["nn_exact"][i]), fmt(raw["mm_exact"][i]), fmt(raw["nm_exact"][i]),
               fmt(raw["gap_exact"][i]), fmt(cen["gap_exact"][i])]
        row += [fmt(probe[i])] if probe else []
        row += [fmt(ref["centred_gap_difference"][i])] if ref.get("centred_gap_difference") else []
        rows.append(row)
        if rng and rng[0] <= i <= rng[1]:
            strong.add(i)
    sec.blocks.append(Details("per-layer numbers (exact all-pairs means; initial range highlighted)",
                              [Table(header, rows, "per-layer statistics", strong)]))
    if d.get("notes"):
        sec.blocks.append(Bullets(list(d["notes"])))
    return sec


def _locate_section(loc: dict, run: Path, figs: _Figures) -> Section:
    sec = Section("localization", "Localization evidence")
    found = list(loc.get("safety_layers") or loc.get("range") or [])
    base = loc.get("baseline") or {}
    sp = loc.get("proxy_generation_spearman") or {}
    sec.blocks.append(Para(
        f"Scaling each candidate range by alpha={fmt(loc.get('alpha'))} ({loc.get('direction')}) and counting "
        f"refusals on {loc.get('n_prompts')} over-rejection prompts ({loc.get('over_rejection')}); the safety layers "
        f"are the range that {'maximises' if loc.get('direction') == 'up' else 'minimises'} the count."))
    sec.blocks.append(_kv([
        ("safety layers", f"{fmt_band(found)} ({fmt(loc.get('count'))} refusals)"),
        ("baseline R_o", f"{fmt(base.get('count'))} (proxy {fmt(base.get('proxy_count'))})"),
        ("initial range", f"{fmt_band(loc.get('init_range'))} ({loc.get('init_source')})"),
        ("judge / template", f"{loc.get('judge')} / {loc.get('template')}"),
        ("proxy vs generation Spearman", f"rho {fmt(sp.get('rho'))} (n={fmt(sp.get('n'))})"),
        ("model", f"{loc.get('model')} ({loc.get('num_layers')} layers)"),
    ]))
    if loc.get("alpha_search"):
        rows = [[fmt(a.get("alpha")), fmt(a.get("std")), fmt(a.get("threshold")),
                 _short(" ".join(fmt(c) for c in a.get("counts") or []), 120)] for a in loc["alpha_search"]]
        chosen = {i for i, a in enumerate(loc["alpha_search"]) if a.get("alpha") == loc.get("alpha")}
        sec.blocks.append(Table(["alpha", "std of counts", "threshold", "counts"], rows,
                                "alpha search (chosen alpha highlighted)", chosen))
    for s in loc.get("sweeps") or []:
        rows, strong = [], set()
        for i, r in enumerate(s.get("rows") or []):
            rows.append([fmt_band(r.get("range")), fmt(r.get("proxy_count")), fmt(r.get("count")),
                         fmt(bool(r.get("confirmed")))])
            if list(r.get("range") or []) == found:
                strong.add(i)
        sec.blocks.append(Table(["scaled range", "proxy count", "refusals R_o", "confirmed by generation"], rows,
                                f"sweep {s.get('stage')} (fixed bound {s.get('fixed')}); baseline R_o = "
                                f"{fmt(base.get('count'))}", strong))
    fig = figs.pick(run / "sweeps.png", "over-rejection refusals per scaled range", "sweeps.png",
                    _draw_sweeps, loc, figs.dpi)
    if fig:
        sec.blocks.append(fig)
    san = loc.get("sanity")
    if san:
        down, up = san.get("down") or {}, san.get("up") or {}
        sec.blocks.append(Table(
            ["check", "alpha", "harmful rate"],
            [["unscaled", "1", fmt(san.get("baseline_harmful_rate"))],
             ["scaled down (should rise)", fmt(down.get("alpha")), fmt(down.get("harmful_rate"))],
             ["scaled up (should fall)", fmt(up.get("alpha")), fmt(up.get("harmful_rate"))]],
            f"sanity check on {san.get('malicious')}: {'passed' if san.get('passed') else 'FAILED'}"))
    if loc.get("notes"):
        sec.blocks.append(Bullets(list(loc["notes"])))
    if loc.get("seconds"):
        sec.blocks.append(Details("timings (seconds)", [_kv(_flatten(loc["seconds"]))]))
    return sec


def _results_section(res: dict, cells: list[dict], figs: _Figures) -> Section:
    sec = Section("results", "Results")
    rows = res.get("rows") or []
    for m in res.get("metrics") or []:
        table = []
        for r in rows:
            c = (r.get("metrics") or {}).get(m)
            if c is None:
                continue
            seeds = fmt(r.get("n_seeds")) + (f" ({len(r['failed'])} failed)" if r.get("failed") else "")
            table.append([str(r.get("scenario")), str(r.get("method")), fmt_lr(r.get("lr")), seeds,
                          fmt(c.get("before")), fmt(c.get("after_mean")), fmt_ci(c.get("after_ci")),
                          fmt(c.get("delta"), signed=True)])
        if table:
            sec.blocks.append(Table(["scenario", "method", "lr", "seeds", "before", "after (mean)", "interval",
                                     "Δ"], table, m))
    if res.get("interval"):
        sec.blocks.append(Para(f"interval: {res['interval']}"))
    fig = figs.draw("results.png", "metrics after fine-tuning per scenario and method (error bars: interval)",
                    _draw_results, res, figs.dpi) if rows else None
    if fig:
        sec.blocks.append(fig)
    if cells:
        counts = {}
        for c in cells:
            counts[c.get("status", "unknown")] = counts.get(c.get("status", "unknown"), 0) + 1
        sec.blocks.append(Para("cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))))
        body = []
        for c in cells:
            m = c.get("metrics") or {}
            body.append([str(c.get("id")), str(c.get("status")), fmt(m.get("harmful_rate")),
                         fmt(m.get("over_refusal_rate")), fmt(m.get("rouge_l")), fmt(m.get("harmful_score")),
                         _short(c.get("error"), 160) if c.get("error") else ""])
        sec.blocks.append(Details("cells", [Table(["cell", "status", "harmful rate", "over-refusal", "Rouge-L",
                                                   "harmful score", "error"], body, "one fine-tuning run each")]))
    return sec


def _drift_section(drift: dict, drift_dir: Path, band, figs: _Figures) -> Section:
    sec = Section("drift", "Drift after fine-tuning")
    cells = drift.get("cells") or {}
    band = band or drift.get("band")
    hold_keys = list(dict.fromkeys(k for c in cells.values() for k, v in (c.get("band_holds") or {}).items()
                                   if isinstance(v, (int, float, bool))))
    rows = []
    for cid, c in cells.items():
        norms = (c.get("weight_change") or {}).get("per_layer_rel_norm") or []
        inside = [v for i, v in enumerate(norms) if band and band[0] <= i <= band[1] and v is not None]
        outside = [v for i, v in enumerate(norms) if not (band and band[0] <= i <= band[1]) and v is not None]
        top = max(range(len(norms)), key=lambda i: norms[i] or 0.0) if norms else None
        holds = c.get("band_holds") or {}
        rows.append([cid, fmt(sum(inside) / len(inside)) if inside else "–",
                     fmt(sum(outside) / len(outside)) if outside else "–", fmt(top)]
                    + [fmt(holds.get(k)) if isinstance(holds.get(k), (int, float, bool)) else "–"
                       for k in hold_keys])
    if rows:
        sec.blocks.append(Table(["cell", f"mean rel. change in band {fmt_band(band)}", "mean rel. change outside",
                                 "most changed layer"] + hold_keys, rows, "weight change and band check per cell"))
    pngs = sorted(drift_dir.glob("*.png"))
    added = [f for f in (figs.existing(p, p.stem.replace("_", " ")) for p in pngs) if f]
    if not added and cells:
        fig = figs.draw("drift.png", "relative weight change and angle gap after fine-tuning", _draw_drift,
                        drift, band, figs.dpi)
        added = [fig] if fig else []
    sec.blocks += added
    return sec


def _settings_section(parts: list[tuple[str, dict | None]]) -> Section | None:
    blocks = [Details(title, [_kv(_flatten(d))]) for title, d in parts if d]
    return Section("settings", "Settings and versions", blocks) if blocks else None


# --------------------------------------------------------------------------- assembling

def _summary(items, headline: list[str]) -> Section:
    sec = Section("summary", "Summary", [_kv(items)])
    if headline:
        sec.blocks.append(Bullets(headline))
    return sec


def _cells(run: Path) -> list[dict]:
    return [c for c in (_read_json(p, "experiment") for p in sorted((run / "cells").glob("*/cell.json"))) if c]


def _build_experiment(run: Path, figs: _Figures) -> tuple[str, list[Section]]:
    exp = _read_json(run / "experiment.json", "experiment")
    cfg, env = exp.get("config") or {}, exp.get("environment") or {}
    ana = _read_json(run / "analysis" / "result.json", "analyze")
    loc = _read_json(run / "locate" / "result.json", "locate")
    base = _read_json(run / "baseline" / "eval" / "result.json", "evaluate")
    res = _read_json(run / "results.json", "experiment")
    drift = _read_json(run / "drift" / "drift.json", "experiment")
    cells = _cells(run)
    band = exp.get("band")
    model = cfg.get("model") or (ana or {}).get("model") or (loc or {}).get("model") or "model"

    items = [("model", model), ("band", f"{fmt_band(band)} (from {exp.get('band_source', '–')})")]
    if ana is not None:
        items.append(("initial range (analyze)", fmt_band(ana.get("initial_range"))))
    if loc is not None:
        items.append(("safety layers (locate)", f"{fmt_band(loc.get('safety_layers'))}, "
                                                f"{fmt(loc.get('count'))} refusals vs baseline "
                                                f"{fmt((loc.get('baseline') or {}).get('count'))}"))
    if base is not None:
        items += [("baseline harmful rate", _rate(base.get("harmful"))),
                  ("baseline over-refusal", _rate(base.get("over_refusal")))]
    if cells:
        done = sum(c.get("status") == "done" for c in cells)
        items.append(("cells", f"{done} of {len(cells)} done"))
    items += [("started", exp.get("started") or "–"), ("finished", exp.get("finished") or "not finished")]
    headline = []
    if res:
        metric = "harmful_rate" if "harmful_rate" in (res.get("metrics") or []) else (res.get("metrics") or [None])[0]
        for sc in dict.fromkeys(r.get("scenario") for r in res.get("rows") or []):
            rs = [r for r in res["rows"] if r.get("scenario") == sc and metric in (r.get("metrics") or {})]
            if rs:
                before = rs[0]["metrics"][metric].get("before")
                after = ", ".join(f"{r.get('method')} {fmt(r['metrics'][metric].get('after_mean'))}" for r in rs)
                headline.append(f"{sc}: {metric} before {fmt(before)}; after {after}")
    sections = [_summary(items, headline)]
    if ana is not None:
        sections.append(_analysis_section(ana, run / "analysis", figs))
    if loc is not None:
        sections.append(_locate_section(loc, run / "locate", figs))
    if res is not None or cells:
        sections.append(_results_section(res or {}, cells, figs))
    if drift is not None:
        sections.append(_drift_section(drift, run / "drift", band, figs))
    settings = _settings_section([
        ("experiment config (experiment.json)", cfg), ("environment (experiment.json)", env),
        ("analyze config", _read_json(run / "analysis" / "config.json", "analyze")),
        ("analyze environment", _read_json(run / "analysis" / "env.json", "analyze")),
        ("locate config", _read_json(run / "locate" / "config.json", "locate")),
        ("locate environment", _read_json(run / "locate" / "env.json", "locate"))])
    if settings:
        sections.append(settings)
    return model, sections


def _build_analyze(run: Path, figs: _Figures) -> tuple[str, list[Section]]:
    d = _read_json(run / "result.json", "analyze")
    items = [("model", d.get("model")), ("layers", d.get("num_layers")),
             ("initial range", fmt_band(d.get("initial_range"))), ("template", d.get("template"))]
    probe = d.get("probe_accuracy") or []
    headline = [f"best probe accuracy {fmt(max(probe))} at layer {probe.index(max(probe))}"] if probe else []
    gap = (d.get("centred") or {}).get("gap_exact") or []
    if gap:
        headline.append(f"largest centred gap {fmt(max(gap))}° at layer {gap.index(max(gap))}")
    sections = [_summary(items, headline), _analysis_section(d, run, figs)]
    settings = _settings_section([("config", _read_json(run / "config.json", "analyze")),
                                  ("environment", _read_json(run / "env.json", "analyze"))])
    return d.get("model") or "model", sections + ([settings] if settings else [])


def _build_locate(run: Path, figs: _Figures) -> tuple[str, list[Section]]:
    d = _read_json(run / "result.json", "locate")
    items = [("model", d.get("model")), ("safety layers", fmt_band(d.get("safety_layers"))),
             ("refusals of that band", fmt(d.get("count"))),
             ("baseline R_o", fmt((d.get("baseline") or {}).get("count"))),
             ("alpha", f"{fmt(d.get('alpha'))} ({d.get('direction')})")]
    san = d.get("sanity") or {}
    headline = [f"sanity check {'passed' if san.get('passed') else 'failed'}"] if san else []
    sections = [_summary(items, headline), _locate_section(d, run, figs)]
    settings = _settings_section([("config", _read_json(run / "config.json", "locate")),
                                  ("environment", _read_json(run / "env.json", "locate"))])
    return d.get("model") or "model", sections + ([settings] if settings else [])


# --------------------------------------------------------------------------- rendering

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px;background:#fff}
h1{font-size:1.6em;margin:.2em 0 .4em}h2{border-bottom:2px solid #d5dae3;padding-bottom:4px;margin-top:1.8em}
nav a{margin-right:14px;color:#2456a6;text-decoration:none}nav{margin-bottom:10px}
table{border-collapse:collapse;margin:10px 0 16px;font-size:.9em}
th,td{border:1px solid #d5dae3;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#eef1f6}tr.found td{background:#fde7e4;font-weight:600}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
figure{margin:12px 0}img{max-width:100%;height:auto;border:1px solid #e3e6ec}
figcaption{font-size:.85em;color:#5a6372}details{margin:6px 0}summary{cursor:pointer;color:#2456a6}
footer{margin-top:32px;font-size:.8em;color:#6b7380}
""".strip()

#: Marks on <body> how many images decoded, for headless-browser checks and CI.
LOAD_SCRIPT = ("window.addEventListener('load',function(){var a=Array.prototype.slice.call(document.images);"
               "document.body.dataset.imagesTotal=a.length;document.body.dataset.imagesLoaded="
               "a.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;});")

_esc = html.escape


def _html_block(b) -> str:
    if isinstance(b, Para):
        return f"<p>{_esc(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        cap = f"<caption>{_esc(b.caption)}</caption>" if b.caption else ""
        head = "".join(f"<th>{_esc(h)}</th>" for h in b.header)
        body = "".join(("<tr class=\"found\">" if i in b.strong else "<tr>") +
                       "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(b.rows))
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Figure):
        data = base64.b64encode(b.path.read_bytes()).decode("ascii")
        return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{_esc(b.caption)}\">"
                f"<figcaption>{_esc(b.caption)}</figcaption></figure>")
    if isinstance(b, Details):
        return f"<details><summary>{_esc(b.title)}</summary>" + "".join(_html_block(x) for x in b.blocks) + "</details>"
    raise TypeError(type(b))


def render_html(title: str, sections: list[Section], footer: str) -> str:
    digest = base64.b64encode(hashlib.sha256(LOAD_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    nav = "".join(f"<a href=\"#{_esc(s.id)}\">{_esc(s.title)}</a>" for s in sections)
    body = "".join(f"<section id=\"{_esc(s.id)}\"><h2>{_esc(s.title)}</h2>" + "".join(_html_block(b) for b in s.blocks)
                   + "</section>" for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body><main><h1>{_esc(title)}</h1>"
            f"<nav>{nav}</nav>\n{body}\n<footer>{_esc(footer)}</footer></main><script>{LOAD_SCRIPT}</script>"
            "</body></html>\n")


def _md(text: str) -> str:
    out = html.escape(str(text), quote=False).replace("\n", " ")
    for ch in "\\`*[]|":
        out = out.replace(ch, "\\" + ch)
    return out


def _md_block(b, md_dir: Path) -> str:
    if isinstance(b, Para):
        return _md(b.text)
    if isinstance(b, Bullets):
        return "\n".join(f"- {_md(i)}" for i in b.items)
    if isinstance(b, Table):
        lines = [f"**{_md(b.caption)}**", ""] if b.caption else []
        lines.append("| " + " | ".join(_md(h) for h in b.header) + " |")
        lines.append("|" + "---|" * len(b.header))
        for i, row in enumerate(b.rows):
            cells = [f"**{_md(c)}**" if i in b.strong and c else _md(c) for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    if isinstance(b, Figure):
        rel = Path(os.path.relpath(b.path.resolve(), md_dir.resolve())).as_posix()
        return f"![{_md(b.caption)}]({urllib.parse.quote(rel)})"
    if isinstance(b, Details):
        return f"#### {_md(b.title)}\n\n" + "\n\n".join(_md_block(x, md_dir) for x in b.blocks)
    raise TypeError(type(b))


def render_markdown(title: str, sections: list[Section], footer: str, md_dir: Path) -> str:
    parts = [f"# {_md(title)}"]
    for s in sections:
        parts.append(f"## {_md(s.title)}")
        parts += [_md_block(b, md_dir) for b in s.blocks]
    parts.append(f"*{_md(footer)}*")
    return "\n\n".join(parts) + "\n"


def _targets(run: Path, out) -> tuple[Path, Path]:
    if out is None:
        return run / "report.html", run / "report.md"
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        return out, out.with_suffix(".md")
    if out.exists() and not out.is_dir():
        raise SafetyLayersError(f"--out {out} is a file: give a folder or a path ending in .html")
    return out / "report.html", out / "report.md"


def write_report(run_dir: str | Path, out: str | Path | None = None,
                 cfg: ReportConfig | None = None) -> ReportResult:
    """Write ``report.html`` (self-contained) and ``report.md`` for a run folder.

    ``out`` is a folder or an ``.html`` path (default: the run folder); figures the report
    draws itself go to ``report-figures/`` beside the HTML, so the Markdown can link them.
    """
    from .. import __version__

    cfg = cfg or ReportConfig(run=str(run_dir))
    run = Path(run_dir)
    kind = detect(run)
    html_path, md_path = _targets(run, out)
    figs = _Figures(html_path.parent, cfg.dpi)
    build = {"experiment": _build_experiment, "analyze": _build_analyze, "locate": _build_locate}[kind]
    try:
        model, sections = build(run, figs)
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise SafetyLayersError(f"{run} has a {kind} file with missing or malformed fields ({err.__class__.__name__}: "
                                f"{err}): rerun the {kind} step that wrote it") from None
    if figs.notes:
        sections.append(Section("notes", "Report notes", [Bullets(figs.notes)]))
    title = cfg.title or f"safety-layers report: {model}"
    footer = (f"safety-layers {__version__}, {kind} run {run.resolve()}, written "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Counts and rates only; completions stay in the run's files.")
    page = render_html(title, sections, footer)
    atomic_write(html_path, page)
    atomic_write(md_path, render_markdown(title, sections, footer, md_path.parent))
    return ReportResult(kind=kind, run=str(run), html=str(html_path), markdown=str(md_path),
                        sections=[s.id for s in sections], images=page.count("<img "),
                        drawn=[str(p) for p in figs.drawn], notes=figs.notes)


def report(cfg: ReportConfig) -> ReportResult:
    """The ``report`` step: :func:`write_report` for ``cfg.run``."""
    if not cfg.run:
        raise SafetyLayersError("no run folder given: pass the folder an experiment, analyze or locate run wrote")
    return write_report(cfg.run, cfg.out, cfg)
