"""What each subcommand does with its config: call the Python API, print counts and paths.

Every ``run_*`` takes the built config (or, for experiment and finetune, the parsed
arguments) and returns the exit status. Heavy modules are imported inside the functions,
so ``--help`` stays quick. Completions are never printed: they go to the run folders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
from pathlib import Path

from ..core.errors import SafetyLayersError
from .checks import check_inputs
from ..core.placement import DEVICE_HELP, DTYPE_HELP, DTYPES


def is_main_process() -> bool:
    from ..engine.distributed import world

    return world().is_main


def paper_note(cfg) -> None:
    """``paper mode set: template=alpaca, ...``: what paper mode filled in (never what the user set)."""
    applied = getattr(cfg, "paper_set", None)
    if applied and is_main_process():
        print(f"paper mode set: {', '.join(applied)}")


def library_bars(on: bool) -> None:
    """Without progress bars, transformers' own (weight loading) go too."""
    if not on:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _rate(k: int, n: int) -> str:
    from ..core.stats import wilson_interval

    if not n:
        return "-"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.1%} (95% CI {lo:.1%}-{hi:.1%})"


def _weakest(groups: dict[str, dict], low: bool, field: str, k: int = 3) -> str:
    """The ``k`` groups furthest from the goal: lowest refusal (``low``) or highest."""
    order = sorted(groups.items(), key=lambda kv: (kv[1]["rate"] if low else -kv[1]["rate"], kv[0]))[:k]
    parts = ", ".join(f"{g} {v['refused']}/{v['n']}" for g, v in order)
    return f"by {field}, {'least' if low else 'most'} refused: {parts}"


# --------------------------------------------------------------------------- analyze

def _analysis_table(result):
    from rich.table import Table

    t = Table(title=f"existence analysis: {result.model} ({result.num_layers} layers, template {result.template})")
    cols = ["layer", "N-N", "N-M", "gap raw°", "gap centred°"]
    cols += ["probe acc"] if result.probe_accuracy else []
    cols += ["Δ centred gap° vs ref"] if result.reference else []
    for c in cols:
        t.add_column(c, justify="right")
    rng = result.initial_range
    for k in range(result.num_layers):
        row = [f"{k}", f"{result.raw.nn_exact[k]:.4f}", f"{result.raw.nm_exact[k]:.4f}",
               f"{result.raw.gap_exact[k]:+.2f}", f"{result.centred.gap_exact[k]:+.2f}"]
        if result.probe_accuracy:
            row.append(f"{result.probe_accuracy[k]:.3f}")
        if result.reference:
            row.append(f"{result.reference['centred_gap_difference'][k]:+.2f}")
        t.add_row(*row, style="bold red" if rng and rng[0] <= k <= rng[1] else None)
    return t


def _print_analysis(result, run_dir: Path | None) -> None:
    from rich.console import Console

    console = Console()
    console.print(_analysis_table(result))
    rng = result.initial_range
    if rng:
        b = result.bootstrap
        ci = (f"; bootstrap over {b['samples']} resamples: start {b['start_ci'][0]}-{b['start_ci'][1]}, "
              f"end {b['end_ci'][0]}-{b['end_ci'][1]}, most often {b['mode'][0]}-{b['mode'][1]} "
              f"({b['mode_share']:.0%})") if b.get("mode") else ""
        console.print(f"initial safety-layer range: [bold]{rng[0]}-{rng[1]}[/bold] (0-based, inclusive, "
                      f"{result.range_curve} gap){ci}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if run_dir:
        console.print(f"results: {run_dir}/result.json, figure: {run_dir}/analysis.png")


def run_analyze(cfg) -> int:
    from ..analysis import analyze
    from ..core.runs import run_folder

    library_bars(cfg.progress)
    check_inputs(cfg, prompts=("normal", "malicious"), models=("model", "reference_model"))
    with run_folder("analyze", cfg.model, cfg.out, overwrite=cfg.overwrite) as run_dir:
        result = analyze(cfg, run_dir=run_dir)
    _print_analysis(result, run_dir)
    return 0


# --------------------------------------------------------------------------- evaluate, locate

def run_evaluate(cfg) -> int:
    from ..core.runs import run_folder
    from ..evaluate import evaluate
    from ..evaluate.run import print_summary

    library_bars(cfg.progress)
    main = is_main_process()
    check_inputs(cfg, prompts=("malicious", "over_rejection"), files=("quality",), models=("model",))
    with run_folder("evaluate", cfg.model, cfg.out, overwrite=cfg.overwrite) if main else \
            contextlib.nullcontext() as run_dir:
        result = evaluate(cfg, run_dir=run_dir)
    if main:
        print_summary(result)
        print(f"results: {run_dir / 'result.json'}; every prompt's completion and verdicts: "
              f"{run_dir / 'samples.jsonl'} (completions are never printed)")
    return 0


def run_locate(cfg) -> int:
    from ..core.runs import run_folder
    from ..locate import locate
    from ..locate.run import print_summary

    library_bars(cfg.progress)
    main = is_main_process()
    check_inputs(cfg, prompts=("over_rejection", "malicious"), models=("model",))
    with run_folder("locate", cfg.model, cfg.out, overwrite=cfg.overwrite, resume=True) if main else \
            contextlib.nullcontext() as run_dir:
        try:
            result = locate(cfg, run_dir=run_dir)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"finished trials are kept in {run_dir}; rerun with --out {run_dir} to "
                                    "continue") from None
    if main:
        print_summary(result, run_dir)
    return 0


# --------------------------------------------------------------------------- align, scenario

def run_align(cfg) -> int:
    from ..align import align

    library_bars(cfg.progress)
    result = align(cfg)
    t, c = result.train, result.counts
    loss = f", last epoch loss {t['epoch_losses'][-1]:.4f}" if t["epoch_losses"] else ""
    dropped = f"; {t['dropped_too_long']} longer than max_length dropped" if t["dropped_too_long"] else ""
    print(f"aligned {result.base_model} ({result.template} template) on {c['refusal_examples']} refusal, "
          f"{c['recovery_examples']} recovery and {c['benign_examples']} benign-answer examples{dropped}: "
          f"{t['examples']} trained, {t['steps']} optimizer step(s){loss}")
    r = result.refusal
    if r:
        print(f"held-out refusal rate ({r['judge']} judge, {r['max_new_tokens']} new tokens):")
        for key, label in (("heldout_malicious", "malicious (higher is safer)"),
                           ("heldout_benign", "benign (over-refusal, lower is better)")):
            print(f"  {label}: {_rate(r[key]['refused'], r[key]['n'])}")
            for field, groups in r[key].get("by", {}).items():
                print(f"    {_weakest(groups, low=key == 'heldout_malicious', field=field)}")
    else:
        print("held-out refusal not measured (evaluate: false)")
    for note in result.notes:
        print(f"note: {note}")
    print(f"model: {result.out} (recipe, counts and rates in {Path(result.out) / 'align_manifest.json'})")
    return 0


def run_scenario(cfg) -> int:
    from ..scenarios import build_scenario

    result = build_scenario(cfg)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
    dropped = ", ".join(f"{v} {k}" for k, v in result.dropped.items() if v)
    print(f"scenario {result.scenario}: {result.total} rows ({counts}) from {result.source}"
          + (f"; dropped from the source: {dropped}" if dropped else ""))
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"training file: {result.out}; manifest: {result.manifest}")
    return 0


# --------------------------------------------------------------------------- finetune

def _trainer_parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser(TrainingArguments, prog="safety-layers finetune")


def _split_yaml(path: str | None, values: dict, ours: set[str], trainer: set[str]) -> tuple[dict, dict]:
    """A finetune YAML holds fields of FinetuneConfig and of TrainingArguments, flat."""
    from ..core.config import unknown_key_error

    for key in values:
        if key not in ours and key not in trainer:
            raise unknown_key_error(path, key, ours | trainer, shown=f"{', '.join(sorted(ours))} and every "
                                    "TrainingArguments field (safety-layers finetune --trainer-help)")
    return ({k: v for k, v in values.items() if k in ours},
            {k: v for k, v in values.items() if k in trainer and k not in ours})


def training_arguments(defaults: dict, argv: list[str]):
    """TrainingArguments from the YAML's trainer keys and the flags our parser left over;
    argparse's and TrainingArguments' own complaints become one line."""
    parser = _trainer_parser()
    parser.set_defaults(**defaults)
    err = io.StringIO()
    hint = "(see safety-layers finetune --help and --trainer-help)"
    try:
        with contextlib.redirect_stderr(err):
            (targs,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        msg = lines[-1].split("error: ", 1)[-1] if lines else "invalid arguments"
        raise SafetyLayersError(f"{msg} {hint}") from None
    except ValueError as e:     # leftover flags, or TrainingArguments' own checks (--bf16 without support)
        raise SafetyLayersError(f"{str(e).strip().splitlines()[0]} {hint}") from None
    return targs


def run_finetune(args: argparse.Namespace) -> int:
    from transformers import TrainingArguments

    from ..core.config import check_types, init_fields
    from ..core.runs import default_run_dir, run_folder
    from ..finetune import FinetuneConfig, finetune
    from ..finetune.config import paper_training_args
    from .args import build_config, yaml_values

    if args.trainer_help:
        _trainer_parser().print_help()
        return 0
    trainer_names = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    ours, theirs = _split_yaml(args.config, yaml_values(args), set(init_fields(FinetuneConfig)), trainer_names)
    theirs = check_types(TrainingArguments, theirs, str(args.config))
    cfg = build_config(FinetuneConfig, args, ours)
    if cfg.paper:              # the Trainer settings paper mode fixes, unless the YAML or a flag gave them
        flagged = {a.split("=")[0].lstrip("-").replace("-", "_") for a in args.passthrough if a.startswith("--")}
        fixed = paper_training_args(cfg.model, set(theirs) | flagged)
        theirs.update(fixed)
        cfg.paper_set.extend(f"{k}={v}" for k, v in fixed.items())
    paper_note(cfg)
    theirs.setdefault("output_dir", str(default_run_dir("finetune", cfg.model, cfg.method)))
    if cfg.device == "cpu":
        theirs.setdefault("use_cpu", True)          # the Trainer picks its device itself
    targs = training_arguments(theirs, args.passthrough)
    library_bars(not targs.disable_tqdm)
    main = is_main_process()
    with run_folder("finetune", cfg.model, targs.output_dir, resume=True, flag="--output-dir") if main else \
            contextlib.nullcontext():                                       # its checkpoints may be resumed
        result = finetune(cfg, targs)
    if main:
        band = f"band {result.band[0]}-{result.band[1]} (0-based, inclusive)" if result.band else "no band"
        loss = f", train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
        print(f"{result.method} on {result.model}, {band}: {result.samples} examples, "
              f"{result.global_step} steps{loss}")
        print(f"trainable parameters: {result.trainable_params:,} of {result.total_params:,}; frozen: "
              f"{result.frozen_params:,} in {result.frozen_tensors} tensors ({result.frozen_fraction:.2%}); "
              f"frozen check: {result.frozen_check}")
        print(f"model: {result.out} (manifest.json); run folder: {result.output_dir} (result.json, config.json)")
    return 0


# --------------------------------------------------------------------------- experiment, report, demo

def experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see examples/experiment-demo.yaml)")
    p.add_argument("--name", help="which experiment of a file that holds several (---)")
    p.add_argument("--device", help=f"{DEVICE_HELP} (overrides the file's device:)")
    p.add_argument("--dtype", choices=DTYPES, help=f"{DTYPE_HELP} (overrides the file's dtype:)")
    p.add_argument("--out", help="run folder (default runs/experiment-<name>-<time>); rerun it to resume")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report.html and report.md into the run folder at the end")
    p.add_argument("--dry-run", action="store_true", help="list every cell with its training rows and steps; run nothing")


def run_experiment(args: argparse.Namespace, methods: list[str] | None = None) -> int:
    """Run the YAML's experiment; ``methods`` replaces its methods (the scan command's)."""
    from ..core.runs import run_folder
    from ..experiment import ExperimentConfig, run_experiment as run

    library_bars(args.progress)
    cfg = ExperimentConfig.from_yaml(args.config, args.name, device=args.device, dtype=args.dtype)
    if methods is not None:
        cfg = dataclasses.replace(cfg, methods=methods)
    paper_note(cfg)
    if args.dry_run:
        from ..experiment.plan import plan_text

        print(plan_text(cfg))
        return 0
    with run_folder("experiment", cfg.name or cfg.model, args.out, resume=True) as folder:   # a rerun resumes
        run(cfg, folder, progress=args.progress)
    if args.report:
        from ..report import write_report

        print(f"report: {write_report(folder).html}")
    print(f"results: {folder / 'results.md'}")
    return 0


def run_report(cfg) -> int:
    from ..report import report

    if Path(cfg.run).is_file():
        raise SafetyLayersError(f"{cfg.run} is a file: give the run folder that holds it (e.g. {Path(cfg.run).parent})")
    result = report(cfg)
    print(f"report: {result.html} ({len(result.sections)} sections, {result.images} figures); "
          f"summary: {result.markdown}")
    return 0


def run_demo(cfg) -> int:
    from ..core.runs import run_folder
    from ..recipes.demo import run_demo as run

    library_bars(cfg.progress)
    with run_folder("demo", cfg.model, cfg.out, resume=True):             # a rerun reuses what it holds
        folder = run(cfg)
    print(f"demo finished: open {Path(folder) / 'report.html'}")
    return 0
