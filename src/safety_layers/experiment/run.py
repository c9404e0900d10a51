"""The SPPFT experiment of paper.md §4-5: scenarios x methods x learning rates x seeds, resumable.

Protocol (:func:`run_experiment`):

1. load the model; find its band: the config's ``band``, else a ``locate`` run
   (:mod:`safety_layers.locate`), else the ``analysis`` run's initial range;
2. evaluate the untuned model once (``baseline/eval``);
3. build each scenario's training file from the benign instruction file (``data/``);
4. for every cell (scenario, method, lr, seed): fine-tune a fresh copy of the model,
   evaluate it, compute its drift diagnostics (:mod:`safety_layers.experiment.drift`), delete the tuned
   weights (unless ``keep_models``) and write ``cells/<id>/cell.json``;
5. aggregate the cells into ``results.json`` / ``results.md``: every metric before and after,
   the change, and the mean over seeds with a 95% Student-t interval, clipped to the metric's
   range (null for one seed).

Cell ids are ``<scenario>__<method>__lr<lr:g>__seed<seed>``, e.g.
``implicit__sppft__lr0.0001__seed0``. Methods: ``full``, ``sppft``, ``lora``, ``sppft-lora``,
``freeze-before`` / ``freeze-after`` (the ablation of Tab.8 with a band of the same size right
before / after the located one, clipped at the model's edge) and ``freeze:A-B`` (any band,
id ``freeze-A-B``; the paper's Tab.8 freezes e.g. ``freeze:0-5`` and ``freeze:13-31``).
Scenarios: ``normal``, ``implicit``, ``backdoor``, ``harmful-p<p>`` (``harmful`` is p=0.1).

Resume: a cell whose cell.json says ``done`` is skipped; ``running`` (interrupted) and
``failed`` cells run again. A cell that raises is recorded with its error and the others go
on. A rerun may add scenarios, methods, learning rates or seeds; changing anything that
decides what a finished cell measured (model, data, training or evaluation settings) is an
error, since the old and new cells would not compare.

The experiment runs on one process; each cell trains on the Hugging Face Trainer, which
uses a GPU when there is one. Two copies of the model are held at once (the untuned one,
kept for the baseline and drift, and the one being tuned).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange

EXPERIMENT_VERSION = 1
BASE_METHODS = ("full", "sppft", "freeze-before", "freeze-after", "lora", "sppft-lora")
SCENARIO_KINDS = ("normal", "implicit", "backdoor", "harmful")
METRICS = ("harmful_rate", "over_refusal_rate", "harmful_score", "rouge_l")
METRIC_LABELS = {"harmful_rate": "harmful rate R_h", "over_refusal_rate": "over-refusal rate",
                 "harmful_score": "harmful score S_h", "rouge_l": "Rouge-L"}
#: Settings a rerun may change: they add or drop cells, or only change what is written.
GRID_FIELDS = ("name", "scenarios", "methods", "lrs", "lr_overrides", "seeds", "keep_models", "drift")
_SECTION_SKIP = ("model", "out", "overwrite", "progress")
#: A new run folder may already hold this folder: files the config points to (the demo's data).
INPUTS = "inputs"


# --------------------------------------------------------------------------- configuration

@dataclass
class ExperimentConfig:
    """One SPPFT experiment (``safety-layers experiment --config run.yaml``)."""

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "model alias, folder or hub id"})
    name: str | None = field(default=None, metadata={
        "help": "label; picks one document of a YAML file that holds several"})
    band: str | None = field(default=None, metadata={
        "help": "the safety band, 0-based inclusive (e.g. 6-12); None: locate it or read analyze's initial range"})
    locate: dict | None = field(default=None, metadata={
        "help": "LocateConfig settings ({} = defaults): find the band with safety_layers.locate"})
    analysis: dict | None = field(default=None, metadata={
        "help": "AnalyzeConfig settings: run the existence analysis (its initial range is the band of last resort)"})
    data: str | None = field(default=None, metadata={
        "help": "benign instruction file (JSON/JSONL/CSV of instruction, input, output) the scenarios are built from"})
    n: int | dict | None = field(default=None, metadata={
        "help": "rows per scenario (backdoor: per half; harmful: normal rows); an int or {scenario: n}; None: all"})
    data_seed: int = field(default=0, metadata={"help": "seed of the scenario row sampling (same data for every seed)"})
    harmful_data: str | None = field(default=None, metadata={
        "help": "harmful pairs for the harmful scenario, e.g. AdvBench harmful_behaviors.csv"})
    scenario_options: dict = field(default_factory=dict, metadata={
        "help": "ScenarioConfig options: prefix, trigger, trigger_position"})
    scenarios: list = field(default_factory=lambda: ["normal", "implicit"], metadata={
        "help": "normal, implicit, backdoor, harmful-p<p> (harmful = harmful-p0.1)"})
    methods: list = field(default_factory=lambda: ["full", "sppft"], metadata={
        "help": f"{', '.join(BASE_METHODS)}, freeze:A-B"})
    lrs: list = field(default_factory=lambda: [1e-4], metadata={"help": "learning rates"})
    lr_overrides: dict = field(default_factory=dict, metadata={
        "help": "learning rates per scenario kind or label, e.g. {harmful: [1e-5]} (paper Tab.6)"})
    seeds: list = field(default_factory=lambda: [0], metadata={"help": "training seeds"})
    epochs: float = field(default=3.0, metadata={"help": "training epochs (paper: 3)"})
    batch_size: int = field(default=4, metadata={"help": "per-device batch size (paper: 4)"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps (paper's code: 32)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (paper: 100)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    max_length: int = field(default=256, metadata={"help": "tokens per training example (paper: 256)"})
    template: str = field(default="chat", metadata={"help": "prompt template for training, evaluation and analysis"})
    train_on_inputs: bool = field(default=False, metadata={"help": "loss on prompt tokens too (paper's code)"})
    paper: bool = field(default=False, metadata={"help": "paper mode: Alpaca template, loss on inputs, paper evaluation"})
    freeze_norms: bool = field(default=False, metadata={"help": "also freeze the band's norms"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype (paper: float32)"})
    training_args: dict = field(default_factory=dict, metadata={
        "help": "any other transformers TrainingArguments, e.g. {bf16: true, gradient_checkpointing: true}"})
    evaluate: dict = field(default_factory=dict, metadata={
        "help": "EvaluateConfig settings: malicious, over_rejection, quality, limit, max_new_tokens, judges, judge_model..."})
    drift: dict | bool = field(default_factory=dict, metadata={"help": "DriftConfig settings, or false to skip drift"})
    keep_models: bool = field(default=False, metadata={"help": "keep each tuned model (disk!) instead of deleting it"})

    def __post_init__(self):
        for name in ("scenarios", "methods", "lrs", "seeds"):
            v = getattr(self, name)
            if isinstance(v, (str, int, float)):
                setattr(self, name, [v])
            if not getattr(self, name):
                raise SafetyLayersError(f"{name} is empty: give at least one")
        self.scenarios = [scenario_label(s) for s in self.scenarios]
        self.methods = [method_label(m) for m in self.methods]
        for name in ("scenarios", "methods"):
            dup = sorted({x for x in getattr(self, name) if getattr(self, name).count(x) > 1})
            if dup:
                raise SafetyLayersError(f"{name} lists {', '.join(dup)} twice")
        self.lrs = [_lr(x) for x in self.lrs]
        self.seeds = [_int(x, "seed") for x in self.seeds]
        for name in ("lrs", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise SafetyLayersError(f"{name} lists a value twice: {values}")
        for key, lrs in self.lr_overrides.items():
            if key not in SCENARIO_KINDS and key not in self.scenarios:
                raise SafetyLayersError(f"lr_overrides key {key!r} is neither a scenario kind "
                                        f"({', '.join(SCENARIO_KINDS)}) nor one of the scenarios {self.scenarios}")
            self.lr_overrides[key] = [_lr(x) for x in (lrs if isinstance(lrs, list) else [lrs])]
        if self.band is not None:
            self.band = str(LayerRange.parse(self.band))
            if self.locate is not None:
                raise SafetyLayersError("give either band: START-END or a locate section, not both")
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise SafetyLayersError("epochs must be > 0, batch_size and grad_accum >= 1, warmup_steps >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise SafetyLayersError(f"max_steps must be >= 1, got {self.max_steps}")
        if isinstance(self.n, dict):
            for k, v in self.n.items():
                if k not in SCENARIO_KINDS and k not in self.scenarios:
                    raise SafetyLayersError(f"n key {k!r} is neither a scenario kind nor one of {self.scenarios}")
                _int(v, f"n[{k}]")
        elif self.n is not None:
            _int(self.n, "n")
        for name in ("locate", "analysis"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise SafetyLayersError(f"{name} must be a mapping of settings ({{}} for the defaults)")
        _check_keys("scenario_options", self.scenario_options, ("prefix", "trigger", "trigger_position"))
        if any(parse_scenario(s)[0] == "harmful" for s in self.scenarios) and not self.harmful_data:
            raise SafetyLayersError("the harmful scenario needs harmful_data: a file of harmful pairs "
                                    "(e.g. AdvBench harmful_behaviors.csv)")
        self.drift_config()
        self.evaluate_config()
        self.analyze_config()

    # ----- sections as the dataclasses they fill

    def evaluate_config(self, progress: bool = True):
        from ..evaluate.run import EvaluateConfig

        _check_keys("evaluate", self.evaluate, _fields(EvaluateConfig, _SECTION_SKIP))
        base = {"template": self.template, "paper": self.paper}
        return EvaluateConfig(**{**base, **self.evaluate, "model": self.model, "progress": progress})

    def analyze_config(self, progress: bool = True):
        from ..analysis.run import AnalyzeConfig

        section = self.analysis or {}
        _check_keys("analysis", section, _fields(AnalyzeConfig, _SECTION_SKIP))
        base = {"template": self.template, "paper": self.paper}
        return AnalyzeConfig(**{**base, **section, "model": self.model, "progress": progress})

    def drift_config(self):
        from .drift import DriftConfig

        return DriftConfig.from_value(self.drift)

    def lrs_for(self, scenario: str) -> list[float]:
        kind = parse_scenario(scenario)[0]
        return self.lr_overrides.get(scenario) or self.lr_overrides.get(kind) or self.lrs

    def n_for(self, scenario: str) -> int | None:
        if isinstance(self.n, dict):
            return self.n.get(scenario, self.n.get(parse_scenario(scenario)[0]))
        return self.n

    # ----- loading

    @classmethod
    def from_dict(cls, data: dict, where: str = "experiment config") -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise SafetyLayersError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise SafetyLayersError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                                    f"allowed: {', '.join(allowed)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise SafetyLayersError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, name: str | None = None) -> "ExperimentConfig":
        """Read a YAML file; a file of several documents (``---``) needs ``name`` to pick one."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise SafetyLayersError(f"config file not found: {path}")
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
        except yaml.YAMLError as e:
            raise SafetyLayersError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not docs:
            raise SafetyLayersError(f"{path} is empty: give a mapping of experiment settings")
        if len(docs) > 1 or name is not None:
            names = [d.get("name") if isinstance(d, dict) else None for d in docs]
            if name is None:
                raise SafetyLayersError(f"{path} holds {len(docs)} experiments: pick one by name "
                                        f"({', '.join(str(n) for n in names)})")
            if name not in names:
                raise SafetyLayersError(f"{path} has no experiment named {name!r}; names: "
                                        f"{', '.join(str(n) for n in names)}")
            docs = [docs[names.index(name)]]
        return cls.from_dict(docs[0], where=str(path))


def _fields(cls, skip=()) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in skip)


def _check_keys(section: str, values: dict, allowed) -> None:
    if not isinstance(values, dict):
        raise SafetyLayersError(f"{section} must be a mapping of settings, got {type(values).__name__}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise SafetyLayersError(f"unknown key(s) in {section}: {', '.join(map(str, unknown))}; "
                                f"allowed: {', '.join(sorted(allowed))}")


def _lr(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise SafetyLayersError(f"learning rate {x!r} is not a number") from None
    if not v > 0:
        raise SafetyLayersError(f"learning rates must be > 0, got {x}")
    return v


def _int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise SafetyLayersError(f"{what} must be a non-negative integer, got {x!r}")
    return x


# --------------------------------------------------------------------------- the grid

def parse_scenario(label: str) -> tuple[str, float | None]:
    """``"harmful-p0.05"`` -> ("harmful", 0.05); ``"implicit"`` -> ("implicit", None)."""
    m = re.fullmatch(r"harmful(?:-p|:|@)(\d*\.?\d+)", label)
    if m:
        return "harmful", float(m.group(1))
    if label in SCENARIO_KINDS:
        return label, (0.1 if label == "harmful" else None)
    raise SafetyLayersError(f"unknown scenario {label!r}: use {', '.join(SCENARIO_KINDS[:3])} or harmful-p<p> "
                            "(e.g. harmful-p0.05)")


def scenario_label(spec) -> str:
    kind, p = parse_scenario(str(spec).strip())
    return f"harmful-p{p:g}" if kind == "harmful" else kind


def method_label(spec) -> str:
    """Canonical method name; ``freeze:A-B`` becomes ``freeze-A-B``."""
    s = str(spec).strip()
    m = re.fullmatch(r"freeze[:-](\d+)-(\d+)", s)
    if m:
        band = LayerRange(int(m.group(1)), int(m.group(2)))
        return f"freeze-{band.start}-{band.end}"
    if s in BASE_METHODS:
        return s
    import difflib

    close = difflib.get_close_matches(s, BASE_METHODS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SafetyLayersError(f"unknown method {s!r}{hint}: use {', '.join(BASE_METHODS)} or freeze:A-B")


def method_band(method: str, band: LayerRange, num_layers: int) -> tuple[str, LayerRange | None, str | None]:
    """(finetune method, band it freezes or skips, note) for an experiment method."""
    k = len(band)
    if method in ("full", "lora"):
        return method, None, None
    if method in ("sppft", "sppft-lora"):
        return method, band, None
    if method == "freeze-before":
        if band.start == 0:
            raise SafetyLayersError(f"freeze-before: the band {band} starts at layer 0, no layer lies before it")
        ab = LayerRange(max(0, band.start - k), band.start - 1)
    elif method == "freeze-after":
        if band.end >= num_layers - 1:
            raise SafetyLayersError(f"freeze-after: the band {band} ends at the last layer ({num_layers - 1})")
        ab = LayerRange(band.end + 1, min(num_layers - 1, band.end + k))
    else:
        m = re.fullmatch(r"freeze-(\d+)-(\d+)", method)
        if not m:
            raise SafetyLayersError(f"unknown method {method!r}")
        return "freeze", LayerRange(int(m.group(1)), int(m.group(2))).check(num_layers), None
    note = None if len(ab) == k else f"clipped at the model's edge: {len(ab)} layers instead of {k}"
    return "freeze", ab, note


def cell_id(scenario: str, method: str, lr: float, seed: int) -> str:
    return f"{scenario}__{method}__lr{lr:g}__seed{seed}"


@dataclass(frozen=True)
class Cell:
    scenario: str
    method: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return cell_id(self.scenario, self.method, self.lr, self.seed)


def grid(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell, scenario-major, then learning rate, seed and method (comparable cells adjacent)."""
    return [Cell(s, m, lr, seed) for s in cfg.scenarios for lr in cfg.lrs_for(s) for seed in cfg.seeds
            for m in cfg.methods]


# --------------------------------------------------------------------------- results

#: The range each metric lives in; intervals are clipped to it.
METRIC_BOUNDS = {"harmful_rate": (0.0, 1.0), "over_refusal_rate": (0.0, 1.0), "harmful_score": (1.0, 5.0),
                 "rouge_l": (0.0, 1.0)}


def t_interval(values: list[float], level: float = 0.95, bounds: tuple[float, float] | None = None) -> list[float] | None:
    """Student-t interval of the mean (None for fewer than two values), clipped to ``bounds``.

    With the few seeds an experiment affords the interval is wide (t at 1 degree of
    freedom is 12.7); that is the honest width, so it is reported as is.
    """
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return [lo, hi]


def aggregate(cells: list[dict], before: dict, order: list[Cell] | None = None) -> dict:
    """Rows of (scenario, method, lr): each metric before, mean after, 95% interval, change.

    ``cells`` are cell.json dicts (only ``done`` ones count); ``before`` maps metric -> the
    untuned model's value. Metrics that no cell and no baseline measured are left out.
    """
    done = [c for c in cells if c.get("status") == "done"]
    metrics = [m for m in METRICS if before.get(m) is not None
               or any((c.get("metrics") or {}).get(m) is not None for c in done)]
    keys: list[tuple] = []
    for c in (order or []):
        k = (c.scenario, c.method, c.lr)
        if k not in keys:
            keys.append(k)
    for c in cells:
        k = (c["scenario"], c["method"], c["lr"])
        if k not in keys:
            keys.append(k)
    rows = []
    for scen, meth, lr in keys:
        group = [c for c in done if (c["scenario"], c["method"], c["lr"]) == (scen, meth, lr)]
        tried = [c for c in cells if (c["scenario"], c["method"], c["lr"]) == (scen, meth, lr)]
        row = {"scenario": scen, "method": meth, "lr": lr, "n_seeds": len(group),
               "seeds": sorted(c["seed"] for c in group),
               "failed": sorted(c["seed"] for c in tried if c.get("status") == "failed"), "metrics": {}}
        for m in metrics:
            vals = [c["metrics"][m] for c in group if (c.get("metrics") or {}).get(m) is not None]
            mean = sum(vals) / len(vals) if vals else None
            b = before.get(m)
            row["metrics"][m] = {"before": b, "after_mean": mean, "after_ci": t_interval(vals, bounds=METRIC_BOUNDS[m]),
                                 "values": vals,
                                 "delta": None if mean is None or b is None else mean - b}
        rows.append(row)
    return {"metrics": metrics, "interval": "95% Student-t interval of the mean over seeds, clipped to the metric's "
                                            "range (null for one seed)",
            "rows": rows}


def _fmt(metric: str, x) -> str:
    if x is None:
        return "-"
    if metric.endswith("_rate"):
        return f"{100 * x:.1f}%"
    return f"{x:.3f}"


def _fmt_delta(metric: str, x) -> str:
    if x is None:
        return "-"
    return (f"{100 * x:+.1f} pts" if metric.endswith("_rate") else f"{x:+.3f}")


def results_markdown(results: dict, title: str = "SPPFT experiment") -> str:
    """One table per metric: before, mean after over seeds, its 95% interval, the change."""
    lines = [f"# {title}", "", results.get("interval", ""), ""]
    for m in results["metrics"]:
        lines += [f"## {METRIC_LABELS.get(m, m)}", "",
                  "| scenario | method | lr | seeds | before | after | 95% CI | change |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["rows"]:
            v = r["metrics"][m]
            ci = v["after_ci"]
            seeds = str(r["n_seeds"]) + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
            lines.append(f"| {r['scenario']} | {r['method']} | {r['lr']:g} | {seeds} | {_fmt(m, v['before'])} | "
                         f"{_fmt(m, v['after_mean'])} | "
                         f"{_fmt(m, ci[0]) + ' to ' + _fmt(m, ci[1]) if ci else '-'} | {_fmt_delta(m, v['delta'])} |")
        lines.append("")
    return "\n".join(lines)


def write_results(run_dir: str | Path, order: list[Cell] | None = None) -> dict:
    """Aggregate every cells/*/cell.json of a run into results.json and results.md."""
    from ..core.runs import atomic_write, write_json

    run = Path(run_dir)
    exp = json.loads((run / "experiment.json").read_text(encoding="utf-8"))
    cells = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((run / "cells").glob("*/cell.json"))]
    results = aggregate(cells, (exp.get("baseline") or {}).get("metrics") or {}, order)
    results["band"] = exp.get("band")
    write_json(run / "results.json", results)
    title = f"SPPFT experiment: {exp['config'].get('name') or exp['config']['model']}, band {exp.get('band')}"
    atomic_write(run / "results.md", results_markdown(results, title) + "\n")
    return results


# --------------------------------------------------------------------------- the run folder

@dataclass
class ExperimentResult:
    run_dir: str
    band: list[int]
    band_source: str
    baseline: dict
    cells: list[dict]
    results: dict
    ran: int
    skipped: int
    failed: int
    seconds: float


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_experiment(run_dir: str | Path) -> dict:
    """experiment.json of a run folder, after checking its format version."""
    path = Path(run_dir) / "experiment.json"
    if not path.is_file():
        raise SafetyLayersError(f"{run_dir} is not an experiment run folder (no experiment.json)")
    try:
        exp = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SafetyLayersError(f"{path} is not valid JSON ({e.msg}): the run folder is damaged; start a new one") from None
    version = exp.get("version") if isinstance(exp, dict) else None
    if version != EXPERIMENT_VERSION:
        what = "an older, unversioned" if version is None else f"format version {version!r} of"
        raise SafetyLayersError(f"{run_dir} was written by {what} safety-layers experiment; this release reads "
                                f"version {EXPERIMENT_VERSION}: start a new run folder, or rerun it with the release "
                                "that wrote it")
    return exp


def _protocol(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in GRID_FIELDS}


def _open_run(run: Path, cfg: ExperimentConfig) -> dict:
    """Create the run folder or reopen it for resuming (same protocol only)."""
    from ..core.runs import environment, to_jsonable, write_json

    config = json.loads(json.dumps(to_jsonable(cfg)))
    if (run / "experiment.json").is_file():
        exp = read_experiment(run)
        old, new = _protocol(exp.get("config") or {}), _protocol(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise SafetyLayersError(f"{run} was run with different settings ({', '.join(changed)} changed): its "
                                    "finished cells would not compare; use a new run folder, or change only "
                                    f"{', '.join(GRID_FIELDS)}")
        exp.update(config=config, resumed=_now(), finished=None)
    else:
        if run.exists() and any(p.name != INPUTS for p in run.iterdir()):
            raise SafetyLayersError(f"{run} exists, is not empty and holds no experiment.json: choose another folder")
        exp = {"version": EXPERIMENT_VERSION, "config": config, "environment": environment(), "band": None,
               "band_source": None, "started": _now(), "finished": None}
    write_json(run / "experiment.json", exp)
    return exp


class _Log:
    """Stage lines on the console (rich); never a model completion."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)


# --------------------------------------------------------------------------- the experiment

class _Experiment:
    """State shared by the stages of one run: the untuned model, the band, the drift runner."""

    def __init__(self, cfg: ExperimentConfig, run: Path, progress: bool, model=None):
        self.cfg, self.run, self.progress = cfg, run, progress
        self.log = _Log(progress)
        self._given = model
        self.base = None
        self.band: LayerRange | None = None
        self.band_source: str | None = None
        self.locate_result: dict | None = None
        self.analysis_result: dict | None = None
        self._drift = None

    # ----- model and band

    def load_base(self):
        from ..core.models import load_model, load_or_use

        if self.base is None:
            if self._given is not None:
                self.base = load_or_use(self._given)
            else:
                import torch

                self.log(f"[bold]model[/bold] loading {self.cfg.model}")
                self.base = load_model(self.cfg.model, dtype=self.cfg.dtype,
                                       device="cuda" if torch.cuda.is_available() else None)
        return self.base

    def fresh_copy(self):
        """A deep copy of the untuned model for one cell (the untuned one is never trained)."""
        from ..core.models import LoadedModel, find_blocks

        model = copy.deepcopy(self.base.model)
        return LoadedModel(model, self.base.tokenizer, self.base.name, self.base.source, find_blocks(model))

    def run_analysis(self) -> dict:
        from ..analysis.run import analyze

        path = self.run / "analysis" / "result.json"
        if path.is_file():
            self.analysis_result = json.loads(path.read_text(encoding="utf-8"))
            self.log(f"[bold]analyze[/bold] reused {path}")
        else:
            self.log("[bold]analyze[/bold] existence analysis (cosine gap of normal vs malicious prompts)")
            analyze(self.cfg.analyze_config(self.progress), model=self.base, run_dir=self.run / "analysis")
            self.analysis_result = json.loads(path.read_text(encoding="utf-8"))
        rng = self.analysis_result.get("initial_range")
        self.log(f"  initial range: {rng[0]}-{rng[1]}" if rng else "  no initial range found")
        return self.analysis_result

    def run_locate(self) -> dict:
        try:
            from ..locate.run import LocateConfig, locate
        except ImportError:
            raise SafetyLayersError("locate is not available in this installation: give band: START-END "
                                    "instead of a locate section") from None
        path = self.run / "locate" / "result.json"
        if path.is_file():
            self.locate_result = json.loads(path.read_text(encoding="utf-8"))
            self.log(f"[bold]locate[/bold] reused {path}")
        else:
            section = dict(self.cfg.locate or {})
            _check_keys("locate", section, _fields(LocateConfig, _SECTION_SKIP))
            self.log("[bold]locate[/bold] finding the safety band (scaling + over-rejection refusals)")
            lcfg = LocateConfig(**{"model": self.cfg.model, **section})
            if hasattr(lcfg, "progress"):
                lcfg.progress = self.progress
            locate(lcfg, model=self.base, run_dir=self.run / "locate")
            self.locate_result = json.loads(path.read_text(encoding="utf-8"))
        return self.locate_result

    def resolve_band(self, exp: dict) -> LayerRange:
        n = self.base.num_layers
        if self.cfg.analysis is not None or (self.cfg.band is None and self.cfg.locate is None):
            self.run_analysis()
        if self.cfg.band is not None:
            band, source = LayerRange.parse(self.cfg.band), "given"
        elif self.cfg.locate is not None:
            res = self.run_locate()
            found = res.get("safety_layers") or res.get("range")
            if not found:
                raise SafetyLayersError(f"{self.run / 'locate' / 'result.json'} names no band: give band: START-END")
            band, source = LayerRange.parse(found), "locate"
        else:
            rng = self.analysis_result.get("initial_range")
            if not rng:
                raise SafetyLayersError("the existence analysis found no initial range on this model: give "
                                        "band: START-END or a locate section")
            band, source = LayerRange.parse(rng), "analyze"
        band.check(n)
        if len(band) == n and any(m in ("sppft", "sppft-lora") for m in self.cfg.methods):
            raise SafetyLayersError(f"the band {band} covers all {n} layers: SPPFT would train no decoder layer")
        if exp.get("band") not in (None, [band.start, band.end]):
            raise SafetyLayersError(f"{self.run} was run with band {exp['band'][0]}-{exp['band'][1]}, now {band}: "
                                    "use a new run folder")
        self.band, self.band_source = band, source
        self.log(f"[bold]band[/bold] {band} ({len(band)} of {n} layers, from {source})")
        return band

    # ----- baseline

    def baseline(self) -> dict:
        from ..evaluate.run import EvaluateResult, evaluate

        path = self.run / "baseline" / "eval" / "result.json"
        if path.is_file():
            res = EvaluateResult.from_json(path)
            self.log(f"[bold]baseline[/bold] reused {path}")
        else:
            self.log("[bold]baseline[/bold] evaluating the untuned model")
            res = evaluate(self.cfg.evaluate_config(self.progress), model=self.base,
                           run_dir=self.run / "baseline" / "eval")
        metrics = metrics_of(res)
        self.log(f"  {describe_metrics(metrics)}")
        return {"metrics": metrics, "counts": counts_of(res), "fingerprint": res.fingerprint}

    # ----- data

    def scenario_data(self, scenario: str) -> Path:
        from ..scenarios import build_scenario, manifest_path

        out = self.run / "data" / f"{scenario}.jsonl"
        if out.is_file() and manifest_path(out).is_file():
            return out
        kind, p = parse_scenario(scenario)
        opts = dict(self.cfg.scenario_options, n=self.cfg.n_for(scenario), seed=self.cfg.data_seed, overwrite=True)
        if kind == "harmful":
            opts.update(harmful=self.cfg.harmful_data, p=p)
        res = build_scenario(kind, self.cfg.data, out, **opts)
        self.log(f"[bold]data[/bold] {scenario}: {res.total} rows ({', '.join(f'{v} {k}' for k, v in res.counts.items())})")
        return out

    # ----- drift

    def drift_runner(self):
        if self._drift is None:
            from .drift import DEFAULT_ALPHA, DriftRunner, gap_from_analysis

            dcfg = self.cfg.drift_config()
            alpha = dcfg.alpha
            if alpha is None:
                loc = self.locate_result or {}
                alpha = loc.get("alpha") if loc.get("direction") == "up" and loc.get("alpha") else DEFAULT_ALPHA
            acfg = self.cfg.analyze_config(self.progress)
            base_gap = None
            if self.analysis_result is not None and dcfg.gap:
                base_gap = gap_from_analysis(self.analysis_result)
            self._drift = DriftRunner(dcfg, self.base, self.band, acfg, self.run, alpha,
                                      template=self.cfg.evaluate_config().template, baseline_gap=base_gap,
                                      progress=self.progress)
        return self._drift

    # ----- one cell

    def training_args(self, cell: Cell, output_dir: Path):
        import torch

        from ..finetune.run import default_training_args

        args = dict(per_device_train_batch_size=self.cfg.batch_size, num_train_epochs=self.cfg.epochs,
                    learning_rate=cell.lr, warmup_steps=self.cfg.warmup_steps,
                    gradient_accumulation_steps=self.cfg.grad_accum, max_steps=self.cfg.max_steps or -1,
                    save_strategy="no", seed=cell.seed, data_seed=cell.seed, disable_tqdm=not self.progress,
                    logging_strategy="steps" if self.progress else "no", logging_steps=10,
                    dataloader_pin_memory=torch.cuda.is_available())
        args.update(self.cfg.training_args)
        return default_training_args(output_dir, **args)

    def run_cell(self, cell: Cell, data: Path) -> dict:
        from ..finetune import run as ft
        from ..evaluate.run import evaluate
        from ..core.runs import to_jsonable

        cdir = self.run / "cells" / cell.id
        seconds: dict[str, float] = {}
        method, frozen, note = method_band(cell.method, self.band, self.base.num_layers)
        record = {"frozen_band": [frozen.start, frozen.end] if frozen else None, "note": note}
        t = time.perf_counter()
        fcfg = ft.FinetuneConfig(
            model=self.cfg.model, data=str(data), method=method, layers=str(frozen) if frozen else None,
            freeze_norms=self.cfg.freeze_norms, template=self.cfg.template, train_on_inputs=self.cfg.train_on_inputs,
            paper=self.cfg.paper, max_length=self.cfg.max_length, lora_r=self.cfg.lora_r,
            lora_alpha=self.cfg.lora_alpha, out=str(cdir / "train" / "model"), overwrite=True, dtype=self.cfg.dtype)
        prep = ft.prepare(fcfg, self.training_args(cell, cdir / "train"), model=self.fresh_copy())
        fres = ft.train_and_save(prep)
        record["finetune"] = to_jsonable(fres)
        seconds["train"] = round(time.perf_counter() - t, 3)
        tuned = _tuned_model(prep)
        del prep
        loss = f", loss {fres.train_loss:.3f}" if fres.train_loss is not None else ""
        self.log(f"  trained {fres.global_step} steps{loss} ({seconds['train']:.0f} s)")

        t = time.perf_counter()
        res = evaluate(self.cfg.evaluate_config(self.progress), model=tuned, run_dir=cdir / "eval")
        seconds["evaluate"] = round(time.perf_counter() - t, 3)
        record["metrics"], record["counts"] = metrics_of(res), counts_of(res)
        self.log(f"  {describe_metrics(record['metrics'])}")

        record["drift_error"] = None
        if self.cfg.drift_config().enabled:
            t = time.perf_counter()
            try:
                d = self.drift_runner().cell(tuned, frozen)
                from ..core.runs import write_json

                write_json(cdir / "drift.json", {"scenario": cell.scenario, "method": cell.method, "lr": cell.lr,
                                                 "seed": cell.seed, **d})
                record["drift"] = drift_summary(d)
                self.log(f"  drift: {describe_drift(record['drift'])}")
            except Exception as e:  # noqa: BLE001 - drift is a diagnostic; the cell's metrics stand
                from ..core.runs import atomic_write

                record["drift_error"] = f"{type(e).__name__}: {e}"
                atomic_write(cdir / "drift_error.txt", traceback.format_exc())
                self.log(f"  [yellow]drift failed:[/yellow] {record['drift_error']}")
            seconds["drift"] = round(time.perf_counter() - t, 3)
        del tuned
        _free(self.base.model)
        if not self.cfg.keep_models:
            for folder in [cdir / "train" / "model", *(cdir / "train").glob("checkpoint-*")]:
                shutil.rmtree(folder, ignore_errors=True)
        record["model_kept"] = self.cfg.keep_models
        record["seconds"] = seconds
        return record

    def drift_for_kept(self, cells: list[str] | None = None) -> dict | None:
        """Drift for finished cells whose tuned model is on disk and that have no drift.json yet."""
        from .drift import write_drift
        from ..core.runs import write_json

        exp = read_experiment(self.run)
        if not exp.get("band"):
            raise SafetyLayersError(f"{self.run} has no band yet: run the experiment first")
        self.band = LayerRange.parse(exp["band"])
        self.load_base()
        lpath, apath = self.run / "locate" / "result.json", self.run / "analysis" / "result.json"
        self.locate_result = json.loads(lpath.read_text(encoding="utf-8")) if lpath.is_file() else None
        self.analysis_result = json.loads(apath.read_text(encoding="utf-8")) if apath.is_file() else None
        todo = []
        for p in sorted((self.run / "cells").glob("*/cell.json")):
            c = json.loads(p.read_text(encoding="utf-8"))
            if cells is not None and c["id"] not in cells:
                continue
            if c.get("status") == "done" and not (p.parent / "drift.json").is_file():
                todo.append(c)
        for c in todo:
            folder = self.run / "cells" / c["id"] / "train" / "model"
            if not folder.is_dir():
                self.log(f"[yellow]{c['id']}:[/yellow] its tuned model was deleted (keep_models: false); skipped")
                continue
            self.log(f"[bold]drift[/bold] {c['id']}")
            tuned = _load_tuned(folder, self.base)
            frozen = LayerRange.parse(c["frozen_band"]) if c.get("frozen_band") else None
            d = self.drift_runner().cell(tuned, frozen)
            write_json(folder.parents[1] / "drift.json", {"scenario": c["scenario"], "method": c["method"],
                                                          "lr": c["lr"], "seed": c["seed"], **d})
            c["drift"], c["drift_error"] = drift_summary(d), None
            write_json(folder.parents[1] / "cell.json", c)
            del tuned
            _free(self.base.model)
        return write_drift(self.run)


def _tuned_model(prep):
    """The trained model as a LoadedModel ready to generate (LoRA merged into the weights)."""
    from ..finetune.run import LORA_METHODS
    from ..core.models import LoadedModel, find_blocks

    model = prep.model
    if prep.cfg.method in LORA_METHODS:
        model = model.merge_and_unload()
    model.eval()
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, prep.lm.tokenizer, f"{prep.lm.name}+{prep.cfg.method}", str(prep.out), find_blocks(model))


def _load_tuned(folder: Path, base):
    """A kept tuned model: a full model folder, or a LoRA adapter applied to a copy of ``base``."""
    from ..core.models import LoadedModel, find_blocks, load_model

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8")) \
        if (folder / "manifest.json").is_file() else {}
    if manifest.get("format") == "peft-adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(folder)).merge_and_unload().eval()
        return LoadedModel(model, base.tokenizer, f"{base.name}+adapter", str(folder), find_blocks(model))
    device = next(base.model.parameters()).device
    return load_model(str(folder), device=str(device) if device.type != "cpu" else None)


def _free(model=None):
    """Collect the finished cell's Trainer and model (reference cycles) before the next one.

    A full collection takes about a second in a process that imported transformers, so it is
    skipped for small CPU models, whose copies do not matter.
    """
    import torch

    cuda = torch.cuda.is_available()
    if cuda or model is None or sum(p.numel() for p in model.parameters()) > 50_000_000:
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def metrics_of(res) -> dict:
    """The four headline metrics of an EvaluateResult (None where not measured)."""
    return {"harmful_rate": res.harmful.rate if res.harmful else None,
            "over_refusal_rate": res.over_refusal.rate if res.over_refusal else None,
            "harmful_score": res.harmful.harmful_score if res.harmful else None,
            "rouge_l": res.quality.rouge_l if res.quality else None}


def counts_of(res) -> dict:
    out = {}
    for key, r in (("harmful", res.harmful), ("over_refusal", res.over_refusal)):
        if r is not None:
            out[key] = {"count": r.count, "decided": r.decided, "n": r.n, "judge": r.judge}
    if res.quality is not None:
        out["quality"] = {"n": res.quality.n}
    return out


def describe_metrics(m: dict) -> str:
    parts = [f"{METRIC_LABELS[k]} {_fmt(k, v)}" for k, v in m.items() if v is not None]
    return ", ".join(parts) or "no metric measured"


def drift_summary(d: dict) -> dict:
    """The few drift numbers worth keeping in cell.json (drift.json has the curves)."""
    w, h, g = d.get("weight_change") or {}, d.get("band_holds") or {}, d.get("gap_shift") or {}
    return {"band_max_rel_change": w.get("band_max"), "outside_mean_rel_change": w.get("outside_mean"),
            "gap_max_abs_shift": g.get("max_abs"), "band_retained": h.get("retained"), "band_holds": h.get("holds")}


def describe_drift(s: dict) -> str:
    parts = []
    if s.get("band_max_rel_change") is not None:
        parts.append(f"band weights moved {s['band_max_rel_change']:.2e} (max), others "
                     f"{(s.get('outside_mean_rel_change') or 0):.2e} (mean)")
    if s.get("gap_max_abs_shift") is not None:
        parts.append(f"gap shifted up to {s['gap_max_abs_shift']:.2f} deg")
    if s.get("band_retained") is not None:
        parts.append(f"band keeps {s['band_retained']:.0%} of its refusal effect")
    return "; ".join(parts) or "-"


def load_run(run_dir: str | Path, progress: bool = True, model=None) -> _Experiment:
    """Reopen a finished or partial run (for drift on demand)."""
    run = Path(run_dir)
    exp = read_experiment(run)
    cfg = ExperimentConfig.from_dict(exp["config"], where=str(run / "experiment.json"))
    return _Experiment(cfg, run, progress, model)


def run_experiment(cfg: ExperimentConfig | dict, run_dir: str | Path | None = None, progress: bool = True,
                   *, model=None) -> ExperimentResult:
    """Run (or resume) the experiment ``cfg`` in ``run_dir``; see the module docstring.

    ``model`` may be a loaded model to use instead of loading ``cfg.model`` (it is never
    trained: every cell tunes a deep copy).
    """
    from .drift import write_drift
    from ..core.runs import slug, write_json

    t0 = time.perf_counter()
    if not isinstance(cfg, ExperimentConfig):
        cfg = ExperimentConfig.from_dict(cfg)
    run = Path(run_dir) if run_dir else Path("runs") / f"experiment-{slug(cfg.name or cfg.model)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.data is None:
        raise SafetyLayersError("no benign data: set data: to an instruction file (JSON/JSONL/CSV of "
                                "instruction, input, output), e.g. alpaca_data_1k.json")
    if not Path(cfg.data).is_file():
        raise SafetyLayersError(f"data file not found: {cfg.data}")
    if cfg.training_args:
        from transformers import TrainingArguments

        _check_keys("training_args", cfg.training_args,
                    _fields(TrainingArguments, ("output_dir", "learning_rate", "seed", "num_train_epochs",
                                                "per_device_train_batch_size")))
    cfg.evaluate_config()   # every check that can fail runs before the model loads
    exp = _open_run(run, cfg)
    ex = _Experiment(cfg, run, progress, model)
    log = ex.log
    log(f"[bold]experiment[/bold] {run}")
    cells = grid(cfg)
    data = {s: ex.scenario_data(s) for s in cfg.scenarios}
    ex.load_base()
    band = ex.resolve_band(exp)
    exp.update(band=[band.start, band.end], band_source=ex.band_source)
    write_json(run / "experiment.json", exp)
    exp["baseline"] = ex.baseline()
    write_json(run / "experiment.json", exp)

    ran = skipped = failed = 0
    records = []
    for i, cell in enumerate(cells, 1):
        path = run / "cells" / cell.id / "cell.json"
        prev = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if prev is not None and prev.get("status") == "done":
            skipped += 1
            records.append(prev)
            log(f"[dim]cell {i}/{len(cells)} {cell.id}: done earlier, skipped[/dim]")
            continue
        again = f" (was {prev['status']})" if prev else ""
        log(f"[bold]cell {i}/{len(cells)}[/bold] {cell.id}{again}")
        rec = {"id": cell.id, "scenario": cell.scenario, "method": cell.method, "seed": cell.seed, "lr": cell.lr,
               "band": [band.start, band.end], "status": "running", "error": None, "metrics": None,
               "finetune": None, "seconds": {}, "started": _now(), "finished": None}
        write_json(path, rec)
        t = time.perf_counter()
        try:
            rec.update(ex.run_cell(cell, data[cell.scenario]))
            rec["status"] = "done"
            ran += 1
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the grid
            rec.update(status="failed", error=f"{type(e).__name__}: {e}" if not isinstance(e, SafetyLayersError)
                       else str(e))
            from ..core.runs import atomic_write

            atomic_write(run / "cells" / cell.id / "error.txt", traceback.format_exc())
            failed += 1
            log(f"  [red]failed:[/red] {rec['error']}")
            _free(ex.base.model if ex.base is not None else None)
        rec["seconds"]["total"] = round(time.perf_counter() - t, 3)
        rec["finished"] = _now()
        write_json(path, rec)
        records.append(rec)
        write_results(run, cells)
        if (run / "cells" / cell.id / "drift.json").is_file():
            write_drift(run, plots=False)

    results = write_results(run, cells)
    if ran or not any((run / "drift").glob("*.png")):
        write_drift(run)
    exp["finished"] = _now()
    exp["cells"] = {"total": len(cells), "ran": ran, "skipped": skipped, "failed": failed}
    write_json(run / "experiment.json", exp)
    log(f"[bold]done[/bold] {ran} cells run, {skipped} reused, {failed} failed; results in {run / 'results.md'}")
    return ExperimentResult(
        run_dir=str(run), band=[band.start, band.end], band_source=ex.band_source, baseline=exp["baseline"],
        cells=[{k: r.get(k) for k in ("id", "status", "error", "metrics")} for r in records], results=results,
        ran=ran, skipped=skipped, failed=failed, seconds=round(time.perf_counter() - t0, 3))


__all__ = ["BASE_METHODS", "Cell", "EXPERIMENT_VERSION", "ExperimentConfig", "ExperimentResult", "METRICS",
           "aggregate", "cell_id", "grid", "load_run", "method_band", "method_label", "parse_scenario",
           "read_experiment", "results_markdown", "run_experiment", "scenario_label", "t_interval",
           "write_results"]
