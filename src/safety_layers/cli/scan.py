"""``safety-layers scan``: the band-protection scan of an experiment config, alone.

The experiment YAML gives the model, the attack (scenario, learning rate, seeds), the data
and the evaluation; this command replaces its methods with full fine-tuning, every window of
``--width`` layers at ``--stride`` and ``--random`` seeded non-contiguous sets of the same size
(:mod:`safety_layers.experiment.scan`). Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import SafetyLayersError


def scan_args(p: argparse.ArgumentParser) -> None:
    from .commands import experiment_args

    experiment_args(p)
    p.add_argument("--width", type=int, default=5, help="layers frozen per window (the located band's width)")
    p.add_argument("--stride", type=int, default=1, help="layers between the starts of two windows")
    p.add_argument("--random", type=int, default=3,
                   help="random non-contiguous layer sets of the same size, the control (0: none)")


def scan_methods(width: int, stride: int, random: int) -> list[str]:
    """The experiment methods of a scan: full fine-tuning, the windows, the random sets."""
    if stride < 1:
        raise SafetyLayersError(f"--stride {stride}: the stride must be at least 1 layer")
    if width < 1:
        raise SafetyLayersError(f"--width {width}: a window must hold at least 1 layer")
    if random < 0:
        raise SafetyLayersError(f"--random {random}: give 0 (no control sets) or more")
    return ["full", f"scan:{width}/{stride}"] + ([f"random:{width}x{random}"] if random else [])


def run_scan(args: argparse.Namespace) -> int:
    from .commands import run_experiment

    rc = run_experiment(args, methods=scan_methods(args.width, args.stride, args.random))
    print(f"scan table and plots: {Path(args.out) / 'scan'}" if args.out else
          "scan table and plots: scan/ in the run folder")
    return rc
