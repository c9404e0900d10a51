"""Evaluation: harmful rate, over-refusal, harmful score, task quality and judge agreement."""

from .run import EvaluateConfig, EvaluateResult, evaluate, harmful_rate, refusal_rate

__all__ = ["EvaluateConfig", "EvaluateResult", "evaluate", "harmful_rate", "refusal_rate"]
