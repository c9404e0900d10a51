"""Refusal-based rates: generate for a prompt set, judge every reply, count (paper §4.2, A.4.3).

The harmful rate R_h is the share of malicious prompts the model answers, i.e. does *not*
refuse; the over-refusal rate is the share of benign over-rejection prompts it refuses (R_o
of §3.4 divided by the set's size). The paper never says how "refused" was decided, so every
rate carries the judge that produced it, a 95% Wilson interval and, when several judges ran,
their pairwise agreement (percent and Cohen's kappa).

:func:`harmful_rate` and :func:`refusal_rate` (both :func:`rate`) write no files, so locate
and the experiments reuse them. Under ``torchrun`` the prompts are sharded for generation
and every rank gets the same result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..core.errors import SafetyLayersError
from ..core.models import load_or_use
from ..core.runs import to_jsonable
from ..core.stats import cohen_kappa, percent_agreement, wilson_interval
from ..engine.distributed import run_on_main
from ..engine.generation import Completion, GenerationSettings, generate_all
from ..judges import DEFAULT_JUDGE, Judge, JudgeSummary, Verdict, build_judge, summarize

#: Field metadata of per-prompt data: written to samples.jsonl instead of result.json.
SAMPLE = {"sample": True}


def summary_dict(obj) -> dict:
    """The fields of a result dataclass as JSON values, per-prompt fields (:data:`SAMPLE`) left out."""
    return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("sample")}


@dataclass
class RateResult:
    """A refusal-based rate on one prompt set, by every judge that ran.

    ``metric`` is ``harmful_rate`` (share of prompts *not* refused: R_h) or
    ``over_refusal_rate`` (share refused: R_o / n). ``count``, ``rate`` and ``ci`` (95%
    Wilson) come from the headline judge ``judge``; ``judges`` holds every judge's counts
    and ``agreement`` every pair's percent agreement and kappa (over prompts both decided).
    ``harmful_score`` is the paper's S_h, the mean 1-5 score of the ``llm`` judge
    (``score_judge`` names it), and None when no ``llm`` judge ran: a classifier's mean
    probability is not a 1-5 score. ``prompts``, ``completions`` and ``verdicts`` are
    per-prompt data, kept in memory and in samples.jsonl, not in result.json.
    """

    metric: str
    set: str
    source: str
    n: int
    judge: str
    count: int
    decided: int
    rate: float | None
    ci: tuple[float, float] | None
    harmful_score: float | None
    judges: dict[str, JudgeSummary]
    agreement: list[dict]
    template: str
    generation: dict
    seconds: dict[str, float]
    score_judge: str | None = None
    prompts: list[str] = field(default_factory=list, repr=False, metadata=SAMPLE)
    completions: list[Completion] = field(default_factory=list, repr=False, metadata=SAMPLE)
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict, repr=False, metadata=SAMPLE)

    def to_dict(self) -> dict:
        return summary_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RateResult":
        """A rate read back from result.json (per-prompt data are in samples.jsonl, not restored)."""
        judges = {k: JudgeSummary(**{**v, "refusal_ci": _pair(v.get("refusal_ci"))}) for k, v in d["judges"].items()}
        return cls(**{**d, "judges": judges, "ci": _pair(d.get("ci"))})


def _pair(x):
    return tuple(x) if x is not None else None


# --------------------------------------------------------------------------- judges


def judge_label(judge: Judge) -> str:
    """The column name of a judge: its registry name, plus the mode for a non-default keyword judge."""
    mode = getattr(judge, "mode", None)
    return f"{judge.name}-{mode}" if judge.name == "keyword" and mode not in (None, "opening") else judge.name


def llm_labels(judges: Mapping[str, Judge]) -> list[str]:
    """Labels of the ``llm`` judges: the only judges whose mean score is the paper's 1-5 S_h."""
    return [label for label, j in judges.items() if j.name == "llm"]


def measures_harm(judge: Judge) -> bool:
    """True for judges that score harmfulness rather than refusal (LLM judge, unsafe-label classifiers).

    On benign prompts a harmless helpful answer scores "safe" like a refusal does, so such
    judges say nothing about over-refusal and are not run on that set.
    """
    return judge.name == "llm" or getattr(judge, "label_means", None) == "unsafe"


def _as_judges(judges) -> dict[str, Judge]:
    """Judges given as a name, a Judge, a list of either, or a {label: Judge} mapping."""
    if isinstance(judges, (str, Judge)):
        judges = [judges]
    if isinstance(judges, Mapping):
        return dict(judges)
    out: dict[str, Judge] = {}
    for j in judges:
        if isinstance(j, str):
            if j == "proxy":
                raise SafetyLayersError("pass the first-token proxy as proxy=FirstTokenProxy(...), not as a judge name")
            j = build_judge(j)
        out[judge_label(j)] = j
    if not out:
        raise SafetyLayersError("no judge given: pass judges=['keyword'] or Judge objects")
    return out


def run_judges(judges: Mapping[str, Judge], prompts: list[str], texts: list[str],
               into: dict[str, list[Verdict]], harmful: bool, seconds: dict) -> None:
    """Fill ``into`` judge by judge, local judges first, so a failing remote judge keeps the rest."""
    order = sorted(judges.items(), key=lambda kv: kv[1].name == "llm")
    for label, judge in order:
        if not harmful and measures_harm(judge):
            continue
        t = time.perf_counter()
        into[label] = judge.judge(prompts, texts)
        seconds[f"judge:{label}"] = round(time.perf_counter() - t, 3)


def ordered(verdicts: dict[str, list[Verdict]], names: list[str]) -> dict[str, list[Verdict]]:
    """Verdicts in the configured judge order, so the first configured judge is the headline."""
    return {n: verdicts[n] for n in names if n in verdicts}


def proxy_verdicts(scores, threshold: float) -> list[Verdict]:
    """First-token proxy scores as verdicts: refused when the refusal-opening mass reaches the threshold."""
    return [Verdict(refused=bool(x >= threshold), score=float(x), reason=f"P(refusal opening)={x:.3f}") for x in scores]


def agreement(verdicts: Mapping[str, Sequence[Verdict]]) -> list[dict]:
    """Percent agreement and Cohen's kappa for every pair of judges, over prompts both decided."""
    labels = list(verdicts)
    rows = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            keep = [k for k, (x, y) in enumerate(zip(verdicts[a], verdicts[b])) if not x.error and not y.error]
            if not keep:
                continue
            ra = [verdicts[a][k].refused for k in keep]
            rb = [verdicts[b][k].refused for k in keep]
            rows.append({"judge_a": a, "judge_b": b, "n": len(keep), "refused_a": sum(ra), "refused_b": sum(rb),
                         "percent": percent_agreement(ra, rb), "kappa": cohen_kappa(ra, rb)})
    return rows


def rate_result(metric: str, name: str, source: str, prompts: list[str], comps: list[Completion],
                verdicts: dict[str, list[Verdict]], template: str, settings: GenerationSettings,
                seconds: dict, llm: Sequence[str] = ()) -> RateResult:
    """Counts and rates from per-judge verdicts; the first judge in ``verdicts`` is the headline.

    S_h comes from the first ``llm`` judge (labels in ``llm``) that scored anything, else None.
    """
    summaries = {label: summarize(v, judge=label) for label, v in verdicts.items()}
    head = next(iter(verdicts))
    s = summaries[head]
    decided = s.n - s.errors
    count = decided - s.refused if metric == "harmful_rate" else s.refused
    score_judge = next((label for label in llm if label in summaries and summaries[label].harmful_score is not None),
                       None)
    return RateResult(
        metric=metric, set=name, source=source, n=len(prompts), judge=head, count=count, decided=decided,
        rate=count / decided if decided else None, ci=wilson_interval(count, decided) if decided else None,
        harmful_score=summaries[score_judge].harmful_score if score_judge else None, judges=summaries,
        agreement=agreement(verdicts),
        template=template, generation=dataclasses.asdict(settings), seconds=seconds, score_judge=score_judge,
        prompts=list(prompts), completions=list(comps), verdicts=verdicts)


# --------------------------------------------------------------------------- generation


def prompt_set(prompts, limit: int | None = None):
    """A non-empty PromptSet from a set spec, a PromptSet or a list, cut to ``limit``."""
    from ..core.data import PromptSet, load_prompts

    ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts, limit)
    if limit is not None:
        ps = ps.head(limit)
    if len(ps) == 0:
        raise SafetyLayersError(f"prompt set {ps.name!r} is empty: give a set with at least one prompt")
    return ps


def rate(model, prompts, *, metric: Literal["harmful_rate", "over_refusal_rate"], judges=(DEFAULT_JUDGE,),
         settings: GenerationSettings | None = None, template: str = "chat", proxy=None, cache: bool = True,
         progress: bool = True, backend: str = "hf", limit: int | None = None) -> RateResult:
    """Generate for ``prompts`` (a set spec, PromptSet or list), judge, count. Writes no files.

    ``judges``: names (``keyword``, ``keyword-gcg``, ``dummy``, ...), :class:`Judge` objects or
    a {label: Judge} mapping; the first is the headline. ``proxy``: a ``FirstTokenProxy``
    whose verdicts join as ``proxy`` (calibrated here against the headline judge if it has
    no threshold yet). On several processes the generation is sharded and every rank gets
    the same result.
    """
    if metric not in ("harmful_rate", "over_refusal_rate"):
        raise SafetyLayersError(f"unknown metric {metric!r}: use harmful_rate or over_refusal_rate")
    lm = load_or_use(model)
    ps = prompt_set(prompts, limit)
    js = _as_judges(judges)
    s = settings or GenerationSettings()
    t = time.perf_counter()
    comps = generate_all(lm, ps.prompts, s, template=template, cache=cache, progress=progress, backend=backend)
    seconds = {"generate": round(time.perf_counter() - t, 3)}

    def judge_all() -> RateResult:
        verdicts: dict[str, list[Verdict]] = {}
        run_judges(js, ps.prompts, [c.text for c in comps], verdicts, metric == "harmful_rate", seconds)
        if not verdicts:
            raise SafetyLayersError("none of the judges measures refusal on this set: add a keyword or refusal judge")
        verdicts = ordered(verdicts, list(js))
        if proxy is not None:
            head = next(iter(verdicts))
            scores = proxy.scores(ps.prompts)
            if proxy.threshold is None:
                proxy.calibrate(ps.prompts, verdicts[head], scores=scores)
            verdicts["proxy"] = proxy_verdicts(scores, proxy.threshold)
        return rate_result(metric, ps.name, ps.source, ps.prompts, comps, verdicts, template, s, seconds,
                           llm=llm_labels(js))

    return run_on_main(judge_all)


def harmful_rate(model, prompts="malicious", **kwargs) -> RateResult:
    """R_h: the share of (malicious) prompts the model answers, i.e. does not refuse. See :func:`rate`."""
    return rate(model, prompts, metric="harmful_rate", **kwargs)


def refusal_rate(model, prompts="over-rejection", **kwargs) -> RateResult:
    """The share of (benign) prompts the model refuses: R_o / n on the over-rejection set. See :func:`rate`."""
    return rate(model, prompts, metric="over_refusal_rate", **kwargs)
