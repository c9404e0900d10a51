"""The whole pipeline on the bundled model, with nothing but this package: ``safety-layers demo``.

1. benign fine-tuning data: the package's own ``normal`` prompts answered by the bare
   SmolLM2-135M-Instruct (self-distillation; the generation cache keeps the answers), or the
   user's instruction file. A few rows are held out as Rouge-L references, so task quality
   is measured too;
2. the aligned demo model (``load_model("demo")``: built once, about 10 minutes on two CPU
   cores, then cached);
3. the existence analysis of the demo model, with the bare model as reference;
4. locating its safety band (:mod:`safety_layers.locate`);
5. full fine-tuning and SPPFT under the implicit attack (every answer opens with
   "Sure, the answer is:"), each evaluated (harmful rate, over-refusal, Rouge-L) with drift
   diagnostics;
6. the report (:mod:`safety_layers.report`).

Everything is an :mod:`safety_layers.experiment` run in ``out`` (default ``runs/demo``), so a
rerun reuses every finished stage and takes a few minutes at most. The data files live in
``out/inputs``. Without ``data``, the analysis' normal prompts are the very prompts the benign
answers were written for, so the drift gap curve shows the tuned model on its training prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import settle
from ..core.errors import SafetyLayersError

_YAML = {"cli": False}   # a setting for YAML files and Python, not a command-line flag


@dataclass
class DemoConfig:
    """Settings of ``safety-layers demo``; the defaults fit two CPU cores.

    Four are command-line flags; the sizes of the run are YAML (``--config``) and Python
    settings, since the demo's numbers are quoted for these defaults.
    """

    out: str = field(default="runs/demo", metadata={"help": "run folder (a rerun reuses what it holds)"})
    model: str = field(default="demo", metadata={"help": "aligned model to study (demo: built on first use)"})
    reference: str = field(default="smollm2-135m-instruct", metadata={
        "help": "the bare model: reference of the analysis and author of the self-distilled answers", **_YAML})
    data: str | None = field(default=None, metadata={
        "help": "benign instruction file (e.g. alpaca_data_1k.json); None: built-in prompts, self-distilled answers",
        **_YAML})
    n: int | None = field(default=64, metadata={
        "help": "training rows, at most (None: every row that is not held out)", **_YAML})
    holdout: int = field(default=16, metadata={"help": "benign rows held out as Rouge-L references", **_YAML})
    answer_tokens: int = field(default=48, metadata={"help": "length of the self-distilled answers", **_YAML})
    scenario: str = field(default="implicit", metadata={
        "help": "attack scenario: normal, implicit, backdoor", **_YAML})
    methods: list = field(default_factory=lambda: ["full", "sppft"], metadata={
        "help": "fine-tuning methods", **_YAML})
    band: str | None = field(default=None, metadata={"help": "skip locate and use this band (e.g. 6-9)"})
    locate: dict = field(default_factory=dict, metadata={"help": "LocateConfig settings for the band search", **_YAML})
    analysis: dict = field(default_factory=dict, metadata={
        "help": "AnalyzeConfig settings of the existence analysis (its reference is `reference`)", **_YAML})
    epochs: float = field(default=1.0, metadata={"help": "training epochs", **_YAML})
    lr: float = field(default=1e-4, metadata={"help": "learning rate", **_YAML})
    batch_size: int = field(default=4, metadata={"help": "batch size", **_YAML})
    seed: int = field(default=0, metadata={"help": "training seed", **_YAML})
    eval_limit: int | None = field(default=64, metadata={"help": "prompts per evaluation set", **_YAML})
    drift_limit: int | None = field(default=32, metadata={
        "help": "over-rejection prompts for 'does the band still hold' (4 generation passes each)", **_YAML})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per evaluation prompt", **_YAML})
    keep_models: bool = field(default=False, metadata={"help": "keep the tuned models", **_YAML})
    report: bool = field(default=True, metadata={"help": "write the report at the end", **_YAML})
    progress: bool = field(default=True, metadata={"help": "progress bars and stage lines"})

    def __post_init__(self):
        settle(self)                              # the type checks every config gets
        if self.scenario not in ("normal", "implicit", "backdoor"):
            raise SafetyLayersError(f"the demo runs normal, implicit or backdoor, got {self.scenario!r} "
                                    "(the harmful scenario needs harmful data: use `safety-layers experiment`)")
        if self.holdout < 0 or self.answer_tokens < 1:
            raise SafetyLayersError("holdout must be >= 0 and answer_tokens >= 1")


def _split(rows: list[dict], holdout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    if holdout and len(rows) < holdout + 8:
        raise SafetyLayersError(f"{len(rows)} benign rows are too few to hold out {holdout}: "
                                "lower holdout or give more data")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:holdout])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def self_distilled_rows(reference: str, tokens: int, progress: bool = True, log=print) -> list[dict]:
    """The built-in ``normal`` prompts answered greedily by ``reference``; its refusals and empty
    answers are dropped (:func:`safety_layers.align.self_distill` without a second try)."""
    from ..align import self_distill
    from ..core.data import load_prompts
    from ..core.models import load_model

    prompts = load_prompts("normal").prompts
    log(f"[bold]data[/bold] self-distilling answers to {len(prompts)} built-in prompts from {reference} "
        "(cached after the first run)")
    examples, _, _ = self_distill(load_model(reference), prompts, tokens, progress=progress, reopen=False)
    rows = [{"instruction": e.prompt, "input": "", "output": e.response} for e in examples if e is not None and e.response]
    log(f"  {len(rows)} answers kept ({len(prompts) - len(rows)} refused or empty)")
    return rows


def benign_files(cfg: DemoConfig, run: Path, log=print) -> tuple[Path, Path | None]:
    """(training file, Rouge-L reference file or None) in ``run/inputs``, built once."""
    from ..core.runs import atomic_write, write_json

    folder = run / "inputs"
    train, quality, source = folder / "benign.jsonl", folder / "quality.jsonl", folder / "source.json"
    made_from = {"data": cfg.data, "reference": None if cfg.data else cfg.reference,
                 "answer_tokens": None if cfg.data else cfg.answer_tokens, "holdout": cfg.holdout}
    if source.is_file():
        if json.loads(source.read_text(encoding="utf-8")) != made_from:
            raise SafetyLayersError(f"{folder} was built from other data settings (data, reference, answer_tokens "
                                    "or holdout differ): use a new --out folder")
        if train.is_file() and (quality.is_file() or not cfg.holdout):
            return train, quality if cfg.holdout else None
    if cfg.data:
        from ..scenarios import read_records

        rows = read_records(cfg.data, dedupe=True).rows
        log(f"[bold]data[/bold] {len(rows)} benign rows from {cfg.data}")
    else:
        rows = self_distilled_rows(cfg.reference, cfg.answer_tokens, cfg.progress, log)
    fit, held = _split(rows, cfg.holdout)

    def body(rs):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs)

    if held:
        atomic_write(quality, body(held))
    atomic_write(train, body(fit))
    write_json(source, made_from)
    return train, quality if held else None


def experiment_config(cfg: DemoConfig, train: Path, quality: Path | None):
    """The demo as an :class:`~safety_layers.experiment.ExperimentConfig` (its step sections typed).

    The user's ``locate`` and ``analysis`` settings pass through the experiment's section
    checks, like a YAML file's.
    """
    from ..evaluate import EvaluateConfig
    from ..experiment import DriftConfig, ExperimentConfig

    rows = sum(1 for line in train.read_text(encoding="utf-8").splitlines() if line.strip())
    n = None if cfg.n is None or cfg.n >= rows else cfg.n
    quality_set = {"quality": str(quality), "quality_tokens": cfg.answer_tokens} if quality is not None else {}
    evaluate = EvaluateConfig(model=cfg.model, limit=cfg.eval_limit, max_new_tokens=cfg.max_new_tokens, **quality_set)
    return ExperimentConfig(
        model=cfg.model, name="demo", band=cfg.band, locate=dict(cfg.locate) if cfg.band is None else None,
        analysis={"reference_model": cfg.reference, **cfg.analysis},
        data=str(train), n=n, scenarios=[cfg.scenario], methods=list(cfg.methods), lrs=[cfg.lr],
        seeds=[cfg.seed], epochs=cfg.epochs, batch_size=cfg.batch_size, evaluate=evaluate,
        drift=DriftConfig(limit=cfg.drift_limit), keep_models=cfg.keep_models, dtype="float32")


def run_demo(cfg: DemoConfig | None = None) -> Path:
    """Run the demo pipeline (see the module docstring); returns the run folder."""
    import time

    from ..experiment import StageLog, run_experiment

    cfg = cfg or DemoConfig()
    t0 = time.perf_counter()
    log = StageLog(cfg.progress)
    run = Path(cfg.out)
    if cfg.band is not None:                      # before minutes of self-distilling, not after
        from ..core.layers import LayerRange
        from ..core.models import layer_count

        band, layers = LayerRange.parse(cfg.band), layer_count(cfg.model)
        if layers is not None:
            band.check(layers)
    log(f"[bold]safety-layers demo[/bold] -> {run}")
    if cfg.model == "demo":
        from ..align.run import read_manifest
        from .demo_model import DEMO_VERSION, demo_folder

        folder = demo_folder()
        man = read_manifest(folder) if (folder / "config.json").is_file() else None
        if man is None or man.get("demo_version") != DEMO_VERSION:
            log("[bold]model[/bold] the aligned demo model is built on this first run (about 10 minutes on "
                "2 CPU cores), then cached")
    train, quality = benign_files(cfg, run, log)
    result = run_experiment(experiment_config(cfg, train, quality), run, progress=cfg.progress)
    _print_summary(result, log)
    if cfg.report:
        from ..report import write_report

        report = write_report(run)
        log(f"[bold]report[/bold] {report.html}")
    log(f"[bold]demo done[/bold] in {time.perf_counter() - t0:.0f} s: {run}")
    return run


def _print_summary(result, log) -> None:
    from rich.table import Table

    from ..experiment import METRIC_LABELS, fmt_metric

    res = result.results
    if not res["rows"]:
        return
    t = Table(title=f"band {result.band[0]}-{result.band[1]} (from {result.band_source})")
    t.add_column("metric")
    t.add_column("before", justify="right")
    for r in res["rows"]:
        t.add_column(f"{r['scenario']} {r['method']}", justify="right")
    for m in res["metrics"]:
        before = res["rows"][0]["metrics"][m]["before"]
        t.add_row(METRIC_LABELS.get(m, m), fmt_metric(m, before),
                  *[fmt_metric(m, r["metrics"][m]["after_mean"]) for r in res["rows"]])
    if log.enabled:
        log.console.print(t)


__all__ = ["DemoConfig", "benign_files", "experiment_config", "run_demo", "self_distilled_rows"]
