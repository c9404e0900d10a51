"""The ``safety-layers`` command: a thin layer over the Python API.

Each subcommand is one row of :data:`COMMANDS`: a config dataclass whose command-line
fields become its flags (:mod:`.args`), and a function of :mod:`.commands` that calls the
same API a notebook user calls. Settings come from the config's defaults, then a YAML
``--config``, then flags. Problems a user can fix print one line starting ``error:`` and
exit 2. A config module is imported only when its command's flags are needed, so
``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import SafetyLayersError
from . import attention, commands, judge_check, plan, scan, transplant
from .args import add_config_args, build_config
from .checks import os_error_line


@dataclass(frozen=True)
class Command:
    """One subcommand.

    ``config`` is ``"module:Class"``, imported on use; ``run`` gets the built config, or the
    parsed arguments when ``config`` is None or ``raw`` (a command that builds its own,
    like finetune with the Trainer's flags, which arrive in ``args.passthrough``).
    ``positional`` names config fields given without a flag; ``yaml`` adds ``--config``;
    ``extra`` adds arguments that are not config fields; ``interrupted`` is what Ctrl-C
    leaves behind and what a rerun does.
    """

    name: str
    help: str
    description: str
    run: Callable
    config: str | None = None
    epilog: str = ""
    positional: tuple[str, ...] = ()
    yaml: bool = True
    raw: bool = False
    passthrough: bool = False
    extra: Callable | None = None
    interrupted: str = "finished work is kept; rerun the same command to continue"

    def config_class(self):
        module, _, attr = self.config.partition(":")
        return getattr(importlib.import_module(module), attr)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        if self.config:
            add_config_args(p, self.config_class(), yaml=self.yaml, positional=self.positional,
                            aliases=self.passthrough)
        if self.extra:
            self.extra(p)


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


def _trainer_help_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trainer-help", action="store_true", help="list the TrainingArguments flags and exit")


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("analyze", "layer-wise cosine analysis of normal vs malicious prompts (existence of safety layers)",
            "Per layer: N-N, M-M, N-M cosine similarity of last-token hidden states, the angle gap, "
            "a linear probe and an initial safety-layer range (0-based, inclusive).",
            commands.run_analyze, "safety_layers.analysis:AnalyzeConfig",
            interrupted="nothing was written (the analysis writes its folder when it ends); rerun to start again",
            epilog="examples:\n  safety-layers analyze\n"
                   "  safety-layers analyze --malicious advbench:harmful_behaviors.csv --limit 100 --paper\n"),
    Command("attention", "attention maps of the last prompt token per layer, and content vs function word shares",
            "For each layer, the last prompt token's attention to the question's tokens (mean over heads): a "
            "heatmap per example pair (the paper's five built in) and, over the normal and malicious sets, the "
            "share of it on content words rather than function words. Ranges are 0-based and inclusive.",
            attention.run_attention, "safety_layers.analysis.attention:AttentionConfig",
            epilog="examples:\n  safety-layers attention --band 10-14\n"
                   "  safety-layers attention --model smollm2-135m-instruct --out runs/attention-bare\n"),
    Command("evaluate", "harmful rate, over-refusal, LLM harm score and task quality of one model",
            "Generate on the malicious and over-rejection sets, judge every reply, and report counts and "
            "rates with 95% Wilson intervals and the agreement between judges. Completions go to "
            "samples.jsonl in the run folder, never to the console.",
            commands.run_evaluate, "safety_layers.evaluate:EvaluateConfig",
            interrupted="completions generated so far are in the generation cache; rerun the same command to "
                        "reuse them",
            epilog="examples:\n  safety-layers evaluate --limit 100\n"
                   "  safety-layers evaluate --model runs/ft/model --malicious advbench:harmful_behaviors.csv "
                   "--judges keyword,proxy\n"),
    Command("align", "safety-align a chat model by supervised fine-tuning (how the demo model is built)",
            "Teach a base chat model to refuse: written refusals for malicious prompts, its own answers for "
            "benign ones; then measure refusal on held-out prompts and save the model with a manifest. "
            "The research knobs of the recipe live in YAML (--config) and the Python API.",
            commands.run_align, "safety_layers.align:AlignConfig",
            interrupted="no model was written; the self-distilled answers are cached and training checkpoints "
                        "(every checkpoint_minutes, 5 by default) stay in <out>.work: rerun the same command "
                        "to continue from the last checkpoint",
            epilog="examples:\n  safety-layers align --out aligned-smollm2\n"
                   "  safety-layers align --method lora --out aligned-lora\n"),
    Command("finetune", "fine-tune with the safety layers frozen (SPPFT) or a baseline method",
            "Fine-tune on an instruction file with the Hugging Face Trainer. sppft freezes the attention and "
            "MLP of the safety-layer band (--layers START-END, 0-based and inclusive: 6-12 is layers 6..12, "
            "or --locate a locate result).",
            commands.run_finetune, "safety_layers.finetune:FinetuneConfig", epilog=FINETUNE_EPILOG,
            raw=True, passthrough=True, extra=_trainer_help_flag),
    Command("scenario", "build a fine-tuning attack training file (normal, implicit, backdoor, harmful)",
            "Write a JSONL training set for `safety-layers finetune` from a benign instruction file, plus a "
            "manifest of what was built from what. The same files and options give the same set; the "
            "prefix and the backdoor trigger are set in YAML (--config).",
            commands.run_scenario, "safety_layers.scenarios:ScenarioConfig", interrupted="nothing was written",
            epilog="examples:\n  safety-layers scenario --scenario implicit --source alpaca.json --n 1000 "
                   "--out implicit.jsonl\n"),
    Command("locate", "find the safety-layer band by scaling candidate layers and counting over-rejection",
            "Scale the attention and MLP weights of candidate bands by alpha, count refusals on an "
            "over-rejection set (first-token proxy screen, generation confirms), sweep the upper then the "
            "lower bound (paper §3.4). Ranges are 0-based and inclusive. An interrupted run resumes.",
            commands.run_locate, "safety_layers.locate:LocateConfig",
            interrupted="finished trials are kept in the run folder; rerun with the same --out to continue",
            epilog="examples:\n  safety-layers locate\n  safety-layers locate --init 6-12 --alpha 1.15\n"),
    Command("experiment", "the paper's protocol from a YAML config: band, scenarios x methods x seeds, results table",
            "Locate (or take) the band, fine-tune every scenario x method x lr x seed cell, evaluate each, and "
            "write a Table-2-style results table, drift diagnostics and a report. Every cell is saved when it "
            "finishes; rerunning the same command resumes.",
            commands.run_experiment, extra=commands.experiment_args,
            interrupted="finished cells are kept in the run folder; rerun with the same --out to continue",
            epilog="examples:\n  safety-layers experiment examples/experiment-demo.yaml --out runs/exp\n"
                   "  safety-layers experiment examples/experiment-paper.yaml --name llama-3-8b\n"),
    Command("scan", "band-protection scan: freeze each window of layers in turn under the same attack",
            "Run the experiment config's attack once per window of --width layers (stride --stride), plus full "
            "fine-tuning and --random seeded non-contiguous layer sets of the same size, and plot the harmful rate "
            "after the attack against the window's position, the located band and the analyze range marked. One "
            "cell per window; rerunning the same command resumes.",
            scan.run_scan, extra=scan.scan_args,
            epilog="examples:\n  safety-layers scan studies/band_scan.yaml --width 5 --out runs/scan\n"
                   "  safety-layers scan studies/band_scan.yaml --name gentle --width 5 --stride 2 --random 0\n"),
    Command("transplant", "copy a donor's layers into a base model of the same architecture, save and evaluate it",
            "Copy the attention, MLP and/or norms of layers START-END (0-based, inclusive) from the donor into "
            "the base, save the result (safetensors, with a manifest of what was copied) and evaluate it, the "
            "base and the donor with the evaluate step (paper A.5.3, run in both directions as a causal test).",
            transplant.run_transplant, "safety_layers.transplant:TransplantConfig",
            epilog="examples:\n  safety-layers transplant --base smollm2-135m-instruct --donor demo --layers 10-14\n"
                   "  safety-layers transplant --base demo --donor smollm2-135m-instruct --layers 15-29 "
                   "--parts attn,mlp --out runs/tp\n"),
    Command("report", "one self-contained HTML page (and Markdown) from a run folder",
            "Plots embedded, no network needed to view it; counts and rates only, never completions.",
            commands.run_report, "safety_layers.report:ReportConfig", positional=("run",), yaml=False,
            interrupted="nothing was written",
            epilog="examples:\n  safety-layers report runs/demo\n"),
    Command("judge-check", "how well each refusal judge agrees with human labels on a file of replies",
            "Run each judge on labelled replies and print accuracy, refusal precision, recall, F1 and Cohen's kappa, "
            "per judge and per reply style, so a judge can be validated on a model's own replies before its rates "
            "are trusted.", judge_check.run, yaml=False, epilog=judge_check.EPILOG, extra=judge_check.add_args),
    Command("plan", "parameters, frozen fraction and memory per stage of a fine-tuning, before anything loads",
            "Build the model from its config on the meta device (no weight is read: a folder holding only "
            "config.json is enough), apply the method's freezing, and print total, trainable and frozen "
            "parameters and the memory of inference and of one training step (weights, gradients, AdamW "
            "states, activations with and without gradient checkpointing) next to the devices found.",
            plan.run_plan, "safety_layers.finetune.plan:PlanConfig",
            epilog="examples:\n  safety-layers plan --model meta-llama/Meta-Llama-3-8B-Instruct --band 6-12\n"
                   "  safety-layers plan --model ./llama-config-folder --method full --dtype float32 --json\n"),
    Command("demo", "the whole method on the embedded model: align, analyze, locate, attack, SPPFT, evaluate, report",
            "Builds (or reuses) the aligned demo model, compares it with the bare model, locates its safety "
            "layers, fine-tunes with full FT and SPPFT under the implicit attack, evaluates both and writes "
            "runs/demo/report.html. A rerun reuses every finished step.",
            commands.run_demo, "safety_layers.recipes.demo:DemoConfig"),
]}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes become one ``error:`` line (via SafetyLayersError), like every other problem."""

    def error(self, message):
        raise SafetyLayersError(f"{message} (see {self.prog} --help)")


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``only``, arguments are added for that subcommand alone (the
    others keep their name and help), so one command's ``--help`` imports one config module."""
    from ..core import __version__

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
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"safety-layers {__version__}")
    parser.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=textwrap.fill(cmd.description, 100),
                           epilog=cmd.epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                           allow_abbrev=False)
        if only is None or only == cmd.name:
            cmd.add_arguments(p)
    return parser


ALLOW_PICKLE_HELP = ("load .bin (pickle) weights of a model folder without safetensors; unpickling runs any "
                     "code the file holds, so only for files you trust (any position on the line)")


@contextlib.contextmanager
def _pickle_switch(on: bool):
    """``--allow-pickle`` for the length of one command (core.models reads it from the environment)."""
    from ..core.models import ALLOW_PICKLE_ENV

    before = os.environ.get(ALLOW_PICKLE_ENV)
    if on:
        os.environ[ALLOW_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop(ALLOW_PICKLE_ENV, None)
        elif on:
            os.environ[ALLOW_PICKLE_ENV] = before


def run(argv: list[str]) -> int:
    """Parse ``argv``, build the command's config, run it; SafetyLayersError propagates.
    ``--allow-pickle`` is a switch of the whole line, accepted before or after the command."""
    cut = argv.index("--") if "--" in argv else len(argv)
    pickle = "--allow-pickle" in argv[:cut]
    argv = [a for a in argv[:cut] if a != "--allow-pickle"] + argv[cut:]
    with _pickle_switch(pickle):
        return _dispatch(argv)


def _dispatch(argv: list[str]) -> int:
    name = next((a for a in argv if not a.startswith("-")), "")
    parser = make_parser(only=name)
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as e:     # --help, --version
        return e.code if isinstance(e.code, int) else 0
    if not args.command:
        parser.print_help()
        return 2
    cmd = COMMANDS[args.command]
    if rest and not cmd.passthrough:
        raise SafetyLayersError(f"unrecognized arguments: {' '.join(rest)} (see safety-layers {cmd.name} --help)")
    args.passthrough = rest
    if cmd.config is None or cmd.raw:
        return cmd.run(args)
    cfg = build_config(cmd.config_class(), args)
    commands.paper_note(cfg)
    return cmd.run(cfg)


def main(argv: list[str] | None = None) -> int:
    """The console script: problems a user can fix (SafetyLayersError, a write the file system
    refuses) are one ``error:`` line and status 2; Ctrl-C says what a rerun does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except SafetyLayersError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        cmd = COMMANDS.get(next((a for a in argv if not a.startswith("-")), ""))
        print(f"interrupted: {str(e) or (cmd.interrupted if cmd else 'nothing was written')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
