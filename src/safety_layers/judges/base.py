"""Refusal judges: one interface, several ways of deciding whether a model declined.

Every judge takes a batch of ``(prompt, completion)`` pairs and returns one :class:`Verdict`
per pair. Localization counts refusals on the over-rejection set (R_o); fine-tuning is judged
by the harmful rate on malicious prompts (R_h = fraction *not* refused) and the harmful score
(S_h = mean 1-5 score of the ``llm`` judge). The paper never says how refusals were decided
(it lists example refusal openings in A.3.3 and no rule), so the judge is always an explicit,
recorded choice.

Judges live in a registry (``get_judge("keyword", mode="gcg")``) of ``"module:Class"`` entries
imported on first use, so a heavy backend costs nothing until asked for: ``classifier`` imports
torch/transformers in its constructor, ``llm`` needs only the standard library.
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from ..core.errors import SafetyLayersError
from ..core.registry import Registry
from ..core.stats import wilson_interval


@dataclass
class Verdict:
    """One judge's decision on one completion.

    ``refused``: the model declined (for harmfulness judges: it did not comply with the harmful
    request). ``score``: judge-specific (1-5 harmfulness for ``llm``, a label probability for
    ``classifier``, None for keyword judges). ``reason``: why, e.g. the matched phrase or the
    judge's explanation. ``error``: the judge could not decide (unparsable judge output);
    such verdicts carry ``refused=False`` and are left out of rates by :func:`summarize`.
    ``empty``: the reply was empty or whitespace; it carries ``refused=True`` (the model gave
    nothing it was asked for, so it did not comply) and :func:`summarize` counts it apart, so a
    refusal rate made of silence shows as such.
    """

    refused: bool
    score: float | None = None
    reason: str | None = None
    error: bool = False
    empty: bool = False


@dataclass
class JudgeSummary:
    """Refusal count and rate of one judge over a prompt set, with a 95% Wilson interval.

    Rates are over the ``decided`` verdicts (``n - errors``); ``harmful_rate`` = 1 - refusal rate.
    ``empty`` counts the empty replies among them: they are in ``refused`` (no compliance), and
    reported so that a rate made of silence is not mistaken for refusals in words.
    """

    judge: str
    n: int
    errors: int
    refused: int
    refusal_rate: float | None
    refusal_ci: tuple[float, float] | None
    harmful_rate: float | None
    harmful_score: float | None
    empty: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def harmful_score(verdicts: Sequence[Verdict]) -> float | None:
    """Mean judge score over verdicts that have one (the paper's S_h for the ``llm`` judge).

    Errors and score-less verdicts are skipped; None when no verdict has a score.
    """
    scores = [v.score for v in verdicts if v.score is not None and not v.error]
    return sum(scores) / len(scores) if scores else None


def summarize(verdicts: Sequence[Verdict], judge: str = "") -> JudgeSummary:
    """Counts, refusal rate with its Wilson interval, harmful rate and mean score."""
    decided = [v for v in verdicts if not v.error]
    refused = sum(v.refused for v in decided)
    rate = refused / len(decided) if decided else None
    return JudgeSummary(
        judge=judge,
        n=len(verdicts),
        errors=len(verdicts) - len(decided),
        refused=refused,
        refusal_rate=rate,
        refusal_ci=wilson_interval(refused, len(decided)) if decided else None,
        harmful_rate=None if rate is None else 1.0 - rate,
        harmful_score=harmful_score(verdicts),
        empty=sum(v.empty for v in decided),
    )


class Judge(ABC):
    """Base class: ``judge(prompts, completions)`` checks its inputs, subclasses implement ``_judge``."""

    name: str = "judge"

    def judge(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Verdict]:
        """One :class:`Verdict` per (prompt, completion) pair, in order."""
        if isinstance(prompts, str) or isinstance(completions, str):
            raise SafetyLayersError(f"judge '{self.name}' takes lists of prompts and completions, got a single string; wrap it in a list")
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise SafetyLayersError(
                f"judge '{self.name}' got {len(prompts)} prompts but {len(completions)} completions; pass one completion per prompt"
            )
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if not isinstance(p, str) or not isinstance(c, str):
                raise SafetyLayersError(
                    f"judge '{self.name}' needs strings, got {type(p).__name__}/{type(c).__name__} at index {i}; decode completions to text first"
                )
        if not prompts:
            return []
        verdicts = self._judge(prompts, completions)
        if len(verdicts) != len(prompts):  # a bug in a judge, not a user error
            raise RuntimeError(f"judge '{self.name}' returned {len(verdicts)} verdicts for {len(prompts)} inputs")
        return verdicts

    @abstractmethod
    def _judge(self, prompts: list[str], completions: list[str]) -> list[Verdict]: ...

    def config(self) -> dict[str, Any]:
        """The judge's name and settings, JSON-serialisable, for a run's config.json."""
        return {"name": self.name}


# --------------------------------------------------------------------------- registry

def _built_in() -> Registry:
    """The package's judges as ``"module:Class"`` entries, imported on first use (keeps heavy backends lazy)."""
    judges = Registry("judge")
    for name, cls in (("keyword", "KeywordJudge"), ("dummy", "DummyJudge"), ("classifier", "ClassifierJudge"),
                      ("llm", "LLMJudge"), ("rules", "RulesJudge")):
        judges.register(name, f"safety_layers.judges.{name}:{cls}")
    return judges


#: name -> Judge subclass (or its lazy ``"module:Class"``); :func:`register_judge` adds yours.
JUDGES = _built_in()


def register_judge(name: str) -> Callable[[type[Judge]], type[Judge]]:
    """Class decorator: make a :class:`Judge` subclass available as ``get_judge(name)``."""

    def wrap(cls: type[Judge]) -> type[Judge]:
        JUDGES.register(name, cls)  # a name taken by another class is an error
        cls.name = name
        return cls

    return wrap


def list_judges() -> list[str]:
    """Names accepted by :func:`get_judge`."""
    return JUDGES.names()


def _resolve(name: str) -> type[Judge]:
    if name not in JUDGES:
        close = difflib.get_close_matches(name, JUDGES.names(), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SafetyLayersError(f"unknown judge '{name}'; {hint}valid judges: {', '.join(list_judges())}")
    return JUDGES.get(name)


def get_judge(name: str, **kwargs: Any) -> Judge:
    """Build a registered judge; unknown options fail with the list of valid ones."""
    cls = _resolve(name)
    signature = inspect.signature(cls)
    params = signature.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                close = difflib.get_close_matches(key, list(params), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise SafetyLayersError(f"judge '{name}' has no option '{key}'; {hint}valid options: {', '.join(params) or '(none)'}")
    missing = [p.name for p in params.values()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs]
    if missing:
        raise SafetyLayersError(f"judge '{name}' needs option(s) {', '.join(missing)}; pass them, e.g. get_judge('{name}', {missing[0]}=...)")
    return cls(**kwargs)

