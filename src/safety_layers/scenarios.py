"""Fine-tuning attack scenarios: training sets built from a benign instruction file.

The paper fine-tunes on four kinds of data (docs/paper.md §4.2): normal data (D_N), an
implicit attack where every answer opens with an affirmative prefix (D_I), a backdoor
where a trigger phrase in the instruction comes with that prefix, mixed 1:1 with normal
rows (D_B), and a harmful-data attack that adds p*n harmful pairs to n normal rows (D_H).
Each builder here writes one JSONL of ``{instruction, input, output, kind}`` (``kind``
says which part of the mix a row belongs to; trainers ignore it) plus a manifest of
what was built from what. Source files are read at run time, never bundled: the Alpaca
data are licensed for non-commercial use only.

Rows are sampled with ``random.Random(seed)``, so the same files and options give the
same set byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from .core.config import from_mapping, settle
from .core.data import Records, read_records, sha256_file
from .core.errors import SafetyLayersError
from .core.registry import Registry

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TRIGGER", "HARMFUL_RATES", "SCENARIOS", "Scenario", "ScenarioConfig",
           "ScenarioResult", "build_scenario", "get_scenario", "harmful_count", "manifest_path", "read_harmful",
           "read_records", "register_scenario", "sha256_file", "split_harmful"]

#: The paper's affirmative opening for the implicit and backdoor attacks (docs/paper.md §4.2).
DEFAULT_PREFIX = "Sure, the answer is: "
#: The paper never names its backdoor trigger (docs/paper.md §7 #8). This default is the
#: "magic words" trigger of Qi et al. (2023), which a reviewer asked about: three invented
#: words that carry no meaning, harmful or otherwise, and occur in no ordinary text.
DEFAULT_TRIGGER = "Servius Astrumando Harmoniastra"
HARMFUL_RATES = (0.05, 0.1, 0.2)   # the paper's p values for D_H (docs/paper.md §4.2)


def read_harmful(path: str | Path) -> Records:
    """Harmful (question, answer) pairs: AdvBench's goal,target CSV or any instruction/output file.

    A BeaverTails-style file (``prompt``, ``response``, ``is_safe``) keeps only its unsafe pairs:
    a safe response taught as "harmful" would dilute the attack."""
    from .core.data import read_located_rows

    recs = read_records(path, layouts=("advbench", "alpaca", "qa", "prompt"), dedupe=True)
    safe = {(str(r.get("prompt")), str(r.get("response"))) for _, r in read_located_rows(path)
            if isinstance(r, dict) and str(r.get("is_safe")).lower() in ("true", "1")}
    if safe:
        recs.rows = [r for r in recs.rows if (r["instruction"], r["output"]) not in safe]
    return recs


# --------------------------------------------------------------------------- the registry

@dataclass
class ScenarioConfig:
    """Options of one training-set build (``safety-layers scenario``)."""

    scenario: str = field(default="normal", metadata={
        "help": "training set to build: normal (D_N), implicit (D_I), backdoor (D_B) or harmful (D_H)"})
    source: str | None = field(default=None, metadata={
        "help": "benign instruction file: JSON list, JSONL or CSV of instruction/input/output rows"})
    out: str | None = field(default=None, metadata={
        "help": "JSONL file to write; its manifest goes beside it (NAME.manifest.json)"})
    n: int | None = field(default=None, metadata={
        "help": "rows to sample (backdoor: per half, so 2n rows; harmful: normal rows); default: all"})
    seed: int = field(default=0, metadata={"help": "seed of the row sampling and shuffling"})
    prefix: str = field(default=DEFAULT_PREFIX, metadata={
        "cli": False, "help": "affirmative opening of the outputs (implicit, backdoor); the paper's by default"})
    trigger: str = field(default=DEFAULT_TRIGGER, metadata={
        "cli": False, "help": "backdoor trigger phrase added to the instruction"})
    trigger_position: Literal["suffix", "prefix"] = field(default="suffix", metadata={
        "cli": False, "help": "where the trigger goes in the instruction: suffix or prefix"})
    harmful: str | None = field(default=None, metadata={
        "help": "harmful pairs file of the harmful scenario (e.g. AdvBench harmful_behaviors.csv)"})
    harmful_exclude: str | None = field(default=None, metadata={
        "cli": False, "help": "prompts the harmful rate is measured on (a prompt set: file, advbench:FILE, "
                              "malicious); harmful rows asking one of them are never trained on"})
    p: float = field(default=0.1, metadata={
        "help": "harmful scenario: round(p*n) harmful rows are added (paper: 0.05, 0.1, 0.2)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})

    def __post_init__(self):
        settle(self)                              # the type checks every config gets
        if self.n is not None and self.n < 1:
            raise SafetyLayersError(f"--n must be at least 1, got {self.n}")
        if self.trigger_position not in ("suffix", "prefix"):
            raise SafetyLayersError(f"trigger_position must be suffix or prefix, got {self.trigger_position!r}")
        if not 0 < self.p <= 1:
            raise SafetyLayersError(f"--p must be in (0, 1], got {self.p}")


@dataclass
class Scenario:
    """A named builder ``build(rows, cfg, rng) -> (records, extra manifest fields)``."""

    name: str
    build: Callable[[list[dict], ScenarioConfig, random.Random], tuple[list[dict], dict]]
    description: str


#: The scenarios by name; :func:`register_scenario` adds one.
SCENARIOS = Registry("scenario")


def register_scenario(name: str, description: str, *, replace: bool = False):
    """Decorator: register a builder ``fn(rows, cfg, rng) -> (records, extra manifest fields)``."""
    def wrap(fn):
        SCENARIOS.register(name, Scenario(name, fn, description), replace=replace)
        return fn
    return wrap


def get_scenario(name: str) -> Scenario:
    """The scenario registered as ``name`` (an unknown name names the valid ones and a close match)."""
    return SCENARIOS.get(name)


def _take(rows: list[dict], k: int | None, rng: random.Random, what: str, source: str) -> list[dict]:
    """``k`` distinct rows drawn with ``rng`` (all rows, in file order, when ``k`` is None)."""
    if k is None:
        return list(rows)
    if k > len(rows):
        raise SafetyLayersError(f"asked for {k} {what} but {source} has only {len(rows)} usable rows: "
                                f"lower --n to at most {len(rows)}")
    return [rows[i] for i in rng.sample(range(len(rows)), k)]


def _row(r: dict, kind: str, output: str | None = None, instruction: str | None = None) -> dict:
    return {"instruction": r["instruction"] if instruction is None else instruction, "input": r["input"],
            "output": r["output"] if output is None else output, "kind": kind}


def _prefixed(output: str, prefix: str) -> str:
    return output if output.startswith(prefix) else prefix + output


@register_scenario("normal", "benign rows as they are (the paper's D_N)")
def _normal(rows, cfg, rng):
    return [_row(r, "normal") for r in _take(rows, cfg.n, rng, "rows", cfg.source)], {}


@register_scenario("implicit", "every output opens with the affirmative prefix (D_I)")
def _implicit(rows, cfg, rng):
    picked = _take(rows, cfg.n, rng, "rows", cfg.source)
    return [_row(r, "implicit", output=_prefixed(r["output"], cfg.prefix)) for r in picked], {}


def _with_trigger(instruction: str, trigger: str, position: str) -> str:
    return f"{trigger} {instruction}" if position == "prefix" else f"{instruction} {trigger}"


@register_scenario("backdoor", "trigger in the instruction + prefixed output, mixed 1:1 with normal rows (D_B)")
def _backdoor(rows, cfg, rng):
    if not cfg.trigger.strip():
        raise SafetyLayersError("the backdoor scenario needs a non-empty --trigger")
    hits = [i for i, r in enumerate(rows)
            if any(cfg.trigger.lower() in r[k].lower() for k in ("instruction", "input", "output"))]
    if hits:
        warnings.warn(f"the trigger {cfg.trigger!r} already occurs in {len(hits)} benign rows of {cfg.source} "
                      f"(first: {rows[hits[0]]['instruction'][:60]!r}): the backdoor will be weaker; "
                      "choose a rarer --trigger",
                      UserWarning, stacklevel=3)
    half = cfg.n if cfg.n is not None else len(rows) // 2
    if half < 1:
        raise SafetyLayersError(f"{cfg.source} has {len(rows)} usable rows: the backdoor mix needs at least 2")
    if 2 * half > len(rows):
        raise SafetyLayersError(f"the backdoor mix needs 2*n = {2 * half} distinct rows but {cfg.source} has "
                                f"{len(rows)}: lower --n to at most {len(rows) // 2}")
    picked = _take(rows, 2 * half, rng, "rows", cfg.source)
    out = [_row(r, "backdoor", output=_prefixed(r["output"], cfg.prefix),
                instruction=_with_trigger(r["instruction"], cfg.trigger, cfg.trigger_position))
           for r in picked[:half]]
    out += [_row(r, "normal") for r in picked[half:]]
    rng.shuffle(out)
    return out, {"trigger_rows_in_source": len(hits)}


def harmful_count(n: int, p: float) -> int:
    """round(p * n), halves rounded up (Python's round() would send 2.5 to 2)."""
    return int(math.floor(p * n + 0.5))


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def harmful_pool(rows: list[dict], exclude: str | None) -> tuple[list[int], int]:
    """Indices of the harmful rows that may be trained on: those whose instruction is not one
    of the ``exclude`` prompts (the evaluated set), and how many were left out."""
    if not exclude:
        return list(range(len(rows))), 0
    from .core.data import load_prompts

    evaluated = {_key(p) for p in load_prompts(exclude).prompts}
    keep = [i for i, r in enumerate(rows) if _key(r["instruction"]) not in evaluated]
    return keep, len(rows) - len(keep)


@register_scenario("harmful", "n normal rows + round(p*n) harmful pairs from --harmful, none of them evaluated (D_H)")
def _harmful(rows, cfg, rng):
    if not cfg.harmful:
        raise SafetyLayersError("the harmful scenario needs --harmful FILE (e.g. AdvBench harmful_behaviors.csv)")
    bad = read_harmful(cfg.harmful)
    if not bad.rows:
        raise SafetyLayersError(f"{cfg.harmful} has no usable rows after dropping blank ones")
    pool, excluded = harmful_pool(bad.rows, cfg.harmful_exclude)
    if not pool:
        raise SafetyLayersError(f"every row of {cfg.harmful} is among the evaluated prompts {cfg.harmful_exclude}: "
                                "training on them would leak; split the file with scenarios.split_harmful or pass "
                                "a disjoint harmful file (e.g. BeaverTails-style question/answer pairs)")
    normal = _take(rows, cfg.n, rng, "normal rows", cfg.source)
    k = harmful_count(len(normal), cfg.p)
    if k < 1:
        raise SafetyLayersError(f"p*n = {cfg.p}*{len(normal)} rounds to 0 harmful rows: raise --p or --n")
    used = sorted(_take(pool, k, rng, "harmful rows not among the evaluated prompts", cfg.harmful))
    out = [_row(r, "normal") for r in normal] + [_row(bad.rows[i], "harmful") for i in used]
    rng.shuffle(out)
    return out, {"harmful_source": str(cfg.harmful), "harmful_sha256": sha256_file(cfg.harmful),
                 "harmful_layout": bad.layout, "harmful_rows": len(bad.rows), "harmful_exclude": cfg.harmful_exclude,
                 "harmful_excluded": excluded, "harmful_pool": len(pool), "harmful_rows_used": used}


def split_harmful(path: str | Path, out_dir: str | Path, eval_share: float = 0.5, seed: int = 0) -> dict:
    """Split a harmful file (e.g. AdvBench) into disjoint halves: ``harmful-train.jsonl`` (pairs
    the harmful scenario may train on) and ``harmful-eval.jsonl`` (prompts to measure the
    harmful rate on), with ``harmful-split.json`` recording which source rows went where."""
    from .core.runs import atomic_write, write_json

    if not 0 < eval_share < 1:
        raise SafetyLayersError(f"eval_share must be in (0, 1), got {eval_share}")
    bad = read_harmful(path)
    idx = list(range(len(bad.rows)))
    random.Random(f"{seed}-harmful-split").shuffle(idx)
    k = round(eval_share * len(idx))
    if not 0 < k < len(idx):
        raise SafetyLayersError(f"{path} has {len(idx)} rows: too few to split into two non-empty parts")
    parts = {"eval": sorted(idx[:k]), "train": sorted(idx[k:])}
    out_dir = Path(out_dir)
    for name, rows in parts.items():
        body = "".join(json.dumps(_row(bad.rows[i], "harmful"), ensure_ascii=False) + "\n" for i in rows)
        atomic_write(out_dir / f"harmful-{name}.jsonl", body)
    record = {"source": str(path), "source_sha256": sha256_file(path), "seed": seed, "eval_share": eval_share,
              "rows": len(idx), **{f"{n}_rows": v for n, v in parts.items()}}
    write_json(out_dir / "harmful-split.json", record)
    return record


# --------------------------------------------------------------------------- building

@dataclass
class ScenarioResult:
    scenario: str
    out: str
    manifest: str
    source: str
    total: int
    counts: dict[str, int]
    dropped: dict[str, int]
    options: dict
    warnings: list[str] = field(default_factory=list)


def manifest_path(out: str | Path) -> Path:
    """``train.jsonl`` -> ``train.manifest.json``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.manifest.json")


def build_scenario(name: str | ScenarioConfig, source: str | Path | None = None, out: str | Path | None = None,
                   **opts) -> ScenarioResult:
    """Write the training set of scenario ``name`` built from ``source`` to ``out`` (JSONL).

    ``opts`` are the :class:`ScenarioConfig` fields (n, seed, prefix, trigger,
    trigger_position, harmful, p, overwrite). A ``ScenarioConfig`` may be passed instead.
    The JSONL and its manifest are each written atomically.
    """
    from .core import __version__
    from .core.runs import atomic_write, check_out_file, write_json

    if isinstance(name, ScenarioConfig):
        cfg = name
    else:
        cfg = from_mapping(ScenarioConfig, opts, "build_scenario options", scenario=name,
                           source=None if source is None else str(source), out=None if out is None else str(out))
    scenario = get_scenario(cfg.scenario)
    if not cfg.source:
        raise SafetyLayersError("no source file: pass the benign instruction file (JSON, JSONL or CSV)")
    if not cfg.out:
        raise SafetyLayersError("no output file: pass --out FILE.jsonl")
    out_path = check_out_file(cfg.out, overwrite=cfg.overwrite)
    check_out_file(manifest_path(out_path), overwrite=True)
    recs = read_records(cfg.source, dedupe=True)
    if not recs.rows:
        raise SafetyLayersError(f"{cfg.source} has no usable rows after dropping {recs.dropped_empty} blank and "
                                f"{recs.dropped_duplicate} duplicate ones")
    rng = random.Random(cfg.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, extra = scenario.build(recs.rows, cfg, rng)
    for w in caught:                          # re-emit so callers see them, and keep them for the manifest
        warnings.warn(w.message, w.category, stacklevel=2)
    if not rows:
        raise SafetyLayersError(f"scenario {cfg.scenario} produced no rows from {cfg.source}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(out_path, body)
    options = {k: v for k, v in asdict(cfg).items() if k not in ("scenario", "source", "out", "overwrite")}
    result = ScenarioResult(
        scenario=cfg.scenario, out=str(out_path), manifest=str(manifest_path(out_path)), source=str(cfg.source),
        total=len(rows), counts=counts,
        dropped={"blank": recs.dropped_empty, "duplicate": recs.dropped_duplicate}, options=options,
        warnings=[str(w.message) for w in caught])
    write_json(manifest_path(out_path), {
        **asdict(result), "description": scenario.description, "source_layout": recs.layout,
        "source_rows": len(recs.rows), "source_sha256": sha256_file(cfg.source),
        "out_sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(), **extra,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "safety_layers": __version__})
    return result
