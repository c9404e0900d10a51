"""Localization: find the safety layers by scaling a band and counting over-rejection (paper §3.4).

Multiplying a band's attention and MLP weights by alpha > 1 makes an aligned model refuse more
of the over-rejection set D_o (benign queries with violent verbs, "How to kill time?") when the
band holds safety layers, and less once it takes in unrelated layers, which "dilute" them;
alpha < 1 mirrors this. The paper's algorithm (§3.4.3), one stage of :func:`locate` each:

1. an initial range [i, j] from the existence analysis (``init``, or :func:`analysis.analyze`);
2. the unscaled model's refusal count R_o (the baseline), and the proxy's calibration;
3. alpha: given, or searched by the rule of A.3.4 (:func:`search.search_alpha`);
4. the upper-bound sweep: R_o of [i, e] scaled by alpha for e in j-window .. j+window; keep the
   argmax (``direction="up"``, alpha > 1) or argmin (``"down"``, alpha < 1); then, with that
   upper bound fixed, the lower-bound sweep over s in i-window .. i+window
   (:func:`search.sweep_bound`; ties and edges follow the rules written in :mod:`.search`);
5. how well the proxy's counts agree with generation's (Spearman), and a sanity check: the
   band scaled down should raise the harmful rate on malicious prompts, scaled up lower it;
6. the run folder: ``result.json``, ``trials.jsonl``, ``samples.jsonl``, ``sweeps.png``.

Refusals are counted as the released code does, on greedy completions of ``max_new_tokens``
(16) judged by the keyword judge. Speed: the released code deep-copied the model for every
candidate and generated one prompt at a time (about 23 minutes per candidate for 721 prompts
on a 2-core CPU). Here the band is scaled in place and every candidate is first *screened*
with the first-token refusal proxy; the ``confirm_top`` best candidates of each sweep, every
candidate within the proxy's measured error of the best (``search.CONFIRM_RULE``) and the
final band are then counted by generation + judge, which makes the decision; each sweep
records the error, the proxy's winner and whether the two disagree. Should the proxy
fail to calibrate, or give the same count everywhere in the alpha search, screening falls
back to generation, with a note. Counts are journaled (:mod:`.trials`), so a rerun on the
same folder evaluates nothing twice; under ``torchrun`` every rank takes the same decisions.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..core.config import from_mapping, settle
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.placement import device_settings
from ..core.runs import read_json, write_json
from ..core.scaling import resolve_components
from ..engine.distributed import run_on_main, world
from .plots import plot_sweeps
from .search import (ALPHA_RULE, DIRECTIONS, EDGE_RULE, PAPER_STD_SHARE, STD_RULE, TIE_RULE, check_alpha,
                     mirror_alpha, parse_sanity_alphas, sample_std, search_alpha, sweep_bound, sweep_table,
                     upper_window)
from .trials import PROXY_RULE, Evaluator, Journal, calibrate, digest, write_samples

SCREENS = ("proxy", "generation")
#: research knobs: YAML and Python only, no command-line flag
KNOB = {"cli": False}


# --------------------------------------------------------------------------- configuration

@dataclass
@device_settings(map_flag=True)
class LocateConfig:
    """Settings of one localization (``safety-layers locate``)."""

    model: str = field(default="demo", metadata={
        "help": "model: alias (demo, smollm2-135m-instruct), folder, .gguf or hub id"})
    over_rejection: str = field(default="over-rejection", metadata={
        "help": "over-rejection prompt set D_o (built-in over-rejection, FILE[:COLUMN], xstest-safe:FILE, ...)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT prompts of each set"})
    template: str | None = field(default=None, metadata={
        "help": "prompt template: chat, alpaca (the paper's), alpaca_short, plain (default: chat; paper mode: alpaca)",
        "default": "chat", "paper": "alpaca"})
    init: str | None = field(default=None, metadata={
        "help": "initial range START-END (0-based, inclusive, e.g. 7-12); default: analyze's initial range"})
    direction: Literal["up", "down"] = field(default="up", metadata={
        "help": "up: alpha > 1, the band with the MOST refusals wins; down: alpha < 1, the FEWEST wins"})
    alpha: float | None = field(default=None, metadata={
        "help": "scaling factor (e.g. 1.2 up, 0.8 down); default: search from 1 in alpha_step steps"})
    alpha_step: float = field(default=0.05, metadata={"help": "alpha search step (paper: 0.05)", **KNOB})
    max_alpha_steps: int = field(default=8, metadata={
        "help": "most alpha search steps (8: up to 1.4 / down to 0.6)", **KNOB})
    std_threshold: float | None = field(default=None, metadata={
        "help": "alpha search stops at this sweep std, in refusals (default: 17.5/721 of the set size; paper: 15-20)",
        **KNOB})
    window: int = field(default=2, metadata={"help": "candidates on each side of the bound being swept", **KNOB})
    max_widen: int | None = field(default=None, metadata={
        "help": "most window extensions per sweep when the optimum is on an edge (default: up to the model's edge)",
        **KNOB})
    components: str = field(default="paper", metadata={
        "help": "weights scaled: paper (q,k,v,o,gate,up,down), no-o-proj (the OpenReview code), attn, mlp", **KNOB})
    screen: Literal["proxy", "generation"] | None = field(default=None, metadata={
        "help": "how every candidate is counted first: proxy (first-token, fast) or generation "
                "(default: proxy; paper mode: generation)", "default": "proxy", "paper": "generation", **KNOB})
    confirm_top: int = field(default=2, metadata={
        "help": "best screened candidates per sweep always recounted by generation (then all within the proxy's error)",
        **KNOB})
    max_new_tokens: int = field(default=16, metadata={
        "help": "tokens generated per prompt for refusal counting (paper code: 16)", **KNOB})
    judge: str | None = field(default=None, metadata={
        "help": "refusal judge that counts over-rejection: rules, keyword, keyword-gcg, prefix (or another registered name)",
        "default": "rules", "paper": "keyword", **KNOB})
    malicious: str | None = field(default="malicious", metadata={
        "help": "malicious set for proxy calibration and the sanity check (none skips both the pooling and the check)",
        **KNOB})
    sanity_alphas: str | None = field(default=None, metadata={
        "help": "DOWN,UP alphas of the sanity check, e.g. 0.8,1.2 (default: the found alpha and its mirror around 1)",
        **KNOB})
    batch_size: int | None = field(default=None, metadata={"help": "prompts per forward batch (default: 128)", **KNOB})
    cache: bool = field(default=True, metadata={"help": "reuse and store completions in the generation cache", **KNOB})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template, every candidate counted by generation, the initial range from "
                "the raw gap (settings you give keep their value)"})
    seed: int = field(default=0, metadata={"help": "random seed (of the analysis that gives the initial range)",
                                           **KNOB})
    out: str | None = field(default=None, metadata={
        "help": "run folder (default runs/locate-<model>-<time>); one holding trials.jsonl resumes"})
    overwrite: bool = field(default=False, metadata={
        "help": "reuse an existing, non-empty run folder that is not a locate run", **KNOB})
    progress: bool = field(default=True, metadata={"help": "show progress bars", **KNOB})
    paper_set: list = field(init=False, default_factory=list, metadata={
        "help": "what paper mode set (the fields left unset), for the record", **KNOB})

    def __post_init__(self):
        self.paper_set = settle(self)
        if self.malicious is not None and str(self.malicious).strip().lower() in ("", "none", "off"):
            self.malicious = None
        if self.init is not None and str(self.init).strip().lower() in ("", "none", "auto"):
            self.init = None
        _check(self)


def _check(cfg: LocateConfig) -> None:
    """One-line errors for settings no localization can run with."""
    if cfg.direction not in DIRECTIONS:
        raise SafetyLayersError(f"unknown direction {cfg.direction!r}: use up (alpha > 1, argmax) "
                                "or down (alpha < 1, argmin)")
    if cfg.screen not in SCREENS:
        raise SafetyLayersError(f"unknown screen {cfg.screen!r}: use proxy or generation")
    if cfg.alpha is not None:
        check_alpha(cfg.alpha, cfg.direction)
    if not 0 < cfg.alpha_step < 1:
        raise SafetyLayersError(f"alpha_step must lie in (0, 1), got {cfg.alpha_step}: the paper uses 0.05")
    for name in ("max_alpha_steps", "window", "max_new_tokens", "limit", "batch_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise SafetyLayersError(f"{name} must be >= 1, got {value}")
    for name in ("confirm_top", "max_widen"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise SafetyLayersError(f"{name} must be >= 0, got {value}")
    if cfg.std_threshold is not None and cfg.std_threshold < 0:
        raise SafetyLayersError(f"std_threshold must be >= 0 refusals, got {cfg.std_threshold}")
    resolve_components(cfg.components)
    if cfg.sanity_alphas is not None:
        parse_sanity_alphas(cfg.sanity_alphas)


# --------------------------------------------------------------------------- result

@dataclass
class LocateResult:
    """The found band and the evidence for it (``result.json``). Ranges are [start, end], 0-based, inclusive."""

    model: str
    num_layers: int
    over_rejection: str
    n_prompts: int
    template: str
    judge: str
    components: str
    screen: str
    direction: str
    alpha: float
    alpha_source: str                 # "given" | "search"
    alpha_reached: bool | None        # search only: did some alpha reach std_threshold
    std_threshold: float
    baseline: dict                    # {"count": R_o, "proxy_count"}
    init_range: list[int]
    init_source: str                  # "analyze" | "user"
    alpha_search: list[dict]
    sweeps: list[dict]
    safety_layers: list[int]          # the found band
    count: int                        # refusals of the found band at alpha (generation + judge)
    proxy_count: int | None
    table: str                        # Table-1-style lines, one per sweep
    proxy: dict | None
    proxy_generation_spearman: dict
    sanity: dict | None
    rules: dict
    evaluations: dict
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> Path:
        """Write ``result.json`` (atomically)."""
        return write_json(path, self)

    @classmethod
    def from_json(cls, path: str | Path) -> "LocateResult":
        """A result written by :meth:`to_json` (a run folder's ``result.json``); one-line errors."""
        data = read_json(path, "locate result")
        data.pop("range", None)  # files written before the band was held once carry it twice
        return from_mapping(cls, data, str(path))


# --------------------------------------------------------------------------- the stages

@dataclass
class _Run:
    """What every stage of one localization reads: settings, model, prompt sets, the evaluator."""

    cfg: LocateConfig
    lm: Any
    sets: dict                        # "over-rejection" (and "malicious") -> PromptSet
    ev: Evaluator
    bar: Any
    run_dir: Path | None
    w: Any
    notes: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.sets["over-rejection"])


@dataclass
class _Alpha:
    alpha: float
    history: list[dict]
    reached: bool | None
    screen: str                       # the screening method the sweeps use
    threshold: float


@contextmanager
def _timed(seconds: dict, name: str):
    t = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - t, 3)


def _prompt_set(spec, limit, what: str):
    from ..core.data import load_prompts

    ps = load_prompts(spec, limit)
    if len(ps) == 0:
        raise SafetyLayersError(f"the {what} set {ps.name!r} is empty: give a set with at least one prompt")
    return ps


def _prepare(cfg: LocateConfig, model, run_dir) -> tuple[_Run, LayerRange | None]:
    """Prompt sets, judge, model and evaluator; ``config.json`` and ``env.json`` in the run folder."""
    from tqdm.auto import tqdm

    from ..core.models import load_or_use
    from ..core.runs import environment
    from ..judges.factory import build_judge

    w = world()
    over = _prompt_set(cfg.over_rejection, cfg.limit, "over-rejection")
    mal = _prompt_set(cfg.malicious, cfg.limit, "malicious") if cfg.malicious else None
    judge = build_judge(cfg.judge)
    init = LayerRange.parse(cfg.init) if cfg.init else None
    lm = load_or_use(model if model is not None else cfg.model, cfg)
    if init is not None:
        init.check(lm.num_layers)
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and w.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg)
        write_json(run_dir / "env.json", {**environment(lm), "model": lm.name, "model_fingerprint": lm.fingerprint(),
                                          "over_rejection_source": over.source,
                                          "malicious_source": mal.source if mal else None, "processes": w.size})
    journal = Journal(run_dir / "trials.jsonl" if run_dir is not None else None, w)
    sets = {"over-rejection": over, **({"malicious": mal} if mal else {})}
    bar = tqdm(desc="locate", unit="count", disable=not (cfg.progress and w.is_main), dynamic_ncols=True)
    ev = Evaluator(lm, sets, judge, journal, template=cfg.template, components=cfg.components,
                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, cache=cfg.cache, bar=bar, w=w)
    return _Run(cfg, lm, sets, ev, bar, run_dir, w), init


def _init_from_analyze(run: _Run) -> LayerRange:
    """The initial range of :func:`analysis.analyze` on the built-in normal/malicious sets (journaled)."""
    from ..analysis.run import AnalyzeConfig

    cfg, lm = run.cfg, run.lm
    acfg = AnalyzeConfig(model=lm.name, limit=cfg.limit, template=cfg.template, bootstrap=0, probe=False,
                         seed=cfg.seed, paper=cfg.paper, progress=cfg.progress and run.w.is_main)
    setup = digest({"model": lm.fingerprint(), "limit": cfg.limit, "template": acfg.template,
                    "range_curve": acfg.range_curve, "seed": cfg.seed})
    key = ("analyze", None, 1.0, "analyze", setup)
    rec = run.ev.journal.get(key)
    if rec is None:
        out = (run.run_dir / "analysis") if run.run_dir is not None else None
        found = run_on_main(functools.partial(_analyze_range, acfg, lm, out), run.w)
        rec = {"set": "analyze", "range": list(found), "alpha": 1.0, "method": "analyze", "setup": setup}
        run.ev.journal.add(key, rec)
    return LayerRange.parse(rec["range"]).check(lm.num_layers)


def _analyze_range(acfg, lm, run_dir: Path | None) -> list[int]:
    from ..analysis.run import analyze

    res = analyze(acfg, model=lm, run_dir=run_dir)
    if res.initial_range is None:
        raise SafetyLayersError("analyze found no initial safety-layer range on this model (no gap between "
                                "normal and malicious prompts rises out of the early layers): pass --init START-END")
    return res.initial_range


def _baseline(run: _Run) -> tuple[str, dict | None, dict]:
    """The screening method, the proxy's calibration and the unscaled counts."""
    ev, screen, proxy_info = run.ev, run.cfg.screen, None
    if screen == "proxy":
        proxy_info = calibrate(ev, list(run.sets), run.notes)
        if not proxy_info["used"]:
            screen = "generation"
    baseline = {"count": ev.count("over-rejection", None),
                "proxy_count": ev.proxy_count("over-rejection", None) if screen == "proxy" else None}
    return screen, proxy_info, baseline


def _window_counts(ev: Evaluator, method: str, ranges: list[LayerRange], alpha: float) -> list[int]:
    return [ev.counter(method, alpha)(rng) for rng in ranges]


def _find_alpha(run: _Run, init: LayerRange, method: str, threshold: float) -> tuple[float, list[dict], bool | None]:
    """The given alpha, or the searched one; every step scored by ``method`` on the upper window."""
    cfg = run.cfg
    counts_at = functools.partial(_window_counts, run.ev, method, upper_window(init, run.lm.num_layers, cfg.window))
    if cfg.alpha is not None:
        counts = counts_at(cfg.alpha)
        return cfg.alpha, [{"alpha": cfg.alpha, "std": sample_std(counts), "counts": counts, "threshold": threshold,
                            "method": method}], None
    alpha, history, reached = search_alpha(counts_at, cfg.direction, cfg.alpha_step, cfg.max_alpha_steps, threshold)
    return alpha, [{**h, "method": method} for h in history], reached


def _alpha(run: _Run, init: LayerRange, screen: str, baseline: dict) -> _Alpha:
    """Alpha by the rule of A.3.4, falling back to generation when the proxy cannot rank the window."""
    cfg, n = run.cfg, run.n
    threshold = cfg.std_threshold if cfg.std_threshold is not None else PAPER_STD_SHARE * n
    alpha, history, reached = _find_alpha(run, init, screen, threshold)
    if screen == "proxy" and len({c for h in history for c in h["counts"]} | {baseline["proxy_count"]}) == 1:
        run.notes.append(f"the proxy gives {baseline['proxy_count']} refusals for every range and alpha tried, so "
                         "it cannot rank them: every candidate is counted by generation + judge instead")
        screen = "generation"
        alpha, more, reached = _find_alpha(run, init, screen, threshold)
        history += more
    seen = [baseline["count"]] + [c for h in history if h["method"] == "generation" for c in h["counts"]]
    if screen == "generation" and len(set(seen)) == 1 and seen[0] in (0, n):
        tried = ", ".join(f"{a:g}" for a in sorted({h["alpha"] for h in history}))
        other = "down" if cfg.direction == "up" else "up"
        raise SafetyLayersError(
            f"the model refuses {'none' if seen[0] == 0 else 'all'} of the {n} over-rejection prompts, unscaled and "
            f"with {init.start}-{init.end}±{cfg.window} scaled by alpha {tried}: no range stands out, so any band "
            f"would be meaningless; try --direction {other} (alpha on the other side of 1) or a larger "
            "--over-rejection set")
    if reached is False:
        best = next(h for h in history if h["alpha"] == alpha and h["method"] == screen)
        run.notes.append(f"no alpha up to {history[-1]['alpha']:g} made the sweep's std reach {threshold:.2f} "
                         f"refusals; using alpha {alpha:g}, whose std {best['std']:.2f} was the largest")
    return _Alpha(alpha, history, reached, screen, threshold)


def _sweeps(run: _Run, init: LayerRange, a: _Alpha) -> tuple[LayerRange, list[dict]]:
    """The upper-bound sweep from [i, j], then the lower-bound sweep with the found upper bound fixed."""
    cfg, ev = run.cfg, run.ev
    common = dict(direction=cfg.direction, window=cfg.window, screen=ev.counter(a.screen, a.alpha),
                  confirm=ev.counter("generation", a.alpha) if a.screen == "proxy" else None,
                  confirm_top=cfg.confirm_top, max_widen=cfg.max_widen)
    upper, s_upper = sweep_bound("upper", init.start, init.end, run.lm.num_layers, **common)
    band, s_lower = sweep_bound("lower", upper.end, init.start, run.lm.num_layers, **common)
    sweeps = s_upper + s_lower
    for s in sweeps:
        s["std"] = sample_std([r["count"] if a.screen == "generation" else r["proxy_count"] for r in s["rows"]])
    return band, sweeps


def _agreement(ev: Evaluator, screen: str, proxy_info: dict | None) -> dict:
    """Spearman correlation of proxy and generation counts over every candidate counted both ways."""
    if not (screen == "proxy" or (proxy_info and proxy_info["used"])):
        return {"rho": None, "n": 0}
    from ..core.stats import spearman

    gen, prox = ev.journal_counts("over-rejection", "generation"), ev.journal_counts("over-rejection", "proxy")
    both = sorted(set(gen) & set(prox), key=str)
    rho = spearman([prox[k] for k in both], [gen[k] for k in both]) if len(both) >= 2 else float("nan")
    return {"rho": None if math.isnan(rho) else round(rho, 4), "n": len(both)}


def _sanity(run: _Run, band: LayerRange, alpha: float) -> dict | None:
    """Harmful rate on the malicious set, unscaled and with the band scaled down and up."""
    mal = run.sets.get("malicious")
    if mal is None:
        return None
    cfg, m = run.cfg, len(mal)
    down, up = (parse_sanity_alphas(cfg.sanity_alphas) if cfg.sanity_alphas
                else tuple(sorted((alpha, mirror_alpha(alpha)))))
    base_rate, down_rate, up_rate = (1.0 - run.ev.count("malicious", rng, a) / m
                                     for rng, a in ((None, 1.0), (band, down), (band, up)))
    if base_rate in (0.0, 1.0):
        run.notes.append(f"the unscaled model's harmful rate on {mal.name} is {base_rate:.0%}, so the sanity check "
                         "cannot move both ways; use a set the model partly answers")
    return {"malicious": mal.name, "n": m, "band": [band.start, band.end], "judge": cfg.judge,
            "baseline_harmful_rate": base_rate, "down": {"alpha": down, "harmful_rate": down_rate},
            "up": {"alpha": up, "harmful_rate": up_rate},
            "passed": bool(down_rate > base_rate and up_rate < base_rate)}


def _write(run: _Run, result: LocateResult, band: LayerRange) -> None:
    """``samples.jsonl`` (the completions behind the headline numbers), ``sweeps.png`` and ``result.json``."""
    if run.run_dir is None or not run.w.is_main:
        return
    wanted = [("over-rejection", None, 1.0), ("over-rejection", band, result.alpha)]
    if result.sanity is not None:
        wanted += [("malicious", None, 1.0), ("malicious", band, result.sanity["down"]["alpha"]),
                   ("malicious", band, result.sanity["up"]["alpha"])]
    write_samples(run.ev, run.run_dir / "samples.jsonl", wanted)
    plot_sweeps(result, run.run_dir / "sweeps.png")
    result.to_json(run.run_dir / "result.json")


# --------------------------------------------------------------------------- the locate step

def locate(cfg: LocateConfig | None = None, model=None, run_dir: str | Path | None = None) -> LocateResult:
    """Find the safety layers; with ``run_dir``, write (and resume from) the run folder.

    ``model``: a loaded model to reuse (else ``cfg.model`` is loaded). The model's weights are
    scaled in place during each count and restored bit-identically after it, also on error.
    """
    cfg = cfg or LocateConfig()
    t_start = time.perf_counter()
    run, init = _prepare(cfg, model, run_dir)
    ev, seconds = run.ev, run.seconds
    try:
        with _timed(seconds, "analyze"):
            init, init_source = (init, "user") if init is not None else (_init_from_analyze(run), "analyze")
        with _timed(seconds, "calibrate"):
            screen, proxy_info, baseline = _baseline(run)
        with _timed(seconds, "alpha_search"):
            a = _alpha(run, init, screen, baseline)
        with _timed(seconds, "sweeps"):
            band, sweeps = _sweeps(run, init, a)
            count = ev.count("over-rejection", band, a.alpha)
            band_proxy = ev.proxy_count("over-rejection", band, a.alpha) if a.screen == "proxy" else None
        if count == baseline["count"]:
            run.notes.append(f"the found band {band} at alpha {a.alpha:g} refuses as often as the unscaled model "
                             f"({count} of {run.n}): the evidence for it is weak")
        spearman = _agreement(ev, a.screen, proxy_info)
        with _timed(seconds, "sanity"):
            sanity = _sanity(run, band, a.alpha)
    finally:
        run.bar.close()
    seconds.update(proxy_total=round(ev.seconds["proxy"], 3), generation_total=round(ev.seconds["generation"], 3),
                   total=round(time.perf_counter() - t_start, 3))
    result = LocateResult(
        model=run.lm.name, num_layers=run.lm.num_layers, over_rejection=run.sets["over-rejection"].name,
        n_prompts=run.n, template=ev.template, judge=cfg.judge, components=cfg.components, screen=a.screen,
        direction=cfg.direction, alpha=float(a.alpha), alpha_source="given" if cfg.alpha is not None else "search",
        alpha_reached=a.reached, std_threshold=a.threshold, baseline=baseline, init_range=[init.start, init.end],
        init_source=init_source, alpha_search=a.history, sweeps=sweeps, safety_layers=[band.start, band.end],
        count=count, proxy_count=band_proxy, table=sweep_table(sweeps, cfg.direction), proxy=proxy_info,
        proxy_generation_spearman=spearman, sanity=sanity,
        rules={"alpha": ALPHA_RULE, "ties": TIE_RULE, "edges": EDGE_RULE, "proxy": PROXY_RULE, "std": STD_RULE},
        evaluations={**ev.fresh, "reused": len(ev.reused)}, notes=run.notes, seconds=seconds)
    _write(run, result, band)
    return result


# --------------------------------------------------------------------------- console

def print_summary(result: LocateResult, run_dir: str | Path | None = None, console=None) -> None:
    """A rich table of every sweep and the found band (counts only, never completions)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"locate: {result.model} ({result.num_layers} layers), {result.over_rejection} "
                    f"({result.n_prompts} prompts), alpha {result.alpha:g} {result.direction}, screen {result.screen}")
    for c in ("sweep", "range", "proxy", "generation", ""):
        t.add_column(c, justify="right" if c in ("proxy", "generation") else "left")
    t.add_row("unscaled", "-", "" if result.baseline["proxy_count"] is None else str(result.baseline["proxy_count"]),
              str(result.baseline["count"]), "")
    for s in result.sweeps:
        for r in s["rows"]:
            mark = "chosen" if r["range"] == s["chosen"] else ""
            t.add_row(s["stage"], f"{r['range'][0]}-{r['range'][1]}",
                      "" if r["proxy_count"] is None else str(r["proxy_count"]),
                      "" if r["count"] is None else str(r["count"]), mark,
                      style="bold" if mark else None)
    console.print(t)
    a, b = result.safety_layers
    console.print(f"safety layers: [bold]{a}-{b}[/bold] (0-based, inclusive): {result.count} of {result.n_prompts} "
                  f"refused at alpha {result.alpha:g} vs {result.baseline['count']} unscaled; initial range "
                  f"{result.init_range[0]}-{result.init_range[1]} ({result.init_source})")
    sp = result.proxy_generation_spearman
    if sp["n"]:
        console.print(f"proxy vs generation: Spearman rho {sp['rho']} over {sp['n']} candidates")
    if result.sanity:
        s = result.sanity
        console.print(f"sanity ({s['malicious']}, {s['n']} prompts, harmful rate): "
                      f"unscaled {s['baseline_harmful_rate']:.1%}, x{s['down']['alpha']:g} "
                      f"{s['down']['harmful_rate']:.1%}, x{s['up']['alpha']:g} {s['up']['harmful_rate']:.1%}: "
                      f"{'passed' if s['passed'] else 'NOT passed'}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if run_dir:
        console.print(f"results: {run_dir}/result.json, figure: {run_dir}/sweeps.png, trials: {run_dir}/trials.jsonl")
