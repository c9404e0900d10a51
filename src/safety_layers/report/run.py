"""Report: one self-contained HTML page and a Markdown twin, read from a run folder.

``report`` never recomputes: it reads the JSON and PNG files a run wrote and only draws
figures the run did not save (the results bar chart, or a plot whose PNG is missing; see
:mod:`.figures`). Model completions are never read: the report shows counts, rates and
settings only (:mod:`.sections`), and all text from the run is escaped (:mod:`.render`).

Inputs (detected from the files present):
``experiment``: a folder with ``experiment.json`` (layout in :mod:`safety_layers.experiment`);
``analyze``: an analyze run folder (``result.json`` with raw/centred curves);
``locate``: a locate run folder (``result.json`` with ``safety_layers`` and ``sweeps``);
``attention`` and ``transplant``: the run folders of those commands (:mod:`.mechanism`).
An experiment whose methods hold a band-protection scan gets the scan's section too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import __version__
from ..core.errors import SafetyLayersError
from ..core.runs import atomic_write, read_json
from ..experiment import EXPERIMENT_VERSION
from .figures import Figures
from .mechanism import attention_sections, scan_section, transplant_sections
from .render import Bullets, Section, render_html, render_markdown
from .sections import (analysis_section, analyze_summary, drift_section, experiment_summary, locate_section,
                       locate_summary, results_section, settings_section)

#: ``experiment.json`` format versions this module can read: the one :mod:`experiment` writes.
EXPERIMENT_VERSIONS = (EXPERIMENT_VERSION,)


@dataclass
class ReportConfig:
    """Settings of ``safety-layers report``."""

    run: str = field(default="", metadata={"help": "run folder: an experiment run, or an analyze or locate run"})
    out: str | None = field(default=None, metadata={
        "help": "folder for report.html and report.md, or an .html path (default: the run folder)"})
    title: str | None = field(default=None, metadata={"help": "page title (default: safety-layers report: <model>)"})


@dataclass
class ReportResult:
    kind: str                          # experiment | analyze | locate | attention | transplant
    run: str
    html: str
    markdown: str
    sections: list[str]                # ids of the sections present, in page order
    images: int                        # figures embedded in the HTML
    drawn: list[str] = field(default_factory=list)   # figures drawn from JSON (saved under report-figures/)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reading

def _read(path: Path, what: str) -> dict | None:
    """The JSON object in ``path``; None when the file does not exist."""
    return read_json(path, what) if path.is_file() else None


def _is_analyze(d: dict) -> bool:
    return {"raw", "centred", "num_layers"} <= d.keys()


def _is_locate(d: dict) -> bool:
    return {"safety_layers", "sweeps"} <= d.keys()


#: Run kinds told apart by the keys of their result.json.
_RESULT_KINDS = {"analyze": _is_analyze, "locate": _is_locate,
                 "attention": lambda d: {"shares", "pairs", "num_layers"} <= d.keys(),
                 "transplant": lambda d: {"copied_tensors", "evaluation", "layers"} <= d.keys()}


def _check_version(run: Path, exp: dict) -> None:
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


def detect(run_dir: str | Path) -> str:
    """``experiment``, ``analyze``, ``locate``, ``attention`` or ``transplant``; a SafetyLayersError otherwise."""
    run = Path(run_dir)
    expected = ("expected an experiment run folder (experiment.json) or an analyze/locate run folder "
                "(result.json)")
    if not run.is_dir():
        raise SafetyLayersError(f"run folder {run} does not exist: {expected}")
    exp = _read(run / "experiment.json", "experiment record")
    if exp is not None:
        _check_version(run, exp)
        return "experiment"
    res = _read(run / "result.json", "analyze or locate result")
    if res is not None:
        kind = next((k for k, test in _RESULT_KINDS.items() if test(res)), None)
        if kind:
            return kind
        raise SafetyLayersError(f"{run / 'result.json'} is neither an analyze result (raw/centred curves) nor a "
                                f"locate result (safety_layers/sweeps) nor an attention or transplant result: {expected}")
    raise SafetyLayersError(f"{run} holds neither experiment.json nor result.json: {expected}")


# --------------------------------------------------------------------------- assembling

def _build_experiment(run: Path, figs: Figures) -> tuple[str, list[Section]]:
    exp = _read(run / "experiment.json", "experiment record")
    cfg, env = exp.get("config") or {}, exp.get("environment") or {}
    ana = _read(run / "analysis" / "result.json", "analyze result")
    loc = _read(run / "locate" / "result.json", "locate result")
    base = _read(run / "baseline" / "eval" / "result.json", "evaluate result")
    res = _read(run / "results.json", "experiment results")
    drift = _read(run / "drift" / "drift.json", "drift record")
    cells = [c for c in (read_json(p, "cell record") for p in sorted((run / "cells").glob("*/cell.json"))) if c]
    model = cfg.get("model") or (ana or {}).get("model") or (loc or {}).get("model") or "model"
    sections = [experiment_summary(exp, model, ana, loc, base, cells, res)]
    if ana is not None:
        sections.append(analysis_section(ana, run / "analysis", figs))
    if loc is not None:
        sections.append(locate_section(loc, run / "locate", figs))
    if res is not None or cells:
        sections.append(results_section(res or {}, cells, figs))
    if drift is not None:
        sections.append(drift_section(drift, run / "drift", exp.get("band"), figs))
    scan = _read(run / "scan" / "scan.json", "scan record")
    if scan is not None:
        sections.append(scan_section(scan, run / "scan", figs))
    settings = settings_section([
        ("experiment config (experiment.json)", cfg), ("environment (experiment.json)", env),
        ("analyze config", _read(run / "analysis" / "config.json", "analyze config")),
        ("analyze environment", _read(run / "analysis" / "env.json", "analyze environment")),
        ("locate config", _read(run / "locate" / "config.json", "locate config")),
        ("locate environment", _read(run / "locate" / "env.json", "locate environment"))])
    return model, sections + ([settings] if settings else [])


def _build_analyze(run: Path, figs: Figures) -> tuple[str, list[Section]]:
    d = _read(run / "result.json", "analyze result")
    sections = [analyze_summary(d), analysis_section(d, run, figs)]
    settings = settings_section([("config", _read(run / "config.json", "analyze config")),
                                 ("environment", _read(run / "env.json", "analyze environment"))])
    return d.get("model") or "model", sections + ([settings] if settings else [])


def _build_locate(run: Path, figs: Figures) -> tuple[str, list[Section]]:
    d = _read(run / "result.json", "locate result")
    sections = [locate_summary(d), locate_section(d, run, figs)]
    settings = settings_section([("config", _read(run / "config.json", "locate config")),
                                 ("environment", _read(run / "env.json", "locate environment"))])
    return d.get("model") or "model", sections + ([settings] if settings else [])


def _build_attention(run: Path, figs: Figures) -> tuple[str, list[Section]]:
    d = _read(run / "result.json", "attention result")
    settings = settings_section([("config", _read(run / "config.json", "attention config"))])
    return d.get("model") or "model", attention_sections(d, run, figs) + ([settings] if settings else [])


def _build_transplant(run: Path, figs: Figures) -> tuple[str, list[Section]]:
    d = _read(run / "result.json", "transplant result")
    return f"transplant into {d.get('base')}", transplant_sections(d)


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
    cfg = cfg or ReportConfig(run=str(run_dir))
    run = Path(run_dir)
    kind = detect(run)
    html_path, md_path = _targets(run, out)
    figs = Figures(html_path.parent)
    build = {"experiment": _build_experiment, "analyze": _build_analyze, "locate": _build_locate,
             "attention": _build_attention, "transplant": _build_transplant}[kind]
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
