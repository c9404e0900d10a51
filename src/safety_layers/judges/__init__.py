"""Refusal judges: a registry of plugins that turn (prompt, completion) pairs into verdicts.

``get_judge("keyword")``, ``get_judge("classifier", model=...)``, ``get_judge("llm", ...)``;
the first-token refusal proxy (:mod:`.proxy`) scores prompts without generating.
"""

from .refusal import Judge, JudgeSummary, Verdict, get_judge, list_judges, register_judge, summarize

__all__ = ["Judge", "JudgeSummary", "Verdict", "get_judge", "list_judges", "register_judge", "summarize"]
