"""Localization: scale candidate bands, count over-rejection, sweep the bounds (paper §3.4).

:mod:`.search` holds the sweep rules (no model, no files), :mod:`.trials` the counting on the
model and its journal, :mod:`.plots` the figure, :mod:`.run` the step itself.
"""

from .plots import plot_sweeps
from .run import LocateConfig, LocateResult, locate, print_summary

__all__ = ["LocateConfig", "LocateResult", "locate", "plot_sweeps", "print_summary"]
