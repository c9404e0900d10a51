"""Localization: find the safety layers by scaling a band and counting over-rejection (paper §3.4-3.6).

Multiplying a band's attention and MLP weights by alpha > 1 makes an aligned model refuse more
of the over-rejection set D_o (benign queries with violent verbs, "How to kill time?") when the
band holds safety layers, and less once it takes in unrelated layers, which "dilute" them;
alpha < 1 mirrors this. The paper's algorithm (spec §3.5):

1. an initial range [i, j] from the existence analysis (``init``, or :func:`analysis.analyze`);
2. the unscaled model's refusal count R_o (the baseline);
3. the upper-bound sweep: R_o of [i, e] scaled by alpha for e in j-window .. j+window; keep the
   argmax (``direction="up"``, alpha > 1) or argmin (``"down"``, alpha < 1);
4. with that upper bound fixed, the lower-bound sweep over s in i-window .. i+window.

What the paper leaves open (spec §9 q5-q8) is decided here and written into every result
(``rules``):

- **alpha** (A.3.4): without ``alpha``, try 1 ± 0.05, 1 ± 0.10, ... and stop at the first alpha
  whose upper-bound window sweep (the 2·window+1 ranges [i, j-window] .. [i, j+window], before any
  widening, scored by the screening method) has a *sample* standard deviation (ddof = 1, which
  reproduces the paper's Table 4 figure of 2.4) of at least ``std_threshold`` refusals. The
  default threshold is the paper's N_u = 15-20 per 721 prompts scaled to the set: 17.5 / 721 · n.
  If no alpha within ``max_alpha_steps`` reaches it, the alpha with the largest std is used (the
  one closer to 1 on a tie) and a note says so.
- **ties**: among equal counts the narrower band wins (the smaller claim; within one sweep one
  bound is fixed, so the width decides uniquely).
- **edges**: when the optimum lies on the edge of the evaluated window, ``window`` more candidates
  are added beyond that edge (never past layer 0 or the last layer, or the fixed bound), until
  the optimum is inside, the model ends, or ``max_widen`` extensions were made.
- **counting**: greedy completions of ``max_new_tokens`` (16, as the released code) judged by
  the keyword judge.

Speed: the released code deep-copied the model for every candidate and generated one prompt at
a time (about 23 minutes per candidate for 721 prompts on a CPU, spec §10). Here the band is
scaled in place (:func:`scaling.scaled_layers`, restored bit-identically) and every candidate
is first *screened* with the first-token refusal proxy (:class:`proxy.FirstTokenProxy`: one
batched forward pass per prompt, no decoding), whose threshold is calibrated against generation
+ judge on the unscaled model (over-rejection and malicious prompts pooled, so both verdicts
occur). The ``confirm_top`` best candidates of each sweep and the final band are then counted
by generation + judge, which makes the decision; the Spearman correlation of proxy and
generation counts over every candidate that has both is reported. Should the proxy fail to
calibrate (the unscaled model refuses none or all of the calibration prompts) or give the same
count everywhere in the alpha search, screening falls back to generation, with a note.

Every count is appended to ``run_dir/trials.jsonl`` the moment it is known (keyed by set, range,
alpha and method, plus a hash of everything that affects it), with the per-prompt verdicts or
proxy scores, so a rerun on the same folder evaluates nothing twice. Under ``torchrun`` or
``accelerate launch`` each candidate's prompts are sharded across processes; every rank takes
the same decisions and rank 0 writes the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ..engine.distributed import broadcast_from_main, map_sharded, run_on_main, world
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange

#: the paper's N_u (15-20 refusals of 721 prompts) as a share of the set: 17.5 / 721
PAPER_STD_SHARE = 17.5 / 721
DIRECTIONS = ("up", "down")
SCREENS = ("proxy", "generation")

ALPHA_RULE = ("alpha search: |alpha - 1| grows by alpha_step from 1; stop at the first alpha whose upper-bound "
              "window sweep [i, j-window]..[i, j+window] (before widening, screening counts) has a sample std "
              "(ddof=1) >= std_threshold; if none does within max_alpha_steps, take the alpha with the largest std "
              "(closer to 1 on a tie)")
TIE_RULE = "ties: the narrower band wins"
EDGE_RULE = ("edges: an optimum on the window's edge adds `window` more candidates beyond it (never past the model "
             "or the fixed bound) until it is inside, the model ends or max_widen extensions were made")
PROXY_RULE = ("proxy threshold: balanced-accuracy threshold on first-token refusal mass vs generation + judge, "
              "unscaled model, over-rejection and malicious prompts pooled")


# --------------------------------------------------------------------------- configuration

@dataclass
class LocateConfig:
    """Settings of one localization (``safety-layers locate``)."""

    model: str = field(default="demo", metadata={
        "help": "model: alias (demo, smollm2-135m-instruct), folder, .gguf or hub id"})
    over_rejection: str = field(default="over-rejection", metadata={
        "help": "over-rejection prompt set D_o (built-in over-rejection, FILE[:COLUMN], xstest-safe:FILE, ...)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT prompts of each set"})
    template: str = field(default="chat", metadata={
        "help": "prompt template: chat, alpaca (the paper's), alpaca_short, plain"})
    init: str | None = field(default=None, metadata={
        "help": "initial range START-END (0-based, inclusive, e.g. 7-12); default: analyze's initial range"})
    direction: Literal["up", "down"] = field(default="up", metadata={
        "help": "up: alpha > 1, the band with the MOST refusals wins; down: alpha < 1, the FEWEST wins"})
    alpha: float | None = field(default=None, metadata={
        "help": "scaling factor (e.g. 1.2 up, 0.8 down); default: search from 1 in alpha_step steps"})
    alpha_step: float = field(default=0.05, metadata={"help": "alpha search step (paper: 0.05)"})
    max_alpha_steps: int = field(default=8, metadata={"help": "most alpha search steps (8: up to 1.4 / down to 0.6)"})
    std_threshold: float | None = field(default=None, metadata={
        "help": "alpha search stops at this sweep std, in refusals (default: 17.5/721 of the set size; paper: 15-20)"})
    window: int = field(default=2, metadata={"help": "candidates on each side of the bound being swept"})
    max_widen: int | None = field(default=None, metadata={
        "help": "most window extensions per sweep when the optimum is on an edge (default: up to the model's edge)"})
    components: str = field(default="paper", metadata={
        "help": "weights scaled: paper (q,k,v,o,gate,up,down), no-o-proj (the OpenReview code), attn, mlp"})
    screen: Literal["proxy", "generation"] | None = field(default=None, metadata={
        "help": "how every candidate is counted first: proxy (first-token, fast) or generation "
                "(default: proxy; paper mode: generation)"})
    confirm_top: int = field(default=2, metadata={
        "help": "best screened candidates per sweep recounted with generation + judge (they decide)"})
    max_new_tokens: int = field(default=16, metadata={
        "help": "tokens generated per prompt for refusal counting (paper code: 16)"})
    judge: str = field(default="keyword", metadata={
        "help": "refusal judge: keyword, keyword-gcg (or another registered name)"})
    malicious: str | None = field(default="malicious", metadata={
        "help": "malicious set for proxy calibration and the sanity check (none skips both the pooling and the check)"})
    sanity_alphas: str | None = field(default=None, metadata={
        "help": "DOWN,UP alphas of the sanity check, e.g. 0.8,1.2 (default: the found alpha and its mirror around 1)"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts per forward batch (default: 128)"})
    cache: bool = field(default=True, metadata={"help": "reuse and store completions in the generation cache"})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template, every candidate counted by generation, analyze in paper mode"})
    seed: int = field(default=0, metadata={"help": "random seed (of the analysis that gives the initial range)"})
    out: str | None = field(default=None, metadata={
        "help": "run folder (default runs/locate-<model>-<time>); one holding trials.jsonl resumes"})
    overwrite: bool = field(default=False, metadata={
        "help": "reuse an existing, non-empty run folder that is not a locate run"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        if self.paper:
            self.template = "alpaca"
            if self.screen is None:
                self.screen = "generation"
        if self.screen is None:
            self.screen = "proxy"
        if self.malicious is not None and str(self.malicious).strip().lower() in ("", "none", "off"):
            self.malicious = None
        if self.init is not None and str(self.init).strip().lower() in ("", "none", "auto"):
            self.init = None
        if self.direction not in DIRECTIONS:
            raise SafetyLayersError(f"unknown direction {self.direction!r}: use up (alpha > 1, argmax) "
                                    "or down (alpha < 1, argmin)")
        if self.screen not in SCREENS:
            raise SafetyLayersError(f"unknown screen {self.screen!r}: use proxy or generation")
        if self.alpha is not None:
            check_alpha(self.alpha, self.direction)
        if not 0 < self.alpha_step < 1:
            raise SafetyLayersError(f"alpha_step must lie in (0, 1), got {self.alpha_step}: the paper uses 0.05")
        for name in ("max_alpha_steps", "window", "max_new_tokens", "limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SafetyLayersError(f"{name} must be >= 1, got {value}")
        for name in ("confirm_top", "max_widen"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SafetyLayersError(f"{name} must be >= 0, got {value}")
        if self.std_threshold is not None and self.std_threshold < 0:
            raise SafetyLayersError(f"std_threshold must be >= 0 refusals, got {self.std_threshold}")
        from ..core.scaling import resolve_components

        resolve_components(self.components)
        if self.sanity_alphas is not None:
            parse_sanity_alphas(self.sanity_alphas)


def check_alpha(alpha: float, direction: str) -> float:
    """``alpha`` if it lies on the side of 1 that ``direction`` needs, else a one-line error."""
    if not alpha > 0:
        raise SafetyLayersError(f"alpha must be > 0, got {alpha}: use alpha > 1 (direction up) "
                                "or 0 < alpha < 1 (direction down)")
    if alpha == 1:
        raise SafetyLayersError("alpha = 1 scales nothing: use alpha > 1 with direction up "
                                "or alpha < 1 with direction down")
    if direction == "up" and alpha < 1:
        raise SafetyLayersError(f"alpha {alpha} < 1 weakens the band, but direction is up: "
                                "pass --direction down or an alpha > 1")
    if direction == "down" and alpha > 1:
        raise SafetyLayersError(f"alpha {alpha} > 1 amplifies the band, but direction is down: "
                                "pass --direction up or an alpha < 1")
    return float(alpha)


def parse_sanity_alphas(text: str) -> tuple[float, float]:
    """``"0.8,1.2"`` -> (0.8, 1.2): one alpha below 1 and one above."""
    try:
        down, up = (float(x) for x in str(text).replace(" ", "").split(","))
    except ValueError:
        raise SafetyLayersError(f"sanity_alphas must be DOWN,UP such as 0.8,1.2, got {text!r}") from None
    if not (0 < down < 1 < up):
        raise SafetyLayersError(f"sanity_alphas need 0 < DOWN < 1 < UP, got {down},{up}: e.g. 0.8,1.2")
    return down, up


def mirror_alpha(alpha: float) -> float:
    """The alpha on the other side of 1 at the same distance (1.2 <-> 0.8); 1/alpha when that would be <= 0."""
    m = 2.0 - alpha
    return round(m if m > 0 else 1.0 / alpha, 6)


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
    safety_layers: list[int]
    range: list[int]
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


# --------------------------------------------------------------------------- the sweep logic

def rank_key(count: int, rng: LayerRange, direction: str) -> tuple:
    """Sort key, best first: most (up) or fewest (down) refusals, then the narrower band."""
    return (-count if direction == "up" else count, len(rng), rng.start)


def sample_std(counts) -> float:
    """Sample standard deviation (ddof = 1); 0 for fewer than two values."""
    return float(np.std(np.asarray(counts, dtype=np.float64), ddof=1)) if len(counts) > 1 else 0.0


def _window(centre: int, lo: int, hi: int, w: int) -> list[int]:
    return list(range(max(lo, centre - w), min(hi, centre + w) + 1))


def sweep_bound(bound: Literal["upper", "lower"], fixed: int, centre: int, num_layers: int, *,
                direction: str, window: int, screen: Callable[[LayerRange], int],
                confirm: Callable[[LayerRange], int] | None = None, confirm_top: int = 2,
                max_widen: int | None = None) -> tuple[LayerRange, list[dict]]:
    """Sweep one bound; returns the chosen range and the stages (``bound``, then ``bound-widened`` ...).

    ``upper``: ranges [fixed, e] for e around ``centre``; ``lower``: [s, fixed]. ``screen(range)``
    gives every candidate's count. With ``confirm`` (generation + judge) the ``confirm_top`` best
    screened candidates are recounted and the best recount decides; without it the screening
    counts are generation counts and decide directly. Widening follows :data:`EDGE_RULE`.
    Each stage is ``{"stage", "bound", "fixed", "rows": [{"range", "proxy_count", "count",
    "confirmed"}]}`` with rows ordered from the narrowest band.
    """
    lo, hi = (fixed, num_layers - 1) if bound == "upper" else (0, fixed)
    make = (lambda v: LayerRange(fixed, v)) if bound == "upper" else (lambda v: LayerRange(v, fixed))
    screened: dict[int, int] = {}
    confirmed: dict[int, int] = {}
    stages: list[tuple[str, list[int]]] = [(bound, _window(centre, lo, hi, window))]
    widened = 0
    while True:
        for v in stages[-1][1]:
            if v not in screened:
                screened[v] = screen(make(v))
        if confirm is None:
            pool = screened
        else:
            ranked = sorted(screened, key=lambda v: rank_key(screened[v], make(v), direction))
            for v in ranked[:confirm_top]:
                if v not in confirmed:
                    confirmed[v] = confirm(make(v))
            pool = confirmed or screened
        best = min(pool, key=lambda v: rank_key(pool[v], make(v), direction))
        vmin, vmax = min(screened), max(screened)
        if max_widen is not None and widened >= max_widen:
            break
        if best == vmax and vmax < hi:
            new = list(range(vmax + 1, min(hi, vmax + window) + 1))
        elif best == vmin and vmin > lo:
            new = list(range(max(lo, vmin - window), vmin))
        else:
            break
        if not new:
            break
        widened += 1
        stages.append((f"{bound}-widened", new))
    out = []
    for name, values in stages:
        rows = []
        for v in sorted(values, key=lambda v: len(make(v))):
            r = make(v)
            gen = screened[v] if confirm is None else confirmed.get(v)
            rows.append({"range": [r.start, r.end], "proxy_count": None if confirm is None else screened[v],
                         "count": gen, "confirmed": gen is not None})
        out.append({"stage": name, "bound": bound, "fixed": fixed, "rows": rows})
    chosen = make(best)
    for s in out:
        s["chosen"] = [chosen.start, chosen.end]
    return chosen, out


def search_alpha(sweep_counts: Callable[[float], list[int]], direction: str, step: float, max_steps: int,
                 threshold: float) -> tuple[float, list[dict], bool]:
    """The paper's alpha rule (A.3.4, see :data:`ALPHA_RULE`): returns (alpha, history, reached).

    ``sweep_counts(alpha)`` gives the counts of the upper-bound window sweep at ``alpha``.
    """
    history: list[dict] = []
    for k in range(1, max_steps + 1):
        alpha = round(1 + k * step if direction == "up" else 1 - k * step, 6)
        if alpha <= 0:
            break
        counts = [int(c) for c in sweep_counts(alpha)]
        std = sample_std(counts)
        history.append({"alpha": alpha, "std": std, "counts": counts, "threshold": threshold})
        if std >= threshold:
            return alpha, history, True
    if not history:
        raise SafetyLayersError(f"alpha_step {step} leaves no alpha in (0, 1) to try: use a smaller step")
    best = min(history, key=lambda h: (-h["std"], abs(h["alpha"] - 1)))
    return best["alpha"], history, False


# --------------------------------------------------------------------------- trials journal

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _trial_key(which: str, rng: LayerRange | None, alpha: float, method: str, setup: str) -> tuple:
    return (which, None if rng is None else (rng.start, rng.end), round(float(alpha), 6), method, setup)


class Journal:
    """``trials.jsonl``: one line per evaluated (set, range, alpha, method), read back on a rerun.

    A record counts only for the same ``setup`` (a hash of the model fingerprint, the prompts,
    template, components, judge and generation length), so a rerun with other settings in the
    same folder evaluates afresh instead of reusing counts that no longer apply.
    """

    def __init__(self, path: Path | None, w=None):
        from ..core.runs import read_jsonl

        self.path, self.w = path, w or world()
        records = (read_jsonl(path) if path is not None else []) if self.w.is_main else None
        self.records: dict[tuple, dict] = {}
        for rec in broadcast_from_main(records, self.w) or []:
            try:
                rng = None if rec["range"] is None else LayerRange.parse(rec["range"])
                self.records[_trial_key(rec["set"], rng, rec["alpha"], rec["method"], rec["setup"])] = rec
            except (KeyError, TypeError, ValueError, SafetyLayersError):
                continue

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def add(self, key: tuple, record: dict) -> None:
        from ..core.runs import append_jsonl

        self.records[key] = record
        if self.path is not None and self.w.is_main:
            append_jsonl(self.path, record)


# --------------------------------------------------------------------------- counting on the model

class Evaluator:
    """Counts refusals of one prompt set on the model with a band scaled, journaled and sharded.

    ``refusals`` (generation + judge) returns per-prompt verdicts, ``scores`` (first-token
    proxy) per-prompt refusal mass; both are read from the journal when present. ``fresh``
    counts the evaluations actually run, by method.
    """

    def __init__(self, lm, cfg: LocateConfig, sets: dict, judge, journal: Journal, bar=None, w=None):
        from ..engine.generation import GenerationSettings
        from ..core.prompts import resolve_template

        self.lm, self.cfg, self.sets, self.judge, self.journal, self.bar = lm, cfg, sets, judge, journal, bar
        self.w = w or world()
        self.template = resolve_template(lm.tokenizer, cfg.template)
        self.settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        self.proxy = None
        self.threshold: float | None = None
        self.fresh = {"proxy": 0, "generation": 0}
        self.loaded = set(journal.records)  # read from an earlier run's journal
        self.reused: set[tuple] = set()
        self.seconds = {"proxy": 0.0, "generation": 0.0}
        base = {"model": lm.fingerprint(), "template": self.template, "components": cfg.components}
        self.setups = {}
        for which, ps in sets.items():
            common = {**base, "prompts": _digest(ps.prompts)}
            self.setups[(which, "generation")] = _digest({**common, "judge": judge.config(),
                                                          "max_new_tokens": cfg.max_new_tokens})
            self.setups[(which, "proxy")] = _digest({**common, "proxy": "first-token-v1"})
        self.texts: dict[tuple, list[str]] = {}

    def _proxy(self):
        if self.proxy is None:
            from ..judges.proxy import FirstTokenProxy

            self.proxy = FirstTokenProxy(self.lm, template=self.cfg.template, batch_size=self.cfg.batch_size or 128)
        return self.proxy

    def key(self, which: str, rng: LayerRange | None, alpha: float, method: str) -> tuple:
        return _trial_key(which, rng, alpha if rng is not None else 1.0, method, self.setups[(which, method)])

    def _run(self, which, rng, alpha, method, compute) -> dict:
        key = self.key(which, rng, alpha, method)
        rec = self.journal.get(key)
        if rec is not None:
            if key in self.loaded:
                self.reused.add(key)
            return rec
        from ..core.scaling import scaled_layers

        if self.bar is not None:
            self.bar.set_postfix_str(f"{which} {rng or 'unscaled'} x{alpha:g} {method}")
        t = time.perf_counter()
        if rng is None:
            data = compute()
        else:
            with scaled_layers(self.lm, rng, alpha, self.cfg.components):
                data = compute()
        sec = time.perf_counter() - t
        self.seconds[method] += sec
        self.fresh[method] += 1
        n = len(self.sets[which].prompts)
        rec = {"set": which, "range": None if rng is None else [rng.start, rng.end], "alpha": key[2],
               "method": method, "n": n, "seconds": round(sec, 3), "setup": key[4], **data}
        self.journal.add(key, rec)
        if self.bar is not None:
            self.bar.update(1)
        return rec

    def refusals(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> list[bool]:
        """Per-prompt refused verdicts of generation + judge."""
        from ..evaluate.run import generate_all

        prompts = self.sets[which].prompts

        def compute():
            comps = generate_all(self.lm, prompts, self.settings, template=self.cfg.template, cache=self.cfg.cache,
                                 progress=False)
            texts = [c.text for c in comps]
            self.texts[self.key(which, rng, alpha, "generation")] = texts
            refused = run_on_main(lambda: [bool(v.refused and not v.error) for v in self.judge.judge(prompts, texts)],
                                  self.w)
            return {"count": sum(refused), "refused": "".join("1" if r else "0" for r in refused)}

        rec = self._run(which, rng, alpha, "generation", compute)
        return [c == "1" for c in rec["refused"]]

    def count(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> int:
        return sum(self.refusals(which, rng, alpha))

    def scores(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> np.ndarray:
        """Per-prompt first-token refusal mass."""
        prompts = self.sets[which].prompts
        proxy = self._proxy()

        def compute():
            s = map_sharded(lambda shard: proxy.scores(shard).tolist(), prompts, self.w)
            thr = self.threshold  # None while calibrating; counts are always recomputed from the scores
            return {"count": None if thr is None else int(sum(x >= thr for x in s)), "threshold": thr, "scores": s}

        rec = self._run(which, rng, alpha, "proxy", compute)
        return np.asarray(rec["scores"], dtype=np.float64)

    def proxy_count(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> int:
        if self.threshold is None:
            raise RuntimeError("proxy threshold not calibrated")
        return int((self.scores(which, rng, alpha) >= self.threshold).sum())

    def journal_counts(self, which: str, method: str) -> dict[tuple, int]:
        """(range, alpha) -> count of every journaled trial of this set and method (current setup)."""
        setup = self.setups[(which, method)]
        out = {}
        for key, rec in self.journal.records.items():
            if key[0] == which and key[3] == method and key[4] == setup:
                if method == "proxy":
                    out[(key[1], key[2])] = int((np.asarray(rec["scores"]) >= self.threshold).sum())
                else:
                    out[(key[1], key[2])] = int(rec["count"])
        return out


# --------------------------------------------------------------------------- the locate step

def _prompt_set(spec, limit, what: str):
    from ..core.data import load_prompts

    ps = load_prompts(spec, limit)
    if len(ps) == 0:
        raise SafetyLayersError(f"the {what} set {ps.name!r} is empty: give a set with at least one prompt")
    return ps


def _init_from_analyze(lm, cfg: LocateConfig, journal: Journal, run_dir: Path | None, w) -> LayerRange:
    """The initial range of :func:`analysis.analyze` on the built-in normal/malicious sets (journaled)."""
    from ..analysis.run import AnalyzeConfig, analyze

    acfg = AnalyzeConfig(model=lm.name, limit=cfg.limit, template=cfg.template, bootstrap=0, probe=False,
                         seed=cfg.seed, paper=cfg.paper, progress=cfg.progress and w.is_main)
    setup = _digest({"model": lm.fingerprint(), "limit": cfg.limit, "template": acfg.template,
                     "range_curve": acfg.range_curve, "seed": cfg.seed})
    key = ("analyze", None, 1.0, "analyze", setup)
    rec = journal.get(key)
    if rec is None:
        def run():
            res = analyze(acfg, model=lm, run_dir=(run_dir / "analysis") if run_dir is not None else None)
            if res.initial_range is None:
                raise SafetyLayersError("analyze found no initial safety-layer range on this model (no gap between "
                                        "normal and malicious prompts rises out of the early layers): "
                                        "pass --init START-END")
            return res.initial_range

        found = run_on_main(run, w)
        rec = {"set": "analyze", "range": list(found), "alpha": 1.0, "method": "analyze", "setup": setup}
        journal.add(key, rec)
    return LayerRange.parse(rec["range"]).check(lm.num_layers)


def _calibrate(ev: Evaluator, has_malicious: bool, notes: list[str]) -> dict | None:
    """Threshold of the first-token proxy against generation + judge on the unscaled model."""
    import warnings

    from ..judges.proxy import choose_threshold

    sets = ["over-rejection"] + (["malicious"] if has_malicious else [])
    scores = np.concatenate([ev.scores(s, None) for s in sets])
    refused = [r for s in sets for r in ev.refusals(s, None)]
    n_ref = sum(refused)
    proxy = ev._proxy()
    info = {"calibrated_on": sets, "n": len(refused), "n_refused": n_ref, "tokens": proxy.tokens, "rule": PROXY_RULE}
    if n_ref == 0 or n_ref == len(refused):
        notes.append(f"the unscaled model refuses {n_ref} of the {len(refused)} calibration prompts "
                     f"({' + '.join(sets)}), so the first-token proxy cannot be calibrated: every candidate is "
                     "counted by generation + judge")
        return {**info, "threshold": None, "used": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = choose_threshold(scores, refused)
    ev.threshold = cal.threshold
    return {**info, "threshold": cal.threshold, "balanced_accuracy": cal.value, "agreement": cal.agreement,
            "used": True}


def _table(sweeps: list[dict], direction: str) -> str:
    """One line per sweep in the style of the paper's Table 1; ``~`` marks a proxy estimate, ``**`` the choice."""
    names = {"upper": "Upper bound", "lower": "Lower bound"}
    lines = []
    for s in sweeps:
        cells = []
        for r in s["rows"]:
            value = f"{r['count']}" if r["confirmed"] else f"~{r['proxy_count']}"
            cell = f"[{r['range'][0]},{r['range'][1]}] {value}"
            cells.append(f"**{cell}**" if r["range"] == s["chosen"] else cell)
        label = names.get(s["stage"], s["stage"].replace("-", " "))
        other = "lower" if s["bound"] == "upper" else "upper"
        lines.append(f"{label} ({other} fixed at {s['fixed']}, {'argmax' if direction == 'up' else 'argmin'}): "
                     + " · ".join(cells))
    return "\n".join(lines)


def locate(cfg: LocateConfig | None = None, model=None, run_dir: str | Path | None = None) -> LocateResult:
    """Find the safety layers; with ``run_dir``, write (and resume from) the run folder.

    ``model``: a loaded model to reuse (else ``cfg.model`` is loaded). The model's weights are
    scaled in place during each count and restored bit-identically after it, also on error.
    """
    from tqdm.auto import tqdm

    from ..core.models import load_or_use
    from ..core.runs import environment, write_json

    cfg = cfg or LocateConfig()
    w = world()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    over = _prompt_set(cfg.over_rejection, cfg.limit, "over-rejection")
    mal = _prompt_set(cfg.malicious, cfg.limit, "malicious") if cfg.malicious else None
    from ..judges.factory import build_judge

    judge = build_judge(cfg.judge)
    init = LayerRange.parse(cfg.init) if cfg.init else None
    lm = load_or_use(model if model is not None else cfg.model)
    num_layers = lm.num_layers
    if init is not None:
        init.check(num_layers)
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and w.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg)
        write_json(run_dir / "env.json", {**environment(), "model": lm.name, "model_fingerprint": lm.fingerprint(),
                                          "over_rejection_source": over.source,
                                          "malicious_source": mal.source if mal else None, "processes": w.size})
    journal = Journal(run_dir / "trials.jsonl" if run_dir is not None else None, w)
    sets = {"over-rejection": over, **({"malicious": mal} if mal else {})}
    bar = tqdm(desc="locate", unit="count", disable=not (cfg.progress and w.is_main), dynamic_ncols=True)
    ev = Evaluator(lm, cfg, sets, judge, journal, bar, w)
    n = len(over)
    try:
        # 1. initial range
        t = time.perf_counter()
        if init is None:
            init, init_source = _init_from_analyze(lm, cfg, journal, run_dir, w), "analyze"
        else:
            init_source = "user"
        seconds["analyze"] = round(time.perf_counter() - t, 3)

        # 2. baseline and proxy calibration
        t = time.perf_counter()
        screen = cfg.screen
        proxy_info = None
        if screen == "proxy":
            proxy_info = _calibrate(ev, mal is not None, notes)
            if not proxy_info["used"]:
                screen = "generation"
        baseline = {"count": ev.count("over-rejection", None),
                    "proxy_count": ev.proxy_count("over-rejection", None) if screen == "proxy" else None}
        seconds["calibrate"] = round(time.perf_counter() - t, 3)

        def screen_fn(method):
            if method == "proxy":
                return lambda rng, a: ev.proxy_count("over-rejection", rng, a)
            return lambda rng, a: ev.count("over-rejection", rng, a)

        def window_counts(method, alpha):
            return [screen_fn(method)(LayerRange(init.start, e), alpha)
                    for e in _window(init.end, init.start, num_layers - 1, cfg.window)]

        # 3. alpha
        t = time.perf_counter()
        threshold = cfg.std_threshold if cfg.std_threshold is not None else PAPER_STD_SHARE * n

        def find_alpha(method):
            if cfg.alpha is not None:
                counts = window_counts(method, cfg.alpha)
                std = sample_std(counts)
                return cfg.alpha, [{"alpha": cfg.alpha, "std": std, "counts": counts, "threshold": threshold,
                                    "method": method}], None
            a, hist, ok = search_alpha(lambda x: window_counts(method, x), cfg.direction, cfg.alpha_step,
                                       cfg.max_alpha_steps, threshold)
            return a, [{**h, "method": method} for h in hist], ok

        alpha, alpha_search, reached = find_alpha(screen)
        if screen == "proxy" and len({c for h in alpha_search for c in h["counts"]} | {baseline["proxy_count"]}) == 1:
            notes.append(f"the proxy gives {baseline['proxy_count']} refusals for every range and alpha tried, so it "
                         "cannot rank them: every candidate is counted by generation + judge instead")
            screen = "generation"
            alpha, more, reached = find_alpha(screen)
            alpha_search += more
        gen_seen = [baseline["count"]] + [c for h in alpha_search if h["method"] == "generation" for c in h["counts"]]
        if screen == "generation" and len(set(gen_seen)) == 1 and gen_seen[0] in (0, n):
            tried = sorted({h["alpha"] for h in alpha_search})
            what = "none" if gen_seen[0] == 0 else "all"
            other = "down" if cfg.direction == "up" else "up"
            raise SafetyLayersError(
                f"the model refuses {what} of the {n} over-rejection prompts, unscaled and with "
                f"{init.start}-{init.end}±{cfg.window} scaled by alpha {', '.join(f'{a:g}' for a in tried)}: no range "
                f"stands out, so any band would be meaningless; try --direction {other} (alpha on the other side of 1) "
                "or a larger --over-rejection set")
        if reached is False:
            best = next(h for h in alpha_search if h["alpha"] == alpha and h["method"] == screen)
            notes.append(f"no alpha up to {alpha_search[-1]['alpha']:g} made the sweep's std reach {threshold:.2f} "
                         f"refusals; using alpha {alpha:g}, whose std {best['std']:.2f} was the largest")
        seconds["alpha_search"] = round(time.perf_counter() - t, 3)

        # 4. sweeps
        t = time.perf_counter()
        scr = screen_fn(screen)
        conf = (lambda rng: ev.count("over-rejection", rng, alpha)) if screen == "proxy" else None
        common = dict(direction=cfg.direction, window=cfg.window, screen=lambda rng: scr(rng, alpha), confirm=conf,
                      confirm_top=cfg.confirm_top, max_widen=cfg.max_widen)
        upper, s_upper = sweep_bound("upper", init.start, init.end, num_layers, **common)
        band, s_lower = sweep_bound("lower", upper.end, init.start, num_layers, **common)
        sweeps = s_upper + s_lower
        for s in sweeps:
            s["std"] = sample_std([r["count"] if screen == "generation" else r["proxy_count"] for r in s["rows"]])
        count = ev.count("over-rejection", band, alpha)
        band_proxy = ev.proxy_count("over-rejection", band, alpha) if screen == "proxy" else None
        seconds["sweeps"] = round(time.perf_counter() - t, 3)
        if count == baseline["count"]:
            notes.append(f"the found band {band} at alpha {alpha:g} refuses as often as the unscaled model "
                         f"({count} of {n}): the evidence for it is weak")

        # 5. proxy vs generation
        spearman = {"rho": None, "n": 0}
        if screen == "proxy" or (proxy_info and proxy_info["used"]):
            from ..core.stats import spearman as rank_corr

            gen, prox = ev.journal_counts("over-rejection", "generation"), ev.journal_counts("over-rejection", "proxy")
            both = sorted(set(gen) & set(prox), key=str)
            rho = rank_corr([prox[k] for k in both], [gen[k] for k in both]) if len(both) >= 2 else float("nan")
            spearman = {"rho": None if math.isnan(rho) else round(rho, 4), "n": len(both)}

        # 6. sanity check on the malicious set
        t = time.perf_counter()
        sanity = None
        if mal is not None:
            down, up = (parse_sanity_alphas(cfg.sanity_alphas) if cfg.sanity_alphas
                        else tuple(sorted((alpha, mirror_alpha(alpha)))))
            m = len(mal)

            def rate(rng, a):
                return 1.0 - ev.count("malicious", rng, a) / m

            base_rate, down_rate, up_rate = rate(None, 1.0), rate(band, down), rate(band, up)
            sanity = {"malicious": mal.name, "n": m, "band": [band.start, band.end], "judge": cfg.judge,
                      "baseline_harmful_rate": base_rate, "down": {"alpha": down, "harmful_rate": down_rate},
                      "up": {"alpha": up, "harmful_rate": up_rate},
                      "passed": bool(down_rate > base_rate and up_rate < base_rate)}
            if base_rate in (0.0, 1.0):
                notes.append(f"the unscaled model's harmful rate on {mal.name} is {base_rate:.0%}, so the sanity check "
                             "cannot move both ways; use a set the model partly answers")
        seconds["sanity"] = round(time.perf_counter() - t, 3)
    finally:
        bar.close()

    seconds["proxy_total"] = round(ev.seconds["proxy"], 3)
    seconds["generation_total"] = round(ev.seconds["generation"], 3)
    seconds["total"] = round(time.perf_counter() - t_start, 3)
    result = LocateResult(
        model=lm.name, num_layers=num_layers, over_rejection=over.name, n_prompts=n, template=ev.template,
        judge=cfg.judge, components=cfg.components, screen=screen, direction=cfg.direction, alpha=float(alpha),
        alpha_source="given" if cfg.alpha is not None else "search", alpha_reached=reached, std_threshold=threshold,
        baseline=baseline, init_range=[init.start, init.end], init_source=init_source, alpha_search=alpha_search,
        sweeps=sweeps, safety_layers=[band.start, band.end], range=[band.start, band.end], count=count,
        proxy_count=band_proxy, table=_table(sweeps, cfg.direction), proxy=proxy_info,
        proxy_generation_spearman=spearman, sanity=sanity,
        rules={"alpha": ALPHA_RULE, "ties": TIE_RULE, "edges": EDGE_RULE, "proxy": PROXY_RULE,
               "std": "sample standard deviation (ddof=1) of the screening counts"},
        evaluations={**ev.fresh, "reused": len(ev.reused)}, notes=notes, seconds=seconds)
    if run_dir is not None and w.is_main:
        _write_samples(ev, run_dir, band, alpha, sanity)
        plot_sweeps(result, run_dir / "sweeps.png")
        write_json(run_dir / "result.json", result)
    return result


def _write_samples(ev: Evaluator, run_dir: Path, band: LayerRange, alpha: float, sanity: dict | None) -> None:
    """Completions behind the headline numbers (unscaled and found band; sanity runs) in ``samples.jsonl``.

    Texts are taken from this run's memory, or from the generation cache on a resumed run.
    """
    from ..engine.generation import generate
    from ..core.runs import atomic_write

    wanted = [("over-rejection", None, 1.0), ("over-rejection", band, alpha)]
    if sanity is not None:
        wanted += [("malicious", None, 1.0), ("malicious", band, sanity["down"]["alpha"]),
                   ("malicious", band, sanity["up"]["alpha"])]
    lines = []
    for which, rng, a in wanted:
        prompts = ev.sets[which].prompts
        key = ev.key(which, rng, a, "generation")
        texts = ev.texts.get(key)
        if texts is None:
            if not ev.cfg.cache:
                continue
            from ..core.scaling import scaled_layers

            if rng is None:
                texts = [c.text for c in generate(ev.lm, prompts, ev.settings, template=ev.cfg.template,
                                                  progress=False)]
            else:
                with scaled_layers(ev.lm, rng, a, ev.cfg.components):
                    texts = [c.text for c in generate(ev.lm, prompts, ev.settings, template=ev.cfg.template,
                                                      progress=False)]
        refused = ev.refusals(which, rng, a)
        for p, text, r in zip(prompts, texts, refused):
            lines.append(json.dumps({"set": which, "range": None if rng is None else [rng.start, rng.end],
                                     "alpha": a if rng is not None else 1.0, "prompt": p, "completion": text,
                                     "refused": r}, ensure_ascii=False))
    atomic_write(run_dir / "samples.jsonl", "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------- figure and console

def plot_sweeps(result: LocateResult, path: str | Path) -> Path:
    """Counts along each bound's sweep (proxy and generation), the baseline, the choice; the alpha search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["upper", "lower"] + (["alpha"] if result.alpha_search else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, bound in zip(axes, panels):
        if bound == "alpha":
            for method in dict.fromkeys(h["method"] for h in result.alpha_search):
                hs = [h for h in result.alpha_search if h["method"] == method]
                ax.plot([h["alpha"] for h in hs], [h["std"] for h in hs], "o-", label=f"sweep std ({method})")
            ax.axhline(result.std_threshold, color="tab:red", ls="--", label=f"threshold {result.std_threshold:.2f}")
            ax.axvline(result.alpha, color="black", alpha=0.3, label=f"alpha {result.alpha:g}")
            ax.set_xlabel("alpha")
            ax.set_ylabel("sample std of refusal counts")
            ax.set_title("alpha search")
            ax.legend(fontsize=8)
            continue
        rows = sorted((r for s in result.sweeps if s["bound"] == bound for r in s["rows"]),
                      key=lambda r: r["range"][1] if bound == "upper" else r["range"][0])
        pos = 1 if bound == "upper" else 0
        x = [r["range"][pos] for r in rows]
        if any(r["proxy_count"] is not None for r in rows):
            ax.plot(x, [r["proxy_count"] for r in rows], "o--", color="tab:blue", label="first-token proxy")
        conf = [r for r in rows if r["confirmed"]]
        ax.plot([r["range"][pos] for r in conf], [r["count"] for r in conf], "s-" if len(conf) > 1 else "s",
                color="tab:orange", label=f"generation + {result.judge}")
        ax.axhline(result.baseline["count"], color="gray", ls=":", label=f"unscaled ({result.baseline['count']})")
        chosen = [s["chosen"] for s in result.sweeps if s["bound"] == bound]
        if chosen:
            ax.axvline(chosen[0][pos], color="tab:red", alpha=0.3, label=f"chosen {chosen[0][0]}-{chosen[0][1]}")
        fixed = [s["fixed"] for s in result.sweeps if s["bound"] == bound]
        other = "lower" if bound == "upper" else "upper"
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"{bound} bound ({other} fixed at {fixed[0] if fixed else '?'})")
        ax.set_ylabel(f"refusals of {result.n_prompts}")
        rule = "argmax" if result.direction == "up" else "argmin"
        ax.set_title(f"{bound}-bound sweep, alpha {result.alpha:g} ({rule})")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.model}: safety layers {result.safety_layers[0]}-{result.safety_layers[1]}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
