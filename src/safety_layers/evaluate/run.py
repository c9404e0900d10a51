"""Evaluate one model: harmful rate, over-refusal, harmful score, task quality, judge agreement.

:func:`evaluate` runs a whole :class:`EvaluateConfig` in stages: read the prompt sets and
references, build the judges, load the model, generate, then judge, score and write the run
folder. The rates come from :mod:`.rates`, Rouge-L and lm-eval from :mod:`.quality`.

Under ``torchrun``/``accelerate launch`` the prompts are sharded across processes for
generation (:mod:`safety_layers.engine.distributed`); rank 0 judges and writes, every rank returns
the same result.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SafetyLayersError
from ..core.models import LoadedModel, load_or_use
from ..core.runs import atomic_write, environment, read_json, to_jsonable, write_json
from ..core.stats import wilson_interval
from ..engine.distributed import run_on_main, world
from ..engine.generation import Completion, GenerationSettings
from ..judges import Judge, Verdict
from .config import EvaluateConfig
from .quality import QualityResult, lm_eval_scores, load_references, score_quality
from .rates import (RateResult, build_judge, generate_all, llm_labels, measures_harm, ordered, prompt_set, proxy_verdicts,
                    rate_result, run_judges)


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
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if hasattr(v, "to_dict") else to_jsonable(v)
        return d

    def to_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> "EvaluateResult":
        """Read a result.json back (per-prompt data are in samples.jsonl, not restored)."""
        d = read_json(path, "evaluate result")
        for key in ("harmful", "over_refusal"):
            d[key] = RateResult.from_dict(d[key]) if d.get(key) else None
        d["quality"] = QualityResult(**d["quality"]) if d.get("quality") else None
        return cls(**d)


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
    ev = _Evaluation(cfg or EvaluateConfig(), run_dir)
    ev.read_inputs()
    run_on_main(ev.build_judges)   # on rank 0 only: a classifier judge loads a model
    ev.load(model)
    ev.generate()
    return run_on_main(ev.finish)


class _Evaluation:
    """The stages of one :func:`evaluate` call and what they pass on."""

    def __init__(self, cfg: EvaluateConfig, run_dir: str | Path | None):
        self.cfg, self.w, self.t0 = cfg, world(), time.perf_counter()
        self.run_dir = Path(run_dir) if run_dir is not None and self.w.is_main else None
        self.seconds: dict[str, float] = {}
        self.sets: list[tuple] = []          # (metric, PromptSet, tokens)
        self.references = None               # (prompts, references, skipped) of the quality file
        self.judges: dict[str, Judge] = {}
        self.lm: LoadedModel | None = None
        self.runs: list[_SetRun] = []
        self.q_settings = cfg.settings(cfg.quality_tokens)
        self.q_comps: list[Completion] | None = None
        self.q_seconds = 0.0

    def read_inputs(self) -> None:
        cfg = self.cfg
        if cfg.malicious:
            self.sets.append(("harmful_rate", prompt_set(cfg.malicious, cfg.limit), cfg.max_new_tokens))
        if cfg.over_rejection:
            self.sets.append(("over_refusal_rate", prompt_set(cfg.over_rejection, cfg.limit),
                              cfg.over_rejection_tokens or cfg.max_new_tokens))
        self.references = load_references(cfg.quality, cfg.limit) if cfg.quality else None

    def build_judges(self) -> None:
        cfg = self.cfg
        for name in cfg.judges:
            if name != "proxy":
                self.judges[name] = build_judge(name, **cfg.judge_settings(name))
        refusal_judges = [j for j in self.judges.values() if not measures_harm(j)]
        if cfg.over_rejection and not refusal_judges and cfg.proxy_threshold is None:
            raise SafetyLayersError("the configured judges score harmfulness and cannot count refusals of benign "
                                    "prompts: add a refusal judge for the over-rejection set, e.g. --judges keyword,llm")

    def load(self, model) -> None:
        t = time.perf_counter()
        self.lm = load_or_use(model if model is not None else self.cfg.model, self.cfg)
        self.seconds["load"] = round(time.perf_counter() - t, 3)

    def _generate(self, prompts: list[str], settings: GenerationSettings) -> list[Completion]:
        cfg = self.cfg
        return generate_all(self.lm, prompts, settings, template=cfg.template, cache=cfg.cache, progress=cfg.progress,
                            backend=cfg.backend)

    def generate(self) -> None:
        for metric, ps, tokens in self.sets:
            s = self.cfg.settings(tokens)
            t = time.perf_counter()
            comps = self._generate(ps.prompts, s)
            self.runs.append(_SetRun(metric, ps, s, comps, {"generate": round(time.perf_counter() - t, 3)}))
        if self.references:
            t = time.perf_counter()
            self.q_comps = self._generate(self.references[0], self.q_settings)
            self.q_seconds = round(time.perf_counter() - t, 3)

    def finish(self) -> EvaluateResult:
        """On rank 0: judge, score and write; the result every rank returns."""
        cfg = self.cfg
        self._write_inputs()
        quality = None
        if self.references:
            quality = score_quality(Path(cfg.quality).stem, str(cfg.quality), *self.references, self.q_comps,
                                    self.q_settings, cfg.template, self.q_seconds)
        self._judge(quality)
        calibration = _add_proxy(cfg, self.lm, self.runs) if "proxy" in cfg.judges else None
        rates = {r.metric: rate_result(r.metric, r.ps.name, r.ps.source, r.ps.prompts, r.comps,
                                       ordered(r.verdicts, cfg.judges), cfg.template, r.settings, r.seconds,
                                       llm=llm_labels(self.judges))
                 for r in self.runs if r.verdicts}
        lm_eval = None
        if cfg.lm_eval_tasks:
            lm_eval = lm_eval_scores(self.lm, cfg.lm_eval_tasks, limit=cfg.limit, num_fewshot=cfg.lm_eval_fewshot,
                                     batch_size=cfg.batch_size, include_path=cfg.lm_eval_include)
        self.seconds["total"] = round(time.perf_counter() - self.t0, 3)
        result = EvaluateResult(
            model=self.lm.name, fingerprint=self.lm.fingerprint(), template=cfg.template,
            harmful=rates.get("harmful_rate"), over_refusal=rates.get("over_refusal_rate"), quality=quality,
            lm_eval=lm_eval, calibration=calibration,
            judges={label: j.config() for label, j in self.judges.items()} | (
                {"proxy": _proxy_config(cfg, calibration)} if "proxy" in cfg.judges else {}),
            processes=self.w.size, seconds=self.seconds, notes=self._notes(rates, calibration))
        if self.run_dir is not None:
            write_samples(self.run_dir / "samples.jsonl", self.runs, quality)
            result.to_json(self.run_dir / "result.json")
        return result

    def _write_inputs(self) -> None:
        if self.run_dir is None:
            return
        lm = self.lm
        write_json(self.run_dir / "config.json", self.cfg)
        write_json(self.run_dir / "env.json", {**environment(lm), "model": lm.name, "model_source": lm.source,
                                               "model_fingerprint": lm.fingerprint(), "processes": self.w.size,
                                               "sets": {r.ps.name: r.ps.source for r in self.runs}})

    def _judge(self, quality: QualityResult | None) -> None:
        """Every judge on every set; on failure, samples.jsonl keeps what was judged."""
        try:
            for r in self.runs:
                run_judges(self.judges, r.ps.prompts, [c.text for c in r.comps], r.verdicts,
                           r.metric == "harmful_rate", r.seconds)
        except SafetyLayersError as err:
            if self.run_dir is not None:
                write_samples(self.run_dir / "samples.jsonl", self.runs, quality)
                where = f"{self.run_dir / 'samples.jsonl'} and the generation cache"
            else:
                where = "the generation cache"
            n = sum(len(r.comps) for r in self.runs)
            raise SafetyLayersError(f"{err} ({n} completions kept in {where}; rerun to judge them)") from None

    def _notes(self, rates: dict, calibration: dict | None) -> list[str]:
        notes = []
        skipped = [label for label, j in self.judges.items() if measures_harm(j)]
        if skipped and "over_refusal_rate" in rates:
            notes.append(f"{', '.join(skipped)} scores harmfulness, so it did not judge the over-rejection set")
        if calibration:
            notes.append("the proxy threshold was calibrated on these same prompts, so its agreement is in-sample")
        return notes


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


def _rates_table(rates: list[RateResult], title: str):
    from rich.table import Table

    t = Table(title=title)
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
                      f"{r.harmful_score:.2f}" if label == r.score_judge else "")
    return t


def _agreement_table(pairs: list[tuple[str, dict]]):
    from rich.table import Table

    t = Table(title="judge agreement")
    for c in ("set", "judge A", "judge B", "n", "refused A", "refused B", "agree", "kappa"):
        t.add_column(c, justify="left" if c in ("set", "judge A", "judge B") else "right")
    for name, a in pairs:
        t.add_row(name, a["judge_a"], a["judge_b"], str(a["n"]), str(a["refused_a"]), str(a["refused_b"]),
                  _pct(a["percent"]), f"{a['kappa']:.3f}")
    return t


def print_summary(result: EvaluateResult, console=None) -> None:
    """Counts, rates, intervals, agreement and quality; never a completion (harmful text is data)."""
    from rich.console import Console

    console = console or Console()
    rates = [r for r in (result.harmful, result.over_refusal) if r is not None]
    if rates:
        console.print(_rates_table(rates, f"evaluate: {result.model} (template {result.template})"))
        console.print("[dim]* headline judge; harmful rate = share not refused, over-refusal rate = share refused[/dim]")
    pairs = [(r.set, a) for r in rates for a in r.agreement]
    if pairs:
        console.print(_agreement_table(pairs))
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
