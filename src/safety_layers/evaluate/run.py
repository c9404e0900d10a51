"""Evaluate one model: harmful rate, over-refusal, harmful score, task quality, judge agreement.

The paper's metrics (spec §4.5): the harmful rate R_h is the share of malicious prompts
(AdvBench, 520) the model answers, i.e. does *not* refuse; the harmful score S_h is the mean
1-5 score of an LLM judge on those answers; task quality is the mean Rouge-L against reference
answers (and MMLU, here any lm-eval task). Localization counts refusals on the over-rejection
set (R_o, spec §3.3). The paper never says how "refused" was decided, so every rate carries
the judge that produced it, a 95% Wilson interval, and, when several judges run, their
pairwise agreement (percent and Cohen's kappa).

Reusable pieces for later steps (locate, experiments) return results without writing files:
:func:`harmful_rate`, :func:`refusal_rate` (both :func:`rate`), :func:`task_quality` and
:func:`rouge_l`. :func:`evaluate` runs a whole :class:`EvaluateConfig` and writes the run folder.

Under ``torchrun``/``accelerate launch`` the prompts are sharded across processes for
generation (:mod:`safety_layers.engine.distributed`); rank 0 judges and writes, every rank returns
the same result.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..engine.distributed import map_sharded, run_on_main, world
from ..core.errors import SafetyLayersError
from ..engine.generation import Completion, GenerationSettings, generate
from ..core.models import DEFAULT_MODEL, LoadedModel, load_model, load_or_use
from ..judges import Judge, JudgeSummary, Verdict, get_judge, summarize
from ..core.stats import cohen_kappa, percent_agreement, wilson_interval

#: Judges :class:`EvaluateConfig` knows by name. ``proxy`` is the first-token refusal proxy,
#: calibrated against the first other judge unless ``proxy_threshold`` is given.
JUDGES = ("keyword", "keyword-gcg", "proxy", "llm", "classifier", "dummy")
#: Field names accepted for the reference answers of a quality file, first match wins.
REFERENCE_FIELDS = ("output", "response", "answer", "reference")
INSTRUCTION_FIELDS = ("instruction", "prompt", "question")
_SAMPLE = {"sample": True}  # per-prompt fields, written to samples.jsonl instead of result.json


def _skip(value):
    """``None``, ``""`` and ``"none"`` switch a metric off (the CLI cannot pass None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    return value


@dataclass
class EvaluateConfig:
    """Settings of one evaluation (``safety-layers evaluate``). A set given as None is skipped."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "model alias, folder, .gguf file or hub id"})
    malicious: str | None = field(default="malicious", metadata={
        "help": "prompt set for the harmful rate (paper: advbench:harmful_behaviors.csv); none skips it"})
    over_rejection: str | None = field(default="over-rejection", metadata={
        "help": "prompt set for the over-refusal rate (e.g. xstest-safe:xstest_prompts.csv); none skips it"})
    quality: str | None = field(default=None, metadata={
        "help": "JSON/JSONL/CSV of {instruction, input, output} records: Rouge-L against output"})
    lm_eval_tasks: str | None = field(default=None, metadata={
        "help": "comma-separated lm-eval task names (needs pip install lm-eval), e.g. mmlu"})
    lm_eval_fewshot: int | None = field(default=None, metadata={"help": "lm-eval few-shot examples (task default if unset)"})
    lm_eval_include: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAMLs"})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT prompts / records / task docs"})
    template: str = field(default="chat", metadata={"help": "chat (the model's own), alpaca (the paper's), alpaca_short, plain"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per malicious prompt"})
    over_rejection_tokens: int | None = field(default=None, metadata={
        "help": "tokens per over-rejection prompt (default: max_new_tokens; paper mode: 16, as the released code)"})
    quality_tokens: int = field(default=128, metadata={"help": "tokens generated per quality record"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts decoded together (default: 128)"})
    judges: str | list[str] = field(default="keyword", metadata={
        "help": f"comma-separated refusal judges, the first is the headline: {', '.join(JUDGES)}"})
    proxy_threshold: float | None = field(default=None, metadata={
        "help": "first-token proxy threshold (default: calibrated against the first other judge)"})
    judge_url: str | None = field(default=None, metadata={"help": "LLM judge: OpenAI-compatible base URL (adds the llm judge)"})
    judge_model: str | None = field(default=None, metadata={"help": "LLM judge: model name the server knows"})
    judge_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "LLM judge: environment variable holding the API key"})
    judge_options: dict | str | None = field(default=None, metadata={
        "help": "more LLM-judge options as JSON, e.g. '{\"max_retries\": 2, \"max_workers\": 8}'"})
    classifier_model: str | None = field(default=None, metadata={"help": "classifier judge: model folder or hub id"})
    classifier_kind: str = field(default="sequence", metadata={"help": "classifier judge: sequence or causal-guard"})
    dummy_marker: str = field(default="REFUSE", metadata={"help": "dummy judge (tests): refused iff a reply starts with this"})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template, 16 tokens for over-rejection, keyword-gcg as an extra judge"})
    backend: str = field(default="hf", metadata={"help": "generation backend: hf or vllm"})
    cache: bool = field(default=True, metadata={"help": "reuse and store completions in the generation cache"})
    out: str | None = field(default=None, metadata={"help": "run folder (default runs/evaluate-<model>-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "reuse an existing, non-empty run folder"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        self.malicious, self.over_rejection = _skip(self.malicious), _skip(self.over_rejection)
        self.quality, self.lm_eval_tasks = _skip(self.quality), _skip(self.lm_eval_tasks)
        if self.paper:
            self.template = "alpaca"
            if self.over_rejection_tokens is None:
                self.over_rejection_tokens = 16
        for name in ("max_new_tokens", "quality_tokens", "over_rejection_tokens", "limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SafetyLayersError(f"{name} must be >= 1, got {value}")
        if not (self.malicious or self.over_rejection or self.quality or self.lm_eval_tasks):
            raise SafetyLayersError("nothing to evaluate: give --malicious, --over-rejection, --quality or --lm-eval-tasks")
        self.judges = self._judge_names()
        if isinstance(self.judge_options, str):
            try:
                self.judge_options = json.loads(self.judge_options)
            except json.JSONDecodeError as e:
                raise SafetyLayersError(f"judge_options is not valid JSON ({e.msg}): pass e.g. '{{\"max_retries\": 2}}'") from None
        if self.judge_options is not None and not isinstance(self.judge_options, dict):
            raise SafetyLayersError("judge_options must be a JSON object of LLM-judge options, e.g. {\"max_retries\": 2}")
        if self.judge_url and not self.judge_model:
            raise SafetyLayersError("--judge-url is set but --judge-model is not: name the model the judge server serves")
        if "llm" in self.judges and not self.judge_model:
            raise SafetyLayersError("the llm judge needs --judge-model (and --judge-url unless it is http://127.0.0.1:8000/v1)")
        if "classifier" in self.judges and not self.classifier_model:
            raise SafetyLayersError("the classifier judge needs --classifier-model (a model folder or hub id)")
        if self.judges == ["proxy"] and self.proxy_threshold is None:
            raise SafetyLayersError("the proxy judge alone has nothing to calibrate against: add a judge "
                                    "(e.g. --judges keyword,proxy) or give --proxy-threshold")
        if self.proxy_threshold is not None and not 0.0 <= self.proxy_threshold <= 1.0:
            raise SafetyLayersError(f"proxy_threshold is a probability in [0, 1], got {self.proxy_threshold}")

    def _judge_names(self) -> list[str]:
        raw = self.judges.split(",") if isinstance(self.judges, str) else list(self.judges)
        names = [str(n).strip().lower() for n in raw if str(n).strip()]
        if self.paper:
            names.append("keyword-gcg")
        if self.judge_model and "llm" not in names:
            names.append("llm")
        names = list(dict.fromkeys(names))
        if not names:
            raise SafetyLayersError(f"no judge given: pass --judges with one or more of {', '.join(JUDGES)}")
        for n in names:
            if n not in JUDGES:
                close = difflib.get_close_matches(n, JUDGES, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise SafetyLayersError(f"unknown judge '{n}'; {hint}valid judges: {', '.join(JUDGES)}")
        return names

    def settings(self, tokens: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=tokens, batch_size=self.batch_size)


# --------------------------------------------------------------------------- results


@dataclass
class RateResult:
    """A refusal-based rate on one prompt set, by every judge that ran.

    ``metric`` is ``harmful_rate`` (share of prompts *not* refused: R_h) or
    ``over_refusal_rate`` (share refused: R_o / n). ``count``, ``rate`` and ``ci`` (95%
    Wilson) come from the headline judge ``judge``; ``judges`` holds every judge's counts
    and ``agreement`` every pair's percent agreement and kappa (over prompts both decided).
    ``prompts``, ``completions`` and ``verdicts`` are per-prompt data, kept in memory and
    in samples.jsonl, not in result.json.
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
    prompts: list[str] = field(default_factory=list, repr=False, metadata=_SAMPLE)
    completions: list[Completion] = field(default_factory=list, repr=False, metadata=_SAMPLE)
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict, repr=False, metadata=_SAMPLE)

    def to_dict(self) -> dict:
        return _summary_dict(self)


@dataclass
class QualityResult:
    """Mean Rouge-L (F-measure, rouge-score's ``rougeL``) of completions against references."""

    set: str
    source: str
    n: int
    skipped: int  # records without a reference answer
    rouge_l: float
    rouge_l_std: float
    scorer: dict
    template: str
    generation: dict
    seconds: dict[str, float]
    prompts: list[str] = field(default_factory=list, repr=False, metadata=_SAMPLE)
    references: list[str] = field(default_factory=list, repr=False, metadata=_SAMPLE)
    completions: list[Completion] = field(default_factory=list, repr=False, metadata=_SAMPLE)
    scores: list[float] = field(default_factory=list, repr=False, metadata=_SAMPLE)

    def to_dict(self) -> dict:
        return _summary_dict(self)


@dataclass
class EvaluateResult:
    """Everything one ``evaluate`` measured; written as result.json (per-prompt data aside)."""

    model: str
    fingerprint: str
    template: str
    harmful: RateResult | None = None
    over_refusal: RateResult | None = None
    quality: QualityResult | None = None
    lm_eval: dict | None = None
    calibration: dict | None = None
    judges: dict[str, dict] = field(default_factory=dict)
    processes: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        from ..core.runs import to_jsonable

        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if hasattr(v, "to_dict") else to_jsonable(v)
        return d

    def to_json(self, path: str | Path) -> Path:
        from ..core.runs import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> "EvaluateResult":
        """Read a result.json back (per-prompt data are in samples.jsonl, not restored)."""
        d = json.loads(Path(path).read_text(encoding="utf-8"))

        def rate(x):
            if x is None:
                return None
            x = dict(x)
            x["judges"] = {k: JudgeSummary(**{**v, "refusal_ci": _pair(v.get("refusal_ci"))})
                           for k, v in x["judges"].items()}
            x["ci"] = _pair(x.get("ci"))
            return RateResult(**x)

        d["harmful"], d["over_refusal"] = rate(d.get("harmful")), rate(d.get("over_refusal"))
        d["quality"] = QualityResult(**d["quality"]) if d.get("quality") else None
        return cls(**d)


def _pair(x):
    return tuple(x) if x is not None else None


def _summary_dict(obj) -> dict:
    from ..core.runs import to_jsonable

    return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("sample")}


# --------------------------------------------------------------------------- judges


def judge_label(judge: Judge) -> str:
    """The column name of a judge: its registry name, plus the mode for a non-default keyword judge."""
    mode = getattr(judge, "mode", None)
    return f"{judge.name}-{mode}" if judge.name == "keyword" and mode not in (None, "opening") else judge.name


def measures_harm(judge: Judge) -> bool:
    """True for judges that score harmfulness rather than refusal (LLM judge, unsafe-label classifiers).

    On benign prompts a harmless helpful answer scores "safe" like a refusal does, so such
    judges say nothing about over-refusal and are not run on that set.
    """
    return judge.name == "llm" or getattr(judge, "label_means", None) == "unsafe"


def build_judge(name: str, cfg: EvaluateConfig | None = None) -> Judge:
    """One judge of :data:`JUDGES` (not ``proxy``) with the options of ``cfg``."""
    cfg = cfg or EvaluateConfig(judges=[name] if name != "llm" else ["keyword"])
    if name == "keyword":
        return get_judge("keyword", mode="opening")
    if name == "keyword-gcg":
        return get_judge("keyword", mode="gcg")
    if name == "dummy":
        return get_judge("dummy", marker=cfg.dummy_marker)
    if name == "classifier":
        return get_judge("classifier", model=cfg.classifier_model, kind=cfg.classifier_kind)
    if name == "llm":
        opts = {"model": cfg.judge_model, "api_key_env": cfg.judge_key_env, **(cfg.judge_options or {})}
        if cfg.judge_url:
            opts["base_url"] = cfg.judge_url
        return get_judge("llm", **opts)
    raise SafetyLayersError(f"unknown judge '{name}'; valid judges: {', '.join(JUDGES)}")


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


def _run_judges(judges: Mapping[str, Judge], prompts: list[str], texts: list[str],
                into: dict[str, list[Verdict]], harmful: bool, seconds: dict) -> None:
    """Fill ``into`` judge by judge, local judges first, so a failing remote judge keeps the rest."""
    order = sorted(judges.items(), key=lambda kv: kv[1].name == "llm")
    for label, judge in order:
        if not harmful and measures_harm(judge):
            continue
        t = time.perf_counter()
        into[label] = judge.judge(prompts, texts)
        seconds[f"judge:{label}"] = round(time.perf_counter() - t, 3)


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


def _rate_result(metric: str, name: str, source: str, prompts: list[str], comps: list[Completion],
                 verdicts: dict[str, list[Verdict]], template: str, settings: GenerationSettings,
                 seconds: dict) -> RateResult:
    """Counts and rates from per-judge verdicts; the first judge in ``verdicts`` is the headline."""
    summaries = {label: summarize(v, judge=label) for label, v in verdicts.items()}
    head = next(iter(verdicts))
    s = summaries[head]
    decided = s.n - s.errors
    count = decided - s.refused if metric == "harmful_rate" else s.refused
    scores = [x.harmful_score for x in summaries.values() if x.harmful_score is not None and x.judge != "proxy"]
    return RateResult(
        metric=metric, set=name, source=source, n=len(prompts), judge=head, count=count, decided=decided,
        rate=count / decided if decided else None, ci=wilson_interval(count, decided) if decided else None,
        harmful_score=scores[0] if scores else None, judges=summaries, agreement=agreement(verdicts),
        template=template, generation=dataclasses.asdict(settings), seconds=seconds,
        prompts=list(prompts), completions=list(comps), verdicts=verdicts)


# --------------------------------------------------------------------------- generation


def generate_all(model: LoadedModel, prompts: list[str], settings: GenerationSettings, *, template: str = "chat",
                 cache: bool = True, progress: bool = True, backend: str = "hf") -> list[Completion]:
    """``generate`` on this process's shard of ``prompts``, gathered in input order on every rank."""
    w = world()
    return map_sharded(lambda shard: generate(model, shard, settings, template=template, cache=cache,
                                              progress=progress and w.is_main, backend=backend), prompts, w)


def _prompt_set(prompts, limit: int | None = None):
    from ..core.data import PromptSet, load_prompts

    ps = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts, limit)
    if limit is not None:
        ps = ps.head(limit)
    if len(ps) == 0:
        raise SafetyLayersError(f"prompt set {ps.name!r} is empty: give a set with at least one prompt")
    return ps


def rate(model, prompts, *, metric: Literal["harmful_rate", "over_refusal_rate"], judges=("keyword",),
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
    ps = _prompt_set(prompts, limit)
    js = _as_judges(judges)
    s = settings or GenerationSettings()
    t = time.perf_counter()
    comps = generate_all(lm, ps.prompts, s, template=template, cache=cache, progress=progress, backend=backend)
    seconds = {"generate": round(time.perf_counter() - t, 3)}

    def judge_all() -> RateResult:
        verdicts: dict[str, list[Verdict]] = {}
        _run_judges(js, ps.prompts, [c.text for c in comps], verdicts, metric == "harmful_rate", seconds)
        if not verdicts:
            raise SafetyLayersError("none of the judges measures refusal on this set: add a keyword or refusal judge")
        verdicts = _ordered(verdicts, list(js))
        if proxy is not None:
            head = next(iter(verdicts))
            scores = proxy.scores(ps.prompts)
            if proxy.threshold is None:
                proxy.calibrate(ps.prompts, verdicts[head], scores=scores)
            verdicts["proxy"] = proxy_verdicts(scores, proxy.threshold)
        return _rate_result(metric, ps.name, ps.source, ps.prompts, comps, verdicts, template, s, seconds)

    return run_on_main(judge_all)


def harmful_rate(model, prompts="malicious", **kwargs) -> RateResult:
    """R_h: the share of (malicious) prompts the model answers, i.e. does not refuse. See :func:`rate`."""
    return rate(model, prompts, metric="harmful_rate", **kwargs)


def refusal_rate(model, prompts="over-rejection", **kwargs) -> RateResult:
    """The share of (benign) prompts the model refuses: R_o / n on the over-rejection set. See :func:`rate`."""
    return rate(model, prompts, metric="over_refusal_rate", **kwargs)


def proxy_verdicts(scores, threshold: float) -> list[Verdict]:
    """First-token proxy scores as verdicts: refused when the refusal-opening mass reaches the threshold."""
    return [Verdict(refused=bool(x >= threshold), score=float(x), reason=f"P(refusal opening)={x:.3f}") for x in scores]


# --------------------------------------------------------------------------- task quality


def rouge_l(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = False) -> list[float]:
    """Rouge-L F-measure of each prediction against its reference (rouge-score's ``rougeL``).

    rouge-score lower-cases and keeps only ``[a-z0-9]`` tokens, so text in other scripts
    scores 0; stemming is off by default, as in rouge-score itself.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise SafetyLayersError(f"rouge_l needs one reference per prediction, got {len(references)} for {len(predictions)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def load_references(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str], int]:
    """(prompts, references, skipped) from {instruction, input, output} records.

    A non-empty ``input`` is appended to the instruction after a blank line (the same
    convention as :mod:`safety_layers.core.data`). Records with an empty reference are skipped.
    """
    from ..core.data import _rows_from_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise SafetyLayersError(f"quality file not found: {p}")
    if p.stat().st_size == 0:
        raise SafetyLayersError(f"quality file is empty: {p}")
    rows, cols = _rows_from_file(p)
    ref_col = next((c for c in REFERENCE_FIELDS if c in cols), None)
    if ref_col is None:
        raise SafetyLayersError(f"quality file {p} has no 'output' field (the reference answers; columns: "
                                f"{', '.join(cols) or '(none)'}): give records of {{instruction, input, output}}")
    ins_col = next((c for c in INSTRUCTION_FIELDS if c in cols), None)
    if ins_col is None:
        raise SafetyLayersError(f"quality file {p} has no 'instruction' field (columns: {', '.join(cols) or '(none)'}): "
                                "give records of {instruction, input, output}")
    prompts, refs, skipped = [], [], 0
    for r in rows:
        ins, ref = str(r.get(ins_col) or "").strip(), str(r.get(ref_col) or "").strip()
        if not ins or not ref:
            skipped += 1
            continue
        extra = str(r.get("input") or "").strip()
        prompts.append(f"{ins}\n\n{extra}" if extra else ins)
        refs.append(ref)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise SafetyLayersError(f"quality file {p} has no record with both {ins_col!r} and {ref_col!r}")
    return prompts, refs, skipped


def task_quality(model, path: str | Path, *, settings: GenerationSettings | None = None, template: str = "chat",
                 cache: bool = True, progress: bool = True, backend: str = "hf", limit: int | None = None,
                 use_stemmer: bool = False) -> QualityResult:
    """Generate an answer per record of ``path`` and score it with Rouge-L. Writes no files."""
    lm = load_or_use(model)
    prompts, refs, skipped = load_references(path, limit)
    s = settings or GenerationSettings(max_new_tokens=128)
    t = time.perf_counter()
    comps = generate_all(lm, prompts, s, template=template, cache=cache, progress=progress, backend=backend)
    gen_s = round(time.perf_counter() - t, 3)

    name = Path(path).stem
    return run_on_main(lambda: score_quality(name, str(path), prompts, refs, skipped, comps, s, template,
                                             gen_s, use_stemmer))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def lm_eval_scores(model, tasks: str | Sequence[str], *, limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int | None = None, include_path: str | None = None) -> dict:
    """Run lm-evaluation-harness tasks on the in-memory model; numeric metrics per task.

    lm-eval is optional and imported here only. Tasks that need a dataset from the Hugging
    Face hub need internet (or its datasets cache); ``include_path`` adds local task YAMLs.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SafetyLayersError("lm-eval is not installed: pip install lm-eval, or drop --lm-eval-tasks") from None
    lm = load_or_use(model)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise SafetyLayersError("no lm-eval task given: pass task names, e.g. --lm-eval-tasks mmlu")
    manager = None
    if include_path:  # indexing lm-eval's ~200 built-in task folders takes a while: try the user's alone first
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(n not in manager.all_tasks for n in names):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SafetyLayersError(f"unknown lm-eval task '{unknown[0]}'{hint}: list them with `lm-eval ls tasks`, "
                                "or add a task folder with --lm-eval-include")
    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size or 8)
    t = time.perf_counter()
    try:
        out = lm_eval.simple_evaluate(model=hflm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except (ConnectionError, OSError) as e:
        raise SafetyLayersError(f"lm-eval could not load the data of {', '.join(names)} ({str(e).splitlines()[0][:160]}): "
                                "run where the datasets are reachable or cached") from None
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for task, metrics in (out or {}).get("results", {}).items()}
    return {"tasks": names, "results": results, "num_fewshot": num_fewshot, "limit": limit,
            "n_samples": (out or {}).get("n-samples"), "version": getattr(lm_eval, "__version__", None),
            "seconds": round(time.perf_counter() - t, 3)}


# --------------------------------------------------------------------------- evaluate


@dataclass
class _SetRun:
    """One rate set in flight: what was generated and the verdicts so far."""

    metric: str
    ps: Any
    settings: GenerationSettings
    comps: list[Completion]
    seconds: dict
    verdicts: dict[str, list[Verdict]] = field(default_factory=dict)


def evaluate(cfg: EvaluateConfig | None = None, model=None, run_dir: str | Path | None = None) -> EvaluateResult:
    """Run every metric ``cfg`` asks for; with ``run_dir``, write the run folder there.

    The folder gets ``config.json``, ``env.json``, ``result.json`` (this result, per-prompt data
    aside) and ``samples.jsonl`` (per prompt: set, prompt, completion, every judge's verdict).
    ``model`` may be a loaded model; otherwise ``cfg.model`` is loaded. If a judge fails (an
    unreachable LLM judge after its retries), samples.jsonl is still written with the verdicts
    that exist, the completions stay in the generation cache, and the error is raised.
    On several processes only rank 0 writes; every rank returns the result.
    """
    cfg = cfg or EvaluateConfig()
    w = world()
    t0 = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None and w.is_main else None
    seconds: dict[str, float] = {}

    sets = []  # (metric, PromptSet, tokens)
    if cfg.malicious:
        sets.append(("harmful_rate", _prompt_set(cfg.malicious, cfg.limit), cfg.max_new_tokens))
    if cfg.over_rejection:
        sets.append(("over_refusal_rate", _prompt_set(cfg.over_rejection, cfg.limit),
                     cfg.over_rejection_tokens or cfg.max_new_tokens))
    quality = load_references(cfg.quality, cfg.limit) if cfg.quality else None

    judges: dict[str, Judge] = {}

    def build() -> None:  # on rank 0 only: a classifier judge loads a model
        for name in cfg.judges:
            if name != "proxy":
                judges[name] = build_judge(name, cfg)
        refusal_judges = [j for j in judges.values() if not measures_harm(j)]
        if cfg.over_rejection and not refusal_judges and cfg.proxy_threshold is None:
            raise SafetyLayersError("the configured judges score harmfulness and cannot count refusals of benign "
                                    "prompts: add a refusal judge for the over-rejection set, e.g. --judges keyword,llm")

    run_on_main(build)

    t = time.perf_counter()
    if model is not None:
        lm = load_or_use(model)
    else:
        import torch

        lm = load_model(cfg.model, device=f"cuda:{w.local_rank}" if torch.cuda.is_available() else None)
    seconds["load"] = round(time.perf_counter() - t, 3)

    runs: list[_SetRun] = []
    for metric, ps, tokens in sets:
        s = cfg.settings(tokens)
        t = time.perf_counter()
        comps = generate_all(lm, ps.prompts, s, template=cfg.template, cache=cfg.cache, progress=cfg.progress,
                             backend=cfg.backend)
        runs.append(_SetRun(metric, ps, s, comps, {"generate": round(time.perf_counter() - t, 3)}))
    q_comps, q_settings, q_gen = None, cfg.settings(cfg.quality_tokens), 0.0
    if quality:
        t = time.perf_counter()
        q_comps = generate_all(lm, quality[0], q_settings, template=cfg.template, cache=cfg.cache,
                               progress=cfg.progress, backend=cfg.backend)
        q_gen = round(time.perf_counter() - t, 3)

    def finish() -> EvaluateResult:
        if run_dir is not None:
            from ..core.runs import environment, write_json

            write_json(run_dir / "config.json", cfg)
            write_json(run_dir / "env.json", {**environment(), "model": lm.name, "model_source": lm.source,
                                              "model_fingerprint": lm.fingerprint(), "processes": w.size,
                                              "sets": {r.ps.name: r.ps.source for r in runs}})
        q_result = None
        if quality:
            q_result = score_quality(Path(cfg.quality).stem, str(cfg.quality), *quality, q_comps, q_settings,
                                     cfg.template, q_gen)
        try:
            for r in runs:
                _run_judges(judges, r.ps.prompts, [c.text for c in r.comps], r.verdicts, r.metric == "harmful_rate",
                            r.seconds)
        except SafetyLayersError as err:
            if run_dir is not None:
                write_samples(run_dir / "samples.jsonl", runs, q_result)
                where = f"{run_dir / 'samples.jsonl'} and the generation cache"
            else:
                where = "the generation cache"
            n = sum(len(r.comps) for r in runs)
            raise SafetyLayersError(f"{err} ({n} completions kept in {where}; rerun to judge them)") from None
        calibration = _add_proxy(cfg, lm, runs) if "proxy" in cfg.judges else None
        rates = {r.metric: _rate_result(r.metric, r.ps.name, r.ps.source, r.ps.prompts, r.comps,
                                        _ordered(r.verdicts, cfg.judges), cfg.template, r.settings, r.seconds)
                 for r in runs if r.verdicts}
        lm_eval = None
        if cfg.lm_eval_tasks:
            lm_eval = lm_eval_scores(lm, cfg.lm_eval_tasks, limit=cfg.limit, num_fewshot=cfg.lm_eval_fewshot,
                                     batch_size=cfg.batch_size, include_path=cfg.lm_eval_include)
        notes = []
        skipped = [l for l, j in judges.items() if measures_harm(j)]
        if skipped and "over_refusal_rate" in rates:
            notes.append(f"{', '.join(skipped)} scores harmfulness, so it did not judge the over-rejection set")
        if calibration:
            notes.append("the proxy threshold was calibrated on these same prompts, so its agreement is in-sample")
        seconds["total"] = round(time.perf_counter() - t0, 3)
        result = EvaluateResult(
            model=lm.name, fingerprint=lm.fingerprint(), template=cfg.template,
            harmful=rates.get("harmful_rate"), over_refusal=rates.get("over_refusal_rate"), quality=q_result,
            lm_eval=lm_eval, calibration=calibration,
            judges={l: j.config() for l, j in judges.items()} | (
                {"proxy": _proxy_config(cfg, calibration)} if "proxy" in cfg.judges else {}),
            processes=w.size, seconds=seconds, notes=notes)
        if run_dir is not None:
            write_samples(run_dir / "samples.jsonl", runs, q_result)
            result.to_json(run_dir / "result.json")
        return result

    return run_on_main(finish)


def _ordered(verdicts: dict[str, list[Verdict]], names: list[str]) -> dict[str, list[Verdict]]:
    """Verdicts in the configured judge order, so the first configured judge is the headline."""
    return {n: verdicts[n] for n in names if n in verdicts}


def score_quality(name: str, source: str, prompts: list[str], refs: list[str], skipped: int,
                  comps: list[Completion], settings: GenerationSettings, template: str, gen_s: float = 0.0,
                  use_stemmer: bool = False) -> QualityResult:
    """Rouge-L of finished completions against their references, as a :class:`QualityResult`."""
    t = time.perf_counter()
    scores = rouge_l([c.text for c in comps], refs, use_stemmer=use_stemmer)
    mean = sum(scores) / len(scores)
    std = (sum((x - mean) ** 2 for x in scores) / len(scores)) ** 0.5
    return QualityResult(
        set=name, source=source, n=len(prompts), skipped=skipped, rouge_l=mean, rouge_l_std=std,
        scorer={"package": "rouge-score", "version": _version("rouge-score"), "type": "rougeL",
                "measure": "fmeasure", "use_stemmer": use_stemmer},
        template=template, generation=dataclasses.asdict(settings),
        seconds={"generate": gen_s, "score": round(time.perf_counter() - t, 3)},
        prompts=list(prompts), references=list(refs), completions=list(comps), scores=scores)


def _proxy_config(cfg: EvaluateConfig, calibration: dict | None) -> dict:
    from ..judges.proxy import DEFAULT_OPENINGS

    return {"name": "proxy", "template": cfg.template, "openings": list(DEFAULT_OPENINGS),
            "threshold": calibration["threshold"] if calibration else cfg.proxy_threshold,
            "calibrated": cfg.proxy_threshold is None}


def _add_proxy(cfg: EvaluateConfig, lm: LoadedModel, runs: list[_SetRun]) -> dict | None:
    """Score every set with the first-token proxy, calibrate once on all sets pooled, add verdicts."""
    from ..judges.proxy import FirstTokenProxy

    proxy = FirstTokenProxy(lm, template=cfg.template, threshold=cfg.proxy_threshold, batch_size=cfg.batch_size or 128)
    t = time.perf_counter()
    scores = {id(r): proxy.scores(r.ps.prompts) for r in runs}
    score_s = time.perf_counter() - t
    calibration = None
    if proxy.threshold is None:
        ref = next(n for n in cfg.judges if n != "proxy")
        pool = [r for r in runs if ref in r.verdicts]
        if not pool:
            raise SafetyLayersError(f"the proxy's reference judge '{ref}' judged no set: put a refusal judge first in --judges")
        import numpy as np
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a one-class pool is reported in the calibration instead
            proxy.calibrate([p for r in pool for p in r.ps.prompts], [v for r in pool for v in r.verdicts[ref]],
                            scores=np.concatenate([scores[id(r)] for r in pool]))
        calibration = {**dataclasses.asdict(proxy.calibration), "reference_judge": ref,
                       "sets": [r.ps.name for r in pool], "one_class": proxy.calibration.n_refused in (0, proxy.calibration.n)}
    for r in runs:
        r.verdicts["proxy"] = proxy_verdicts(scores[id(r)], proxy.threshold)
        r.seconds["judge:proxy"] = round(score_s * len(r.ps.prompts) / max(1, sum(len(x.ps.prompts) for x in runs)), 3)
    if calibration is None:
        calibration = {"threshold": proxy.threshold, "reference_judge": None, "sets": [], "fixed": True}
    return calibration


def write_samples(path: Path, runs: list[_SetRun], quality: QualityResult | None) -> Path:
    """samples.jsonl: one line per prompt with its set, completion and every judge's verdict."""
    from ..core.runs import atomic_write, to_jsonable

    lines = []
    for r in runs:
        for i, (p, c) in enumerate(zip(r.ps.prompts, r.comps)):
            lines.append({"set": r.ps.name, "metric": r.metric, "index": i, "prompt": p, "completion": c.text,
                          "num_tokens": c.num_tokens, "finished": c.finished,
                          "verdicts": {label: to_jsonable(v[i]) for label, v in r.verdicts.items()}})
    if quality is not None:
        for i, (p, ref, c, s) in enumerate(zip(quality.prompts, quality.references, quality.completions, quality.scores)):
            lines.append({"set": quality.set, "metric": "rouge_l", "index": i, "prompt": p, "reference": ref,
                          "completion": c.text, "num_tokens": c.num_tokens, "finished": c.finished, "rouge_l": s})
    return atomic_write(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))


# --------------------------------------------------------------------------- console


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_summary(result: EvaluateResult, console=None) -> None:
    """Counts, rates, intervals, agreement and quality; never a completion (harmful text is data)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rates = [r for r in (result.harmful, result.over_refusal) if r is not None]
    if rates:
        t = Table(title=f"evaluate: {result.model} (template {result.template})")
        for c in ("metric", "set", "judge", "n", "count", "rate", "95% CI", "S_h"):
            t.add_column(c, justify="left" if c in ("metric", "set", "judge") else "right")
        for r in rates:
            for label, s in r.judges.items():
                decided = s.n - s.errors
                count = decided - s.refused if r.metric == "harmful_rate" else s.refused
                ci = wilson_interval(count, decided) if decided else None
                t.add_row(r.metric.replace("_", " ") if label == r.judge else "", r.set if label == r.judge else "",
                          label + (" *" if label == r.judge else ""), str(s.n),
                          f"{count}/{decided}" + (f" ({s.errors} err)" if s.errors else ""),
                          _pct(count / decided if decided else None),
                          f"{_pct(ci[0])}-{_pct(ci[1])}" if ci else "-",
                          f"{s.harmful_score:.2f}" if s.harmful_score is not None and label != "proxy" else "")
        console.print(t)
        console.print("[dim]* headline judge; harmful rate = share not refused, over-refusal rate = share refused[/dim]")
    pairs = [(r.set, a) for r in rates for a in r.agreement]
    if pairs:
        t = Table(title="judge agreement")
        for c in ("set", "judge A", "judge B", "n", "refused A", "refused B", "agree", "kappa"):
            t.add_column(c, justify="left" if c in ("set", "judge A", "judge B") else "right")
        for name, a in pairs:
            t.add_row(name, a["judge_a"], a["judge_b"], str(a["n"]), str(a["refused_a"]), str(a["refused_b"]),
                      _pct(a["percent"]), f"{a['kappa']:.3f}")
        console.print(t)
    c = result.calibration
    if c and c.get("reference_judge"):
        console.print(f"proxy threshold {c['threshold']:.4f}, calibrated against {c['reference_judge']} on "
                      f"{c['n']} prompts ({c['n_refused']} refused): {c['metric']} {c['value']:.3f}, "
                      f"agreement {_pct(c['agreement'])}")
    elif c:
        console.print(f"proxy threshold {c['threshold']:.4f} (fixed)")
    q = result.quality
    if q is not None:
        console.print(f"task quality: Rouge-L {q.rouge_l:.4f} (std {q.rouge_l_std:.4f}) on {q.n} records of {q.set}"
                      + (f", {q.skipped} without a reference skipped" if q.skipped else ""))
    if result.lm_eval:
        for task, metrics in result.lm_eval["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "stderr" not in k)
            console.print(f"lm-eval {task}: {shown}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if result.seconds:
        console.print(f"[dim]{result.seconds.get('total', 0):.1f} s on {result.processes} process(es)[/dim]")
