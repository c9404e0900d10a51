"""Evaluation: harmful rate, over-refusal, harmful score, task quality and judge agreement."""

from .config import JUDGES, EvaluateConfig
from .quality import QualityResult, lm_eval_scores, load_references, rouge_l, task_quality
from .rates import RateResult, agreement, generate_all, harmful_rate, rate, refusal_rate
from .run import EvaluateResult, evaluate, print_summary

__all__ = ["JUDGES", "EvaluateConfig", "EvaluateResult", "QualityResult", "RateResult", "agreement", "evaluate",
           "generate_all", "harmful_rate", "lm_eval_scores", "load_references", "print_summary", "rate",
           "refusal_rate", "rouge_l", "task_quality"]
