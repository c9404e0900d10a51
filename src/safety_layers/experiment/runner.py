"""The SPPFT experiment of the paper's §4 and §5: scenarios x methods x learning rates x seeds, resumable.

Protocol (:func:`run_experiment`):

1. load the model; find its band: the config's ``band``, else a ``locate`` run
   (:mod:`safety_layers.locate`), else the ``analysis`` run's initial range;
2. evaluate the untuned model once (``baseline/eval``);
3. build each scenario's training file from the benign instruction file (``data/``);
4. for every cell (scenario, method, lr, seed; :mod:`.grid`): fine-tune a fresh copy of the
   model, evaluate it, compute its drift diagnostics (:mod:`.drift`), delete the tuned
   weights (unless ``keep_models``) and write ``cells/<id>/cell.json``;
5. aggregate the cells into ``results.json`` / ``results.md`` (:mod:`.results`): every metric
   before and after, the change, and the mean over seeds with a 95% Student-t interval,
   clipped to the metric's range (null for one seed).

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
import shutil
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..analysis import analyze
from ..core.config import from_mapping
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.data import read_records
from ..core.models import LoadedModel, find_blocks, layer_count, load_model, load_or_use
from ..core.runs import LOCK_NAME, atomic_write, environment, read_json, slug, to_jsonable, write_json
from ..evaluate import EvaluateResult, evaluate
from ..finetune import FinetuneConfig
from ..finetune import run as ft
from ..finetune.devices import check_grid_memory, cpu_args
from ..locate import locate
from ..scenarios import build_scenario, manifest_path, read_harmful
from .config import GRID_FIELDS, ExperimentConfig, check_section_keys
from .drift import DEFAULT_ALPHA, DriftRunner, describe_drift, drift_summary, gap_from_analysis, write_drift
from .grid import Cell, grid, method_band, parse_scenario
from .results import aggregate, counts_of, describe_metrics, metrics_of, results_markdown
from .scan import freeze_set, write_scan

EXPERIMENT_VERSION = 1
#: A new run folder may already hold this folder: files the config points to (the demo's data).
INPUTS = "inputs"


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


def _with_progress(cfg, progress: bool):
    """A copy of a step's config that shows progress as this run does (the config itself is left as is)."""
    out = copy.copy(cfg)
    out.progress = progress
    return out


# --------------------------------------------------------------------------- the run folder

def read_experiment(run_dir: str | Path) -> dict:
    """experiment.json of a run folder, after checking its format version."""
    path = Path(run_dir) / "experiment.json"
    if not path.is_file():
        raise SafetyLayersError(f"{run_dir} is not an experiment run folder (no experiment.json)")
    exp = read_json(path, "experiment record")
    version = exp.get("version")
    if version != EXPERIMENT_VERSION:
        what = "an older, unversioned" if version is None else f"format version {version!r} of"
        raise SafetyLayersError(f"{run_dir} was written by {what} safety-layers experiment; this release reads "
                                f"version {EXPERIMENT_VERSION}: start a new run folder, or rerun it with the release "
                                "that wrote it")
    return exp


def write_results(run_dir: str | Path, order: list[Cell] | None = None) -> dict:
    """Aggregate every cells/*/cell.json of a run into results.json and results.md."""
    run = Path(run_dir)
    exp = read_json(run / "experiment.json", "experiment record")
    cells = [read_json(p, "cell record") for p in sorted((run / "cells").glob("*/cell.json"))]
    results = aggregate(cells, (exp.get("baseline") or {}).get("metrics") or {}, order)
    results["band"] = exp.get("band")
    results["stages"] = exp.get("stages")
    write_json(run / "results.json", results)
    title = f"SPPFT experiment: {exp['config'].get('name') or exp['config']['model']}, band {exp.get('band')}"
    atomic_write(run / "results.md", results_markdown(results, title) + "\n")
    return results


def _protocol(config: dict) -> dict:
    """What a finished cell's numbers depend on: the settings less the grid and where they ran (device),
    resolved as this release reads them."""
    try:
        config = json.loads(json.dumps(ExperimentConfig.from_dict(config).to_dict()))
    except SafetyLayersError:
        pass   # settings this release cannot read: compare them as written
    return {k: v for k, v in config.items() if k not in GRID_FIELDS + ("paper_set", "device", "device_map")}


def _open_run(run: Path, cfg: ExperimentConfig) -> dict:
    """Create the run folder or reopen it for resuming (same protocol only)."""
    config = json.loads(json.dumps(cfg.to_dict()))
    if (run / "experiment.json").is_file():
        exp = read_experiment(run)
        old, new = _protocol(exp.get("config") or {}), _protocol(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise SafetyLayersError(f"{run} was run with different settings ({', '.join(changed)} changed): its "
                                    "finished cells would not compare; use a new run folder, or change only "
                                    f"{', '.join(GRID_FIELDS)}")
        exp.update(config=config, stages=cfg.stage_settings(), resumed=_now(), finished=None)
    else:
        if run.exists() and any(p.name not in (INPUTS, LOCK_NAME) for p in run.iterdir()):
            raise SafetyLayersError(f"{run} exists, is not empty and holds no experiment.json: choose another folder")
        exp = {"version": EXPERIMENT_VERSION, "config": config, "stages": cfg.stage_settings(),
               "environment": environment(), "band": None,
               "band_source": None, "started": _now(), "finished": None}
    write_json(run / "experiment.json", exp)
    return exp


class StageLog:
    """Stage lines on the console (rich); never a model completion."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)


# --------------------------------------------------------------------------- models

def _tuned_model(prep):
    """The trained model as a LoadedModel ready to generate (LoRA merged into the weights)."""
    model = prep.model
    if prep.cfg.method in ft.LORA_METHODS:
        model = model.merge_and_unload()
    model.eval()
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, prep.lm.tokenizer, f"{prep.lm.name}+{prep.cfg.method}", str(prep.out), find_blocks(model))


def _load_tuned(folder: Path, base):
    """A kept tuned model: a full model folder, or a LoRA adapter applied to a copy of ``base``."""
    manifest = read_json(folder / "manifest.json", "model manifest") if (folder / "manifest.json").is_file() else {}
    if manifest.get("format") == "peft-adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(folder)).merge_and_unload().eval()
        return LoadedModel(model, base.tokenizer, f"{base.name}+adapter", str(folder), find_blocks(model))
    device = next(base.model.parameters()).device
    return load_model(str(folder), device=str(device), dtype=next(base.model.parameters()).dtype)


def _free(model=None):
    """Collect the finished cell's Trainer and model (reference cycles) before the next one.

    A full collection takes about a second in a process that imported transformers, so it is
    skipped for small CPU models, whose copies do not matter.
    """
    cuda = torch.cuda.is_available()
    if cuda or model is None or sum(p.numel() for p in model.parameters()) > 50_000_000:
        gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the experiment

class _Experiment:
    """State shared by the stages of one run: the untuned model, the band, the drift runner."""

    def __init__(self, cfg: ExperimentConfig, run: Path, progress: bool, model=None):
        self.cfg, self.run, self.progress = cfg, run, progress
        self.log = StageLog(progress)
        self._given = model
        self.base = None
        self.band: LayerRange | None = None
        self.band_source: str | None = None
        self.locate_result: dict | None = None
        self.analysis_result: dict | None = None
        self._drift = None

    # ----- model and band

    def load_base(self):
        if self.base is None:
            if self._given is not None:
                self.base = load_or_use(self._given)
            else:
                self.log(f"[bold]model[/bold] loading {self.cfg.model}")
                self.base = load_or_use(self.cfg.model, self.cfg)
        return self.base

    def fresh_copy(self):
        """A deep copy of the untuned model for one cell (the untuned one is never trained)."""
        model = copy.deepcopy(self.base.model)
        return LoadedModel(model, self.base.tokenizer, self.base.name, self.base.source, find_blocks(model))

    def run_analysis(self) -> dict:
        path = self.run / "analysis" / "result.json"
        if path.is_file():
            self.log(f"[bold]analyze[/bold] reused {path}")
        else:
            self.log("[bold]analyze[/bold] existence analysis (cosine gap of normal vs malicious prompts)")
            analyze(_with_progress(self.cfg.analysis_config(), self.progress), model=self.base,
                    run_dir=self.run / "analysis")
        self.analysis_result = read_json(path, "analyze result")
        rng = self.analysis_result.get("initial_range")
        self.log(f"  initial range: {rng[0]}-{rng[1]}" if rng else "  no initial range found")
        return self.analysis_result

    def run_locate(self) -> list[int]:
        """The band locate found (``safety_layers`` of its result.json), located once per run folder."""
        path = self.run / "locate" / "result.json"
        if path.is_file():
            self.log(f"[bold]locate[/bold] reused {path}")
        else:
            self.log("[bold]locate[/bold] finding the safety band (scaling + over-rejection refusals)")
            locate(_with_progress(self.cfg.locate, self.progress), model=self.base, run_dir=self.run / "locate")
        self.locate_result = read_json(path, "locate result")
        found = self.locate_result.get("safety_layers")
        if not found:
            raise SafetyLayersError(f"{path} names no band (no safety_layers): give band: START-END")
        return found

    def _find_band(self) -> tuple[LayerRange, str]:
        if self.cfg.analysis is not None or (self.cfg.band is None and self.cfg.locate is None):
            self.run_analysis()
        if self.cfg.band is not None:
            return LayerRange.parse(self.cfg.band), "given"
        if self.cfg.locate is not None:
            return LayerRange.parse(self.run_locate()), "locate"
        rng = self.analysis_result.get("initial_range")
        if not rng:
            raise SafetyLayersError("the existence analysis found no initial range on this model: give "
                                    "band: START-END or a locate section")
        return LayerRange.parse(rng), "analyze"

    def resolve_band(self, exp: dict) -> LayerRange:
        n = self.base.num_layers
        band, source = self._find_band()
        band.check(n)
        if len(band) == n and any(m in ("sppft", "sppft-lora") for m in self.cfg.methods):
            raise SafetyLayersError(f"the band {band} covers all {n} layers: SPPFT would train no decoder layer")
        if exp.get("band") not in (None, [band.start, band.end]):
            raise SafetyLayersError(f"{self.run} was run with band {exp['band'][0]}-{exp['band'][1]}, now {band}: "
                                    "use a new run folder")
        self.band, self.band_source = band, source
        self.log(f"[bold]band[/bold] {band} ({len(band)} of {n} layers, from {source})")
        return band

    # ----- baseline and data

    def baseline(self) -> dict:
        path = self.run / "baseline" / "eval" / "result.json"
        if path.is_file():
            res = EvaluateResult.from_json(path)
            self.log(f"[bold]baseline[/bold] reused {path}")
        else:
            self.log("[bold]baseline[/bold] evaluating the untuned model")
            res = evaluate(_with_progress(self.cfg.evaluate, self.progress), model=self.base,
                           run_dir=self.run / "baseline" / "eval")
        metrics = metrics_of(res)
        self.log(f"  {describe_metrics(metrics)}")
        return {"metrics": metrics, "counts": counts_of(res), "fingerprint": res.fingerprint}

    def scenario_data(self, scenario: str) -> Path:
        out = self.run / "data" / f"{scenario}.jsonl"
        if out.is_file() and manifest_path(out).is_file():
            return out
        kind, p = parse_scenario(scenario)
        opts = dict(self.cfg.scenario_options, n=self.cfg.n_for(scenario), seed=self.cfg.data_seed, overwrite=True)
        if kind == "harmful":
            opts.update(harmful=self.cfg.harmful_data, p=p, harmful_exclude=self.cfg.evaluate.malicious)
        res = build_scenario(kind, self.cfg.data, out, **opts)
        self.log(f"[bold]data[/bold] {scenario}: {res.total} rows ({', '.join(f'{v} {k}' for k, v in res.counts.items())})")
        return out

    # ----- drift

    def drift_runner(self) -> DriftRunner:
        if self._drift is None:
            dcfg = self.cfg.drift
            alpha = dcfg.alpha
            if alpha is None:
                loc = self.locate_result or {}
                alpha = loc.get("alpha") if loc.get("direction") == "up" and loc.get("alpha") else DEFAULT_ALPHA
            base_gap = None
            if self.analysis_result is not None and dcfg.gap:
                base_gap = gap_from_analysis(self.analysis_result)
            self._drift = DriftRunner(dcfg, self.base, self.band, _with_progress(self.cfg.analysis_config(), self.progress),
                                      self.run, alpha, template=self.cfg.evaluate.template, baseline_gap=base_gap,
                                      progress=self.progress)
        return self._drift

    def _write_drift(self, folder: Path, cell: dict, d: dict) -> None:
        write_json(folder / "drift.json", {"scenario": cell["scenario"], "method": cell["method"], "lr": cell["lr"],
                                           "seed": cell["seed"], **d})

    # ----- one cell

    def training_args(self, cell: Cell, output_dir: Path):
        args = dict(per_device_train_batch_size=self.cfg.batch_size, num_train_epochs=self.cfg.epochs,
                    learning_rate=cell.lr, warmup_steps=self.cfg.warmup_steps,
                    gradient_accumulation_steps=self.cfg.grad_accum, max_steps=self.cfg.max_steps or -1,
                    save_strategy="no", seed=cell.seed, data_seed=cell.seed, disable_tqdm=not self.progress,
                    logging_strategy="steps" if self.progress else "no", logging_steps=10,
                    dataloader_pin_memory=torch.cuda.is_available(), **cpu_args(self.cfg.placement()))
        args.update(self.cfg.training_args)
        return ft.default_training_args(output_dir, **args)

    def _train(self, cell: Cell, data: Path, cdir: Path, record: dict, seconds: dict):
        """Fine-tune a fresh copy of the model for ``cell``; the tuned model, ready to evaluate."""
        method, frozen, note = method_band(cell.method, self.band, self.base.num_layers)
        layer_set = None
        if method == "freeze-set":                      # a scan's random set: full fine-tuning less the set
            method, layer_set, frozen = "full", frozen, None
        record.update(frozen_band=[frozen.start, frozen.end] if frozen else None, frozen_layers=layer_set, note=note)
        t = time.perf_counter()
        fcfg = from_mapping(FinetuneConfig, self.cfg.finetune_settings(self.run / "shared"), "finetune", model=self.cfg.model,
                            data=str(data), method=method, layers=str(frozen) if frozen else None,
                            out=str(cdir / "train" / "model"), overwrite=True)
        prep = ft.prepare(fcfg, self.training_args(cell, cdir / "train"), model=self.fresh_copy())
        if layer_set:
            freeze_set(prep, layer_set)
        fres = ft.train_and_save(prep)
        record["finetune"] = to_jsonable(fres)
        seconds["train"] = round(time.perf_counter() - t, 3)
        tuned = _tuned_model(prep)
        loss = f", loss {fres.train_loss:.3f}" if fres.train_loss is not None else ""
        self.log(f"  trained {fres.global_step} steps{loss} ({seconds['train']:.0f} s)")
        return tuned, frozen

    def _cell_drift(self, cell: Cell, tuned, frozen, cdir: Path, record: dict) -> None:
        """Drift of one tuned model; a failure is recorded, since drift is a diagnostic and the metrics stand."""
        try:
            d = self.drift_runner().cell(tuned, frozen)
            self._write_drift(cdir, {"scenario": cell.scenario, "method": cell.method, "lr": cell.lr,
                                     "seed": cell.seed}, d)
            record["drift"] = drift_summary(d)
            self.log(f"  drift: {describe_drift(record['drift'])}")
        except Exception as e:  # noqa: BLE001 - drift is a diagnostic; the cell's metrics stand
            record["drift_error"] = f"{type(e).__name__}: {e}"
            atomic_write(cdir / "drift_error.txt", traceback.format_exc())
            self.log(f"  [yellow]drift failed:[/yellow] {record['drift_error']}")

    def run_cell(self, cell: Cell, data: Path) -> dict:
        cdir = self.run / "cells" / cell.id
        seconds: dict[str, float] = {}
        record: dict = {}
        tuned, frozen = self._train(cell, data, cdir, record, seconds)
        t = time.perf_counter()
        res = evaluate(_with_progress(self.cfg.evaluate, self.progress), model=tuned, run_dir=cdir / "eval")
        seconds["evaluate"] = round(time.perf_counter() - t, 3)
        record["metrics"], record["counts"] = metrics_of(res), counts_of(res)
        if self.cfg.win_rate:
            from .winrate import cell_win_rate

            wr = cell_win_rate(self.run, cdir / "eval", self.cfg.evaluate)
            record["metrics"]["win_rate"], record["counts"]["win_rate"] = wr["win_rate"], wr["counts"]
        self.log(f"  {describe_metrics(record['metrics'])}")
        record["drift_error"] = None
        if self.cfg.drift.enabled:
            t = time.perf_counter()
            self._cell_drift(cell, tuned, frozen, cdir, record)
            seconds["drift"] = round(time.perf_counter() - t, 3)
        del tuned
        _free(self.base.model)
        if not self.cfg.keep_models:
            for folder in [cdir / "train" / "model", *(cdir / "train").glob("checkpoint-*")]:
                shutil.rmtree(folder, ignore_errors=True)
        record["model_kept"] = self.cfg.keep_models
        record["seconds"] = seconds
        return record

    def run_cells(self, cells: list[Cell], data: dict[str, Path]) -> tuple[list[dict], dict[str, int]]:
        """Every cell not done yet, each recorded in its cell.json as it finishes."""
        tally = {"ran": 0, "skipped": 0, "failed": 0}
        records = []
        for i, cell in enumerate(cells, 1):
            path = self.run / "cells" / cell.id / "cell.json"
            prev = read_json(path, "cell record") if path.is_file() else None
            if prev is not None and prev.get("status") == "done":
                tally["skipped"] += 1
                records.append(prev)
                self.log(f"[dim]cell {i}/{len(cells)} {cell.id}: done earlier, skipped[/dim]")
                continue
            again = f" (was {prev['status']})" if prev else ""
            self.log(f"[bold]cell {i}/{len(cells)}[/bold] {cell.id}{again}")
            rec = self._attempt(cell, data[cell.scenario], path, tally)
            records.append(rec)
            write_results(self.run, cells)
            if (self.run / "cells" / cell.id / "drift.json").is_file():
                write_drift(self.run, plots=False)
        return records, tally

    def _attempt(self, cell: Cell, data: Path, path: Path, tally: dict) -> dict:
        """Run one cell; an error fails the cell, not the grid."""
        rec = {"id": cell.id, "scenario": cell.scenario, "method": cell.method, "seed": cell.seed, "lr": cell.lr,
               "band": [self.band.start, self.band.end], "status": "running", "error": None, "metrics": None,
               "finetune": None, "seconds": {}, "started": _now(), "finished": None}
        write_json(path, rec)
        t = time.perf_counter()
        try:
            rec.update(self.run_cell(cell, data))
            rec["status"] = "done"
            tally["ran"] += 1
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the grid
            rec.update(status="failed", error=f"{type(e).__name__}: {e}" if not isinstance(e, SafetyLayersError)
                       else str(e))
            atomic_write(path.parent / "error.txt", traceback.format_exc())
            tally["failed"] += 1
            self.log(f"  [red]failed:[/red] {rec['error']}")
            _free(self.base.model if self.base is not None else None)
        rec["seconds"]["total"] = round(time.perf_counter() - t, 3)
        rec["finished"] = _now()
        write_json(path, rec)
        return rec

    # ----- drift on demand

    def drift_for_kept(self, cells: list[str] | None = None) -> dict | None:
        """Drift for finished cells whose tuned model is on disk and that have no drift.json yet."""
        exp = read_experiment(self.run)
        if not exp.get("band"):
            raise SafetyLayersError(f"{self.run} has no band yet: run the experiment first")
        self.band = LayerRange.parse(exp["band"])
        self.load_base()
        lpath, apath = self.run / "locate" / "result.json", self.run / "analysis" / "result.json"
        self.locate_result = read_json(lpath, "locate result") if lpath.is_file() else None
        self.analysis_result = read_json(apath, "analyze result") if apath.is_file() else None
        todo = []
        for p in sorted((self.run / "cells").glob("*/cell.json")):
            c = read_json(p, "cell record")
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
            self._write_drift(folder.parents[1], c, d)
            c["drift"], c["drift_error"] = drift_summary(d), None
            write_json(folder.parents[1] / "cell.json", c)
            del tuned
            _free(self.base.model)
        return write_drift(self.run)


def load_run(run_dir: str | Path, progress: bool = True, model=None) -> _Experiment:
    """Reopen a finished or partial run (for drift on demand)."""
    run = Path(run_dir)
    exp = read_experiment(run)
    cfg = ExperimentConfig.from_dict(exp["config"], where=str(run / "experiment.json"))
    return _Experiment(cfg, run, progress, model)


def drift_on_demand(run_dir: str | Path, cells: list[str] | None = None, progress: bool = True,
                    model=None) -> dict | None:
    """Compute drift for an experiment's finished cells whose tuned model was kept (``keep_models: true``).

    Cells that already have a drift.json are left as they are; cells whose model was deleted
    are skipped with a note. ``cells`` limits the work to those ids; ``model`` is the untuned
    model (default: the run's ``model`` loaded by name). Returns the assembled drift.json.
    """
    return load_run(run_dir, progress=progress, model=model).drift_for_kept(cells)


# --------------------------------------------------------------------------- the stages

def _check_inputs(cfg: ExperimentConfig) -> None:
    """What can fail before the run folder is written: the data files and their rows, the band
    against the model's layer count (when its config.json is at hand) and the TrainingArguments keys."""
    if cfg.data is None:
        raise SafetyLayersError("no benign data: set data: to an instruction file (JSON/JSONL/CSV of "
                                "instruction, input, output), e.g. alpaca_data_1k.json")
    if not Path(cfg.data).is_file():
        raise SafetyLayersError(f"data file not found: {cfg.data}")
    read_records(cfg.data, dedupe=True)           # rows without their fields fail before the run folder exists
    if cfg.harmful_data and any(parse_scenario(s)[0] == "harmful" for s in cfg.scenarios):
        read_harmful(cfg.harmful_data)
    layers = layer_count(cfg.model) if cfg.band else None
    if layers is not None:
        LayerRange.parse(cfg.band).check(layers)
    if cfg.training_args:
        from transformers import TrainingArguments

        fixed = ("output_dir", "learning_rate", "seed", "num_train_epochs", "per_device_train_batch_size")
        check_section_keys("training_args", cfg.training_args,
                           [f.name for f in fields(TrainingArguments) if f.name not in fixed])


def _band_and_baseline(ex: _Experiment, exp: dict) -> LayerRange:
    """Load the model, find the band, evaluate the untuned model; each recorded in experiment.json."""
    ex.load_base()
    band = ex.resolve_band(exp)
    exp.update(band=[band.start, band.end], band_source=ex.band_source)
    write_json(ex.run / "experiment.json", exp)
    exp["baseline"] = ex.baseline()
    write_json(ex.run / "experiment.json", exp)
    return band


def _finish(ex: _Experiment, exp: dict, cells: list[Cell], tally: dict) -> dict:
    """results.json/.md, the drift plots and the closing record in experiment.json."""
    results = write_results(ex.run, cells)
    if tally["ran"] or not any((ex.run / "drift").glob("*.png")):
        write_drift(ex.run)
    if write_scan(ex.run) is not None:
        ex.log(f"[bold]scan[/bold] table and plots in {ex.run / 'scan'}")
    exp["finished"] = _now()
    exp["cells"] = {"total": len(cells), **tally}
    write_json(ex.run / "experiment.json", exp)
    ex.log(f"[bold]done[/bold] {tally['ran']} cells run, {tally['skipped']} reused, {tally['failed']} failed; "
           f"results in {ex.run / 'results.md'}")
    return results


def run_experiment(cfg: ExperimentConfig | dict, run_dir: str | Path | None = None, progress: bool = True,
                   *, model=None) -> ExperimentResult:
    """Run (or resume) the experiment ``cfg`` in ``run_dir``; see the module docstring.

    ``model`` may be a loaded model to use instead of loading ``cfg.model`` (it is never
    trained: every cell tunes a deep copy).
    """
    t0 = time.perf_counter()
    if not isinstance(cfg, ExperimentConfig):
        cfg = ExperimentConfig.from_dict(cfg)
    run = Path(run_dir) if run_dir else Path("runs") / f"experiment-{slug(cfg.name or cfg.model)}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_inputs(cfg)
    exp = _open_run(run, cfg)
    if model is None:
        check_grid_memory(cfg)        # a grid that cannot train here stops before the model loads
    ex = _Experiment(cfg, run, progress, model)
    ex.log(f"[bold]experiment[/bold] {run}")
    data = {s: ex.scenario_data(s) for s in cfg.scenarios}
    cells = grid(cfg, ex.load_base().num_layers)
    band = _band_and_baseline(ex, exp)
    records, tally = ex.run_cells(cells, data)
    results = _finish(ex, exp, cells, tally)
    return ExperimentResult(
        run_dir=str(run), band=[band.start, band.end], band_source=ex.band_source, baseline=exp["baseline"],
        cells=[{k: r.get(k) for k in ("id", "status", "error", "metrics")} for r in records], results=results,
        ran=tally["ran"], skipped=tally["skipped"], failed=tally["failed"], seconds=round(time.perf_counter() - t0, 3))
