"""The SPPFT experiment: scenarios x methods x learning rates x seeds, resumable, with drift diagnostics."""

from .run import ExperimentConfig, ExperimentResult, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "run_experiment"]
