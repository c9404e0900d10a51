"""The ``safety-layers`` command: a thin layer over the Python API.

Each subcommand fills one config dataclass (YAML ``--config`` first, then flags) and calls
the same function a notebook user calls. Problems a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from .errors import SafetyLayersError

HELP = {
    "model": "model: alias (smollm2-135m-instruct), local folder, .gguf file or Hugging Face id",
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


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per dataclass field (``reference_model`` -> ``--reference-model``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = HELP.get(f.name, "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float) else str, default=None,
                                help=f"{help_text} (default: {default})")


def build_config(cls, args: argparse.Namespace):
    """YAML file values, then explicit flags; unknown YAML keys are an error naming the allowed ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    if getattr(args, "config", None):
        import yaml
        path = Path(args.config)
        if not path.is_file():
            raise SafetyLayersError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SafetyLayersError(f"{path}: expected a mapping of settings")
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise SafetyLayersError(f"{path}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        values.update(loaded)
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    return cls(**values)


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


def cmd_analyze(args) -> int:
    from .analysis import AnalyzeConfig, analyze
    from .runs import new_run_dir

    cfg = build_config(AnalyzeConfig, args)
    run_dir = new_run_dir("analyze", cfg.model, cfg.out, cfg.overwrite)
    result = analyze(cfg, run_dir=run_dir)
    _print_analysis(result, run_dir)
    return 0


# --------------------------------------------------------------------------- main

def make_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .analysis import AnalyzeConfig

    parser = argparse.ArgumentParser(
        prog="safety-layers",
        description="Find the safety layers of an aligned chat LLM and fine-tune it without losing them. "
                    "Layer indices are 0-based and ranges inclusive: 6-12 means layers 6..12.",
        epilog="examples:\n  safety-layers analyze\n"
               "  safety-layers analyze --malicious advbench:harmful_behaviors.csv --limit 100 --paper\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"safety-layers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("analyze", help="layer-wise cosine analysis of normal vs malicious prompts (existence of safety layers)",
                       description="Per layer: N-N, M-M, N-M cosine similarity of last-token hidden states, the angle gap, "
                                   "a linear probe and an initial safety-layer range (0-based, inclusive).")
    p.add_argument("--config", help="YAML file with settings; flags override it")
    add_dataclass_args(p, AnalyzeConfig)
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except SafetyLayersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
