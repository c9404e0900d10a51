"""The SPPFT experiment: scenarios x methods x learning rates x seeds, resumable, with drift diagnostics.

:mod:`.config` holds the settings (typed step configs per YAML section), :mod:`.grid` the
cells, :mod:`.runner` the run folder and the stages, :mod:`.results` the aggregation and
:mod:`.drift` the diagnostics of each tuned model.
"""

from .config import DriftConfig, ExperimentConfig
from .grid import BASE_METHODS, Cell, cell_id, grid, method_band, method_label, parse_scenario, scenario_label
from .results import METRIC_LABELS, METRICS, aggregate, fmt_metric, results_markdown, t_interval
from .runner import (EXPERIMENT_VERSION, ExperimentResult, StageLog, drift_on_demand, load_run, read_experiment,
                     run_experiment, write_results)

__all__ = ["BASE_METHODS", "Cell", "DriftConfig", "EXPERIMENT_VERSION", "ExperimentConfig", "ExperimentResult",
           "METRICS", "METRIC_LABELS", "StageLog", "aggregate", "cell_id", "drift_on_demand", "fmt_metric", "grid",
           "load_run", "method_band", "method_label", "parse_scenario", "read_experiment", "results_markdown",
           "run_experiment", "scenario_label", "t_interval", "write_results"]
