"""Fine-tuning attack scenarios: training sets built from a benign instruction file.

The paper fine-tunes on four kinds of data (paper.md §4.2): normal data (D_N), an
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

import csv
import difflib
import hashlib
import io
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from .core.errors import SafetyLayersError

#: The paper's affirmative opening for the implicit and backdoor attacks (paper.md §4.2).
DEFAULT_PREFIX = "Sure, the answer is: "
#: The paper never names its backdoor trigger (paper.md §7 #8). This default is the
#: "magic words" trigger of Qi et al. (2023), which a reviewer asked about: three invented
#: words that carry no meaning, harmful or otherwise, and occur in no ordinary text.
DEFAULT_TRIGGER = "Servius Astrumando Harmoniastra"
HARMFUL_RATES = (0.05, 0.1, 0.2)   # the paper's p values for D_H (paper.md §4.2)

#: Recognised row layouts: (instruction key, input key or None, output key).
LAYOUTS = {
    "alpaca": ("instruction", "input", "output"),
    "advbench": ("goal", None, "target"),       # AdvBench harmful_behaviors.csv: the answer is the target prefix
    "qa": ("question", None, "answer"),         # GSM8K and similar
    "prompt": ("prompt", None, "response"),
}


# --------------------------------------------------------------------------- reading

@dataclass
class Records:
    """Rows of one file in the common {instruction, input, output} form."""

    rows: list[dict]
    path: str
    layout: str
    dropped_empty: int = 0
    dropped_duplicate: int = 0


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _raw_rows(path: Path) -> list[tuple[str, object]]:
    """(location label, row) pairs from a JSON list, JSONL or CSV file."""
    if not path.is_file():
        raise SafetyLayersError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))   # keeps quoted newlines inside fields
        return [(f"line {reader.line_num}", row) for row in reader]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SafetyLayersError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): fix the file") from None
        return [(f"record {i} (0-based)", row) for i, row in enumerate(data)]
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SafetyLayersError(f"{path} line {i} is not valid JSON ({e.msg}): expected a JSON list or "
                                    "one JSON object per line") from None
    return out


def _detect_layout(path: Path, first: dict, allowed: tuple[str, ...]) -> str:
    for name in allowed:
        if LAYOUTS[name][0] in first:
            return name
    wanted = "; ".join("/".join(k for k in LAYOUTS[n] if k) for n in allowed)
    raise SafetyLayersError(f"{path}: first row has fields {', '.join(map(str, first)) or '(none)'}; "
                            f"expected {wanted}")


def read_records(path: str | Path, layouts: tuple[str, ...] = ("alpaca", "qa", "prompt"),
                 dedupe: bool = False) -> Records:
    """Read instruction/response rows, checking every row has the layout's fields.

    The layout is detected from the first row. A row that lacks a required field (or has
    it null) is an error naming the file, the row and the field; rows whose instruction or
    output is blank are dropped and counted, as are repeated (instruction, input) pairs
    when ``dedupe`` is set.
    """
    path = Path(path)
    raw = _raw_rows(path)
    if not raw:
        raise SafetyLayersError(f"{path} holds no rows: give a JSON list, JSONL or CSV of instruction/output rows")
    where0, first = raw[0]
    if not isinstance(first, dict):
        raise SafetyLayersError(f"{path} {where0} is a {type(first).__name__}, not an object with named fields")
    layout = _detect_layout(path, first, layouts)
    ik, xk, ok = LAYOUTS[layout]
    rows, empty, dup, seen = [], 0, 0, set()
    for where, row in raw:
        if not isinstance(row, dict):
            raise SafetyLayersError(f"{path} {where} is a {type(row).__name__}, not an object with named fields")
        for key in (ik, ok):
            if row.get(key) is None:
                raise SafetyLayersError(f"{path} {where} has no {key!r} field: every row needs "
                                        f"{ik!r} and {ok!r}" + (f" ({xk!r} is optional)" if xk else ""))
        instruction, output = str(row[ik]), str(row[ok])
        inp = "" if xk is None or row.get(xk) is None else str(row[xk])
        if not instruction.strip() or not output.strip():
            empty += 1
            continue
        if dedupe:
            key = (instruction.strip(), inp.strip())
            if key in seen:
                dup += 1
                continue
            seen.add(key)
        rows.append({"instruction": instruction, "input": inp, "output": output})
    return Records(rows, str(path), layout, empty, dup)


def read_harmful(path: str | Path) -> Records:
    """Harmful (question, answer) pairs: AdvBench's goal,target CSV or any instruction/output file."""
    return read_records(path, layouts=("advbench", "alpaca", "qa", "prompt"), dedupe=True)


# --------------------------------------------------------------------------- the registry

@dataclass
class ScenarioConfig:
    """Options of one training-set build (``safety-layers scenario``)."""

    scenario: str = "normal"                  # normal | implicit | backdoor | harmful
    source: str | None = None                 # benign instruction file (JSON list, JSONL or CSV)
    out: str | None = None                    # JSONL to write; the manifest goes beside it
    n: int | None = None                      # rows to sample (backdoor: per half; harmful: normal rows)
    seed: int = 0
    prefix: str = DEFAULT_PREFIX              # affirmative opening (implicit, backdoor)
    trigger: str = DEFAULT_TRIGGER            # backdoor trigger phrase
    trigger_position: str = "suffix"          # where the trigger goes in the instruction: suffix | prefix
    harmful: str | None = None                # harmful pairs file (harmful scenario), e.g. AdvBench CSV
    p: float = 0.1                            # harmful rows = round(p * n); the paper uses 0.05, 0.1, 0.2
    overwrite: bool = False

    def __post_init__(self):
        if self.n is not None and self.n < 1:
            raise SafetyLayersError(f"--n must be at least 1, got {self.n}")
        if self.trigger_position not in ("suffix", "prefix"):
            raise SafetyLayersError(f"--trigger-position must be suffix or prefix, got {self.trigger_position!r}")
        if not 0 < self.p <= 1:
            raise SafetyLayersError(f"--p must be in (0, 1], got {self.p}")


@dataclass
class Scenario:
    name: str
    build: Callable[[list[dict], ScenarioConfig, random.Random], tuple[list[dict], dict]]
    description: str


SCENARIOS: dict[str, Scenario] = {}


def register_scenario(name: str, description: str):
    """Register a builder ``fn(rows, cfg, rng) -> (records, extra manifest fields)``."""
    def wrap(fn):
        SCENARIOS[name] = Scenario(name, fn, description)
        return fn
    return wrap


def get_scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        close = difflib.get_close_matches(name, SCENARIOS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SafetyLayersError(f"unknown scenario {name!r}.{hint} Choose one of {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


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


@register_scenario("harmful", "n normal rows + round(p*n) harmful pairs from --harmful (D_H)")
def _harmful(rows, cfg, rng):
    if not cfg.harmful:
        raise SafetyLayersError("the harmful scenario needs --harmful FILE (e.g. AdvBench harmful_behaviors.csv)")
    bad = read_harmful(cfg.harmful)
    if not bad.rows:
        raise SafetyLayersError(f"{cfg.harmful} has no usable rows after dropping blank ones")
    normal = _take(rows, cfg.n, rng, "normal rows", cfg.source)
    k = harmful_count(len(normal), cfg.p)
    if k < 1:
        raise SafetyLayersError(f"p*n = {cfg.p}*{len(normal)} rounds to 0 harmful rows: raise --p or --n")
    harmful = _take(bad.rows, k, rng, "harmful rows", cfg.harmful)
    out = [_row(r, "normal") for r in normal] + [_row(r, "harmful") for r in harmful]
    rng.shuffle(out)
    return out, {"harmful_source": str(cfg.harmful), "harmful_sha256": sha256_file(cfg.harmful),
                 "harmful_layout": bad.layout}


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
    from . import __version__
    from .core.runs import atomic_write, write_json

    if isinstance(name, ScenarioConfig):
        cfg = name
    else:
        valid = {f.name for f in fields(ScenarioConfig)} - {"scenario", "source", "out"}
        unknown = sorted(set(opts) - valid)
        if unknown:
            raise SafetyLayersError(f"unknown scenario option(s) {', '.join(unknown)}: "
                                    f"valid are {', '.join(sorted(valid))}")
        cfg = ScenarioConfig(scenario=name, source=None if source is None else str(source),
                             out=None if out is None else str(out), **opts)
    scenario = get_scenario(cfg.scenario)
    if not cfg.source:
        raise SafetyLayersError("no source file: pass the benign instruction file (JSON, JSONL or CSV)")
    if not cfg.out:
        raise SafetyLayersError("no output file: pass --out FILE.jsonl")
    out_path = Path(cfg.out)
    if out_path.exists() and not cfg.overwrite:
        raise SafetyLayersError(f"{out_path} exists: choose another --out or pass --overwrite")
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
