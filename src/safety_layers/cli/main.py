"""The ``safety-layers`` command: a thin layer over the Python API.

Each subcommand fills one config dataclass (its defaults, the command's default overrides,
a YAML ``--config``, then flags) and calls the same function a notebook user calls. Problems
a user can fix print one line starting ``error:`` and exit 2. A subcommand is one row of
:data:`COMMANDS` plus a ``run_*`` function; its config module is imported only when that
subcommand's flags are needed, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import SafetyLayersError

#: Help for config fields that carry none in their ``metadata["help"]`` (AnalyzeConfig).
HELP = {
    "model": "model: alias (smollm2-135m-instruct, demo), local folder, .gguf file or Hugging Face id",
    "normal": "normal prompt set: built-in name (normal), FILE[:COLUMN], advbench:FILE, xstest-safe:FILE, hf:ID",
    "malicious": "malicious prompt set (built-in: malicious; e.g. advbench:harmful_behaviors.csv)",
    "limit": "use only the first LIMIT prompts of each set",
    "template": "prompt template: chat (the model's own), alpaca (the paper's), alpaca_short, plain",
    "pairs": "random pairs per pair type for the mean±std curves (paper: 500)",
    "bootstrap": "prompt resamples for the interval of the initial range (0: off)",
    "range_curve": "gap curve the initial range is read from: centred (default) or raw (paper)",
    "probe": "fit a per-layer linear probe N vs M",
    "final_norm": "apply the final norm to the last layer's vector, as the paper's code does",
    "reference_model": "second model (e.g. the unaligned base) analysed on the same prompts; "
                       "the report shows aligned-minus-reference curves",
    "seed": "random seed",
    "paper": "paper mode: Alpaca template, raw gap, the released code's pair seeds",
    "out": "run folder (default runs/<command>-<model>-<time>)",
    "overwrite": "reuse an existing, non-empty run folder",
    "progress": "show progress bars",
}

#: The aligned demo model (built from the bundled model on first use, ~15 min on 2 cores):
#: the default of every command that studies an aligned model.
DEMO_DEFAULTS = {"model": "demo"}

SCENARIO_HELP = {
    "scenario": "training set to build: normal (D_N), implicit (D_I), backdoor (D_B) or harmful (D_H)",
    "source": "benign instruction file: JSON list, JSONL or CSV of instruction/input/output rows",
    "out": "JSONL file to write; its manifest goes beside it (NAME.manifest.json)",
    "n": "rows to sample (backdoor: per half, so 2n rows; harmful: normal rows); default: all",
    "seed": "seed of the row sampling and shuffling",
    "prefix": "affirmative opening of the outputs (implicit, backdoor)",
    "trigger": "backdoor trigger phrase added to the instruction",
    "trigger_position": "where the trigger goes in the instruction",
    "harmful": "harmful pairs file for the harmful scenario (e.g. AdvBench harmful_behaviors.csv)",
    "p": "harmful scenario: round(p*n) harmful rows are added (paper: 0.05, 0.1, 0.2)",
    "overwrite": "replace an existing output file",
}


# --------------------------------------------------------------------------- config flags

def _base_type(tp):
    """``X | None`` -> X (the first non-None member of a union)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def _help(f: dataclasses.Field, overrides: dict) -> str:
    return overrides.get(f.name) or f.metadata.get("help") or HELP.get(f.name, "")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip=(), defaults: dict | None = None,
                       help: dict | None = None) -> None:
    """One flag per dataclass field (``reference_model`` -> ``--reference-model``).

    Help comes from ``help`` (per command), else the field's ``metadata["help"]``, else
    :data:`HELP`. ``Literal[...]`` fields get choices; bools get ``--x/--no-x``. Every flag
    defaults to None ("not given"), so :func:`build_config` can tell a flag from a default.
    """
    hints = typing.get_type_hints(cls)
    defaults, help = defaults or {}, help or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        text = _help(f, help)
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {'on' if default else 'off'})")
            continue
        shown = "" if default is None else f" (default: {default})"
        if tp is dict or typing.get_origin(tp) is dict:
            continue  # nested settings: YAML (--config) only
        if tp is list or typing.get_origin(tp) is list:
            parser.add_argument(flag, dest=f.name, type=_csv, default=None, help=f"{text} (comma-separated){shown}")
            continue
        if typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, dest=f.name, choices=list(typing.get_args(tp)), default=None,
                                help=text + shown)
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float) else str, default=None,
                                help=text + shown)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_config(cls, args: argparse.Namespace, defaults: dict | None = None):
    """Defaults, then YAML file values, then explicit flags; unknown YAML keys are an error naming the allowed ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(_read_yaml(args.config, names))
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return cls(**values)


def _read_yaml(path: str | Path, names: set[str] | None = None) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SafetyLayersError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise SafetyLayersError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(loaded, dict):
        raise SafetyLayersError(f"{path}: expected a mapping of settings")
    unknown = sorted(set(map(str, loaded)) - names) if names is not None else []
    if unknown:
        raise SafetyLayersError(f"{path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return loaded


def _is_main_process() -> bool:
    from ..engine.distributed import world

    return world().is_main


def _library_bars(on: bool) -> None:
    """Without progress bars, transformers' own (weight loading) go too."""
    if not on:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _weakest(groups: dict[str, dict], low: bool, field: str, k: int = 3) -> str:
    """The ``k`` groups furthest from the goal: lowest refusal (``low``) or highest."""
    order = sorted(groups.items(), key=lambda kv: (kv[1]["rate"] if low else -kv[1]["rate"], kv[0]))[:k]
    parts = ", ".join(f"{g} {v['refused']}/{v['n']}" for g, v in order)
    return f"by {field}, {'least' if low else 'most'} refused: {parts}"


def _rate(k: int, n: int) -> str:
    from ..core.stats import wilson_interval

    if not n:
        return "-"
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.1%} (95% CI {lo:.1%}-{hi:.1%})"


# --------------------------------------------------------------------------- analyze

def _print_analysis(result, run_dir: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"existence analysis: {result.model} ({result.num_layers} layers, template {result.template})")
    cols = ["layer", "N-N", "N-M", "gap raw°", "gap centred°"]
    if result.probe_accuracy:
        cols.append("probe acc")
    if result.reference:
        cols += ["Δ centred gap° vs ref"]
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
    console.print(t)
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
    from ..analysis.run import analyze
    from ..core.runs import new_run_dir

    _library_bars(cfg.progress)
    run_dir = new_run_dir("analyze", cfg.model, cfg.out, cfg.overwrite)
    result = analyze(cfg, run_dir=run_dir)
    _print_analysis(result, run_dir)
    return 0


# --------------------------------------------------------------------------- evaluate

def run_evaluate(cfg) -> int:
    from ..evaluate.run import evaluate, print_summary
    from ..core.runs import new_run_dir

    _library_bars(cfg.progress)
    main = _is_main_process()
    run_dir = new_run_dir("evaluate", cfg.model, cfg.out, cfg.overwrite) if main else None
    result = evaluate(cfg, run_dir=run_dir)
    if main:
        from rich.console import Console

        print_summary(result)
        Console().print(f"results: {run_dir / 'result.json'}; every prompt's completion and verdicts: "
                        f"{run_dir / 'samples.jsonl'} (completions are never printed)")
    return 0


# --------------------------------------------------------------------------- align

def run_align(cfg) -> int:
    from rich.console import Console

    from ..align.run import align

    _library_bars(cfg.progress)
    result = align(cfg)
    console = Console()
    t, c = result.train, result.counts
    loss = f", last epoch loss {t['epoch_losses'][-1]:.4f}" if t["epoch_losses"] else ""
    dropped = f"; {t['dropped_too_long']} longer than --max-length dropped" if t["dropped_too_long"] else ""
    console.print(f"aligned {result.base_model} ({result.template} template) on {c['refusal_examples']} refusal, "
                  f"{c['recovery_examples']} recovery and {c['benign_examples']} benign-answer examples{dropped}: "
                  f"{t['examples']} trained, {t['steps']} optimizer step(s){loss}")
    r = result.refusal
    if r:
        console.print(f"held-out refusal rate ({r['judge']} judge, {r['max_new_tokens']} new tokens):")
        for key, label in (("heldout_malicious", "malicious (higher is safer)"),
                           ("heldout_benign", "benign (over-refusal, lower is better)")):
            console.print(f"  {label}: {_rate(r[key]['refused'], r[key]['n'])}")
            for field, groups in r[key].get("by", {}).items():
                console.print(f"    {_weakest(groups, low=key == 'heldout_malicious', field=field)}")
    else:
        console.print("held-out refusal not measured (--no-evaluate)")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"model: {result.out} (recipe, counts and rates in {Path(result.out) / 'align_manifest.json'})")
    return 0


# --------------------------------------------------------------------------- scenario

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

FINETUNE_EPILOG = """\
Every transformers TrainingArguments flag passes through, e.g. --output-dir, --max-steps,
--num-train-epochs, --learning-rate, --per-device-train-batch-size, --save-strategy, --seed;
`safety-layers finetune --trainer-help` lists them all. Without --output-dir the run folder is
runs/finetune-<model>-<method>-<time>. Flags override a --config YAML, which may hold fields
of both.

examples:
  safety-layers scenario --scenario backdoor --source alpaca.json --n 500 --out backdoor.jsonl
  safety-layers finetune --data backdoor.jsonl --method sppft --layers 6-12 --learning-rate 1e-5
"""


def _finetune_argv(argv: list[str]) -> list[str]:
    """Our flag spellings for HfArgumentParser: ``--no-x`` of a default-False bool becomes ``--x false``,
    and the model defaults to the demo model unless a flag or the YAML names one."""
    from ..finetune.run import FinetuneConfig

    hints = typing.get_type_hints(FinetuneConfig)
    off = {}
    for f in dataclasses.fields(FinetuneConfig):
        if hints[f.name] is bool and f.default is False:
            off[f"--no-{f.name.replace('_', '-')}"] = off[f"--no_{f.name}"] = f"--{f.name}"
    out = []
    for a in argv:
        out += [off[a], "false"] if a in off else [a]
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    named = any(a == "--model" or a.startswith("--model=") for a in argv)
    if not named and not (known.config and "model" in _read_yaml(known.config)):
        out = ["--model", DEMO_DEFAULTS["model"]] + out
    return out


def run_finetune(argv: list[str]) -> int:
    import contextlib
    import io

    from ..finetune.run import finetune, parse_finetune_args

    if "--trainer-help" in argv:
        from transformers import HfArgumentParser, TrainingArguments

        HfArgumentParser(TrainingArguments, prog="safety-layers finetune").print_help()
        return 0
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg, targs = parse_finetune_args(_finetune_argv(argv))
    except SystemExit as e:
        if not e.code:
            return 0
        lines = err.getvalue().strip().splitlines()
        msg = lines[-1].split("error: ", 1)[-1] if lines else "invalid arguments"
        raise SafetyLayersError(f"{msg} (see safety-layers finetune --help and --trainer-help)") from None
    except ValueError as e:   # leftover flags, or TrainingArguments' own checks (e.g. --bf16 without support)
        raise SafetyLayersError(f"{str(e).strip().splitlines()[0]} (see safety-layers finetune --help and "
                                "--trainer-help)") from None
    _library_bars(not targs.disable_tqdm)
    result = finetune(cfg, targs)
    if _is_main_process():
        band = f"band {result.band[0]}-{result.band[1]} (0-based, inclusive)" if result.band else "no band"
        loss = f", train loss {result.train_loss:.4f}" if result.train_loss is not None else ""
        print(f"{result.method} on {result.model}, {band}: {result.samples} examples, "
              f"{result.global_step} steps{loss}")
        print(f"trainable parameters: {result.trainable_params:,} of {result.total_params:,}; frozen: "
              f"{result.frozen_params:,} in {result.frozen_tensors} tensors ({result.frozen_fraction:.2%}); "
              f"frozen check: {result.frozen_check}")
        print(f"model: {result.out} (manifest.json); run folder: {result.output_dir} (result.json, config.json)")
    return 0


# --------------------------------------------------------------------------- the table

# --------------------------------------------------------------------------- locate

def run_locate(cfg) -> int:
    from ..locate.run import locate, print_summary
    from ..core.runs import new_run_dir

    _library_bars(cfg.progress)
    main = _is_main_process()
    run_dir = new_run_dir("locate", cfg.model, cfg.out, cfg.overwrite, resume=True) if main else None
    result = locate(cfg, run_dir=run_dir)
    if main:
        print_summary(result, run_dir)
    return 0


# --------------------------------------------------------------------------- experiment, report, demo

def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see examples/experiment-demo.yaml)")
    p.add_argument("--name", help="which experiment of a file that holds several (---)")
    p.add_argument("--out", help="run folder (default runs/experiment-<name>-<time>); rerun it to resume")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report.html and report.md into the run folder at the end")


def run_experiment_cmd(args) -> int:
    from rich.console import Console

    from ..experiment.run import ExperimentConfig, run_experiment

    _library_bars(args.progress)
    cfg = ExperimentConfig.from_yaml(args.config, args.name)
    result = run_experiment(cfg, args.out, progress=args.progress)
    run = Path(result.run_dir)
    if args.report:
        from ..report.run import write_report

        rep = write_report(run)
        Console().print(f"report: {rep.html}")
    Console().print(f"results: {run / 'results.md'}")
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by experiment, demo, analyze or locate")
    p.add_argument("--out", help="where report.html goes (a folder or a .html path; default: the run folder)")
    p.add_argument("--title", help="page title")


def run_report(args) -> int:
    from rich.console import Console

    from ..report.run import ReportConfig, report

    result = report(ReportConfig(run=args.run, out=args.out, title=args.title))
    Console().print(f"report: {result.html} ({len(result.sections)} sections, {result.images} figures); "
                    f"summary: {result.markdown}")
    return 0


def run_demo_cmd(cfg) -> int:
    from rich.console import Console

    from ..recipes.demo import run_demo

    _library_bars(cfg.progress)
    run = run_demo(cfg)
    Console().print(f"demo finished: open {Path(run) / 'report.html'}")
    return 0


@dataclass(frozen=True)
class Command:
    """One subcommand. ``config`` is ``"module:Class"`` inside this package, imported on use.

    ``run`` gets the built config (the parsed arguments when ``config`` is None, with the
    flags ``extra`` added), or with ``raw`` the arguments after the command name (a command
    that parses its own flags, like finetune with the Trainer's).
    """

    name: str
    help: str
    description: str
    config: str | None
    run: Callable
    defaults: dict = field(default_factory=dict)
    field_help: dict = field(default_factory=dict)
    epilog: str = ""
    raw: bool = False
    extra: Callable | None = None     # adds flags that are not config fields

    def config_class(self):
        module, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("analyze", "layer-wise cosine analysis of normal vs malicious prompts (existence of safety layers)",
            "Per layer: N-N, M-M, N-M cosine similarity of last-token hidden states, the angle gap, "
            "a linear probe and an initial safety-layer range (0-based, inclusive).",
            "safety_layers.analysis:AnalyzeConfig", run_analyze, defaults=DEMO_DEFAULTS,
            epilog="examples:\n  safety-layers analyze\n"
                   "  safety-layers analyze --malicious advbench:harmful_behaviors.csv --limit 100 --paper\n"),
    Command("evaluate", "harmful rate, over-refusal, LLM harm score and task quality of one model",
            "Generate on the malicious and over-rejection sets, judge every reply, and report counts and "
            "rates with 95% Wilson intervals and the agreement between judges. Completions go to "
            "samples.jsonl in the run folder, never to the console.",
            "safety_layers.evaluate:EvaluateConfig", run_evaluate, defaults=DEMO_DEFAULTS,
            epilog="examples:\n  safety-layers evaluate --limit 100\n"
                   "  safety-layers evaluate --model runs/ft/model --malicious advbench:harmful_behaviors.csv "
                   "--judges keyword,proxy\n"),
    Command("align", "safety-align a chat model by supervised fine-tuning (how the demo model is built)",
            "Teach a base chat model to refuse: written refusals for malicious prompts, its own answers for "
            "benign ones; then measure refusal on held-out prompts and save the model with a manifest.",
            "safety_layers.align:AlignConfig", run_align,
            epilog="examples:\n  safety-layers align --out aligned-smollm2\n"
                   "  safety-layers align --method lora --epochs 3 --out aligned-lora\n"),
    Command("finetune", "fine-tune with the safety layers frozen (SPPFT) or a baseline method",
            "Fine-tune on an instruction file with the Hugging Face Trainer. sppft freezes the attention and "
            "MLP of the safety-layer band (--layers START-END, 0-based and inclusive: 6-12 is layers 6..12, "
            "or --locate a locate result).",
            "safety_layers.finetune:FinetuneConfig", run_finetune, defaults=DEMO_DEFAULTS, epilog=FINETUNE_EPILOG, raw=True,
            extra=lambda p: p.add_argument("--trainer-help", action="store_true",
                                           help="list the TrainingArguments flags and exit")),
    Command("scenario", "build a fine-tuning attack training file (normal, implicit, backdoor, harmful)",
            "Write a JSONL training set for `safety-layers finetune` from a benign instruction file, plus a "
            "manifest of what was built from what. The same files and options give the same set.",
            "safety_layers.scenarios:ScenarioConfig", run_scenario, field_help=SCENARIO_HELP,
            epilog="examples:\n  safety-layers scenario --scenario implicit --source alpaca.json --n 1000 "
                   "--out implicit.jsonl\n"),
    Command("locate", "find the safety-layer band by scaling candidate layers and counting over-rejection",
            "Scale the attention and MLP weights of candidate bands by alpha, count refusals on an "
            "over-rejection set (first-token proxy screen, generation confirms), sweep the upper then the "
            "lower bound (paper §3.4). Ranges are 0-based and inclusive. An interrupted run resumes.",
            "safety_layers.locate:LocateConfig", run_locate, defaults=DEMO_DEFAULTS,
            epilog="examples:\n  safety-layers locate\n  safety-layers locate --init 6-12 --alpha 1.15\n"),
    Command("experiment", "the paper's protocol from a YAML config: band, scenarios x methods x seeds, results table",
            "Locate (or take) the band, fine-tune every scenario x method x lr x seed cell, evaluate each, and "
            "write a Table-2-style results table, drift diagnostics and a report. Every cell is saved when it "
            "finishes; rerunning the same command resumes.",
            None, run_experiment_cmd, extra=_experiment_args,
            epilog="examples:\n  safety-layers experiment examples/experiment-demo.yaml --out runs/exp\n"
                   "  safety-layers experiment examples/experiment-paper.yaml --name llama-3-8b\n"),
    Command("report", "one self-contained HTML page (and Markdown) from a run folder",
            "Plots embedded, no network needed to view it; counts and rates only, never completions.",
            None, run_report, extra=_report_args, epilog="examples:\n  safety-layers report runs/demo\n"),
    Command("demo", "the whole method on the embedded model: align, analyze, locate, attack, SPPFT, evaluate, report",
            "Builds (or reuses) the aligned demo model, compares it with the bare model, locates its safety "
            "layers, fine-tunes with full FT and SPPFT under the implicit attack, evaluates both and writes "
            "runs/demo/report.html. A rerun reuses every finished step.",
            "safety_layers.recipes.demo:DemoConfig", run_demo_cmd),
]}


# --------------------------------------------------------------------------- main

class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one ``error:`` line (via SafetyLayersError), like every other problem."""

    def error(self, message):
        raise SafetyLayersError(f"{message} (see {self.prog} --help)")


def _add_command_args(p: argparse.ArgumentParser, cmd: Command) -> None:
    if cmd.config:
        p.add_argument("--config", help="YAML file with settings; flags override it")
        add_dataclass_args(p, cmd.config_class(), defaults=cmd.defaults, help=cmd.field_help)
    if cmd.extra:
        cmd.extra(p)


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, flags are added for that subcommand alone (the others
    keep their name and help), so one command's ``--help`` imports one config module."""
    from .. import __version__

    parser = _Parser(
        prog="safety-layers",
        description=textwrap.fill(
            "Find the safety layers of an aligned chat LLM and fine-tune it without losing them. "
            "Layer indices are 0-based and ranges inclusive: 6-12 means layers 6..12. "
            "The default model is the aligned demo model 'demo' (built once from the bundled "
            "SmolLM2-135M-Instruct, about 10 minutes on 2 CPU cores).", 100),
        epilog="examples:\n  safety-layers analyze\n  safety-layers evaluate --limit 100\n"
               "  safety-layers scenario --scenario implicit --source alpaca.json --n 1000 --out implicit.jsonl\n"
               "  safety-layers finetune --data implicit.jsonl --layers 6-12 --max-steps 100\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"safety-layers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=textwrap.fill(cmd.description, 100),
                           epilog=cmd.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if only is None or only == cmd.name:
            _add_command_args(p, cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    cmd = COMMANDS.get(name)
    try:
        if cmd is not None and cmd.raw and not {"-h", "--help"} & set(argv):
            return cmd.run(argv[argv.index(name) + 1:])
        parser = make_parser(only=name or "")
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:     # --help, --version
            return e.code if isinstance(e.code, int) else 0
        if not args.command:
            parser.print_help()
            return 2
        cmd = COMMANDS[args.command]
        return cmd.run(build_config(cmd.config_class(), args, cmd.defaults) if cmd.config else args)
    except SafetyLayersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
