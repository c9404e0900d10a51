"""Refusal judges: a registry of plugins that turn (prompt, completion) pairs into verdicts.

``build_judge("keyword")``, ``build_judge("classifier", model=...)``, ``build_judge("llm", ...)``
(or ``get_judge`` for a registered name with its options as they are); the first-token
refusal proxy (:mod:`.proxy`) scores prompts without generating. ``judge_check(path)`` scores
judges against a file of human-labelled replies (:mod:`.check`).
"""

from .base import (Judge, JudgeSummary, Verdict, get_judge, harmful_score, list_judges, register_judge,
                   summarize)
from .check import Agreement, judge_check
from .factory import DEFAULT_JUDGE, build_judge

__all__ = ["Agreement", "DEFAULT_JUDGE", "Judge", "JudgeSummary", "Verdict", "build_judge", "get_judge", "harmful_score", "list_judges",
           "judge_check", "register_judge", "summarize"]
