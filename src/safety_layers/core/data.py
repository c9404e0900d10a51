"""Prompt sets: the package's own sets, files, Hugging Face datasets and benchmark presets.

A set is named by one string, so the CLI and the API take the same thing:

- a built-in name: ``normal``, ``malicious``, ``over-rejection`` (written by us, shipped);
- a file: ``prompts.csv``, ``data.json``, ``data.jsonl``, ``list.txt`` (``path.csv:column``
  picks a column; otherwise one of prompt / goal / instruction / question / text);
- a benchmark preset with its file: ``advbench:harmful_behaviors.csv``,
  ``xstest-safe:xstest_prompts.csv``, ``xstest-unsafe:xstest_prompts.csv``;
- a Hugging Face dataset: ``hf:org/name[:column]`` (needs internet).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import SafetyLayersError

BUILTIN = {"normal": "normal.jsonl", "malicious": "malicious.jsonl",
           "over-rejection": "over_rejection.jsonl"}
_ALIASES = {"over_rejection": "over-rejection", "overrejection": "over-rejection",
            "benign": "normal", "harmful": "malicious"}
PROMPT_COLUMNS = ("prompt", "goal", "instruction", "question", "query", "text", "behavior")
#: preset -> (column, row filter) for public benchmark layouts
PRESETS = {
    "advbench": ("goal", None),
    "xstest": ("prompt", None),
    "xstest-safe": ("prompt", ("label", "safe")),
    "xstest-unsafe": ("prompt", ("label", "unsafe")),
}


@dataclass
class PromptSet:
    """Prompts plus per-prompt metadata (category, label, ...) and where they came from."""

    name: str
    prompts: list[str]
    meta: list[dict] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int | None) -> "PromptSet":
        if n is None or n >= len(self):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], self.meta[:n], self.source)

    def require(self, n: int, what: str = "prompts") -> "PromptSet":
        if len(self) < n:
            raise SafetyLayersError(
                f"prompt set {self.name!r} has {len(self)} {what}; at least {n} are needed: "
                "use a larger set or a different column")
        return self


def _rows_from_file(path: Path) -> tuple[list[dict], list[str]]:
    """Rows as dicts and the column names, for csv/tsv/json/jsonl/txt files."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                return rows, list(reader.fieldnames or [])
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise SafetyLayersError(f"{path}: expected a JSON list of records (or one list inside an object)")
                data = lists[0]
            rows = data
        elif suffix in (".txt", ""):
            rows = [{"text": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise SafetyLayersError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .txt")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetyLayersError(f"{path} is not valid {suffix[1:].upper()}: {e}") from None
    rows = [r if isinstance(r, dict) else {"text": str(r)} for r in rows]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return rows, cols


def _pick(rows: list[dict], cols: list[str], column: str | None, where: str) -> str:
    if column:
        if column not in cols:
            raise SafetyLayersError(
                f"{where} has no column {column!r}; columns: {', '.join(cols) or '(none)'}")
        return column
    for c in PROMPT_COLUMNS:
        if c in cols:
            return c
    raise SafetyLayersError(
        f"{where}: cannot tell which column holds the prompts; pick one with {where}:COLUMN "
        f"(columns: {', '.join(cols) or '(none)'})")


def _from_rows(name, rows, cols, column, where, row_filter=None, input_column="input") -> PromptSet:
    col = _pick(rows, cols, column, where)
    if row_filter:
        key, value = row_filter
        rows = [r for r in rows if str(r.get(key, "")).strip() == value]
    prompts, meta = [], []
    for r in rows:
        text = r.get(col)
        if text is None or not str(text).strip():
            continue
        text = str(text).strip()
        extra = r.get(input_column) if col == "instruction" else None
        if extra:
            text = f"{text}\n\n{str(extra).strip()}"
        prompts.append(text)
        meta.append({k: v for k, v in r.items() if k != col and isinstance(v, (str, int, float, bool))})
    if not prompts:
        raise SafetyLayersError(f"{where}: no prompts found in column {col!r}")
    return PromptSet(name, prompts, meta, where)


def load_file(path: str | Path, column: str | None = None, name: str | None = None,
              preset: str | None = None) -> PromptSet:
    """Load prompts from a csv / tsv / json / jsonl / txt file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SafetyLayersError(f"prompt file not found: {path}")
    if path.stat().st_size == 0:
        raise SafetyLayersError(f"prompt file is empty: {path}")
    rows, cols = _rows_from_file(path)
    row_filter = None
    if preset:
        preset_col, row_filter = PRESETS[preset]
        column = column or preset_col
    return _from_rows(name or (f"{preset}" if preset else path.stem), rows, cols, column, str(path), row_filter)


def load_builtin(name: str) -> PromptSet:
    """One of the package's own prompt sets."""
    fname = BUILTIN[_ALIASES.get(name, name)]
    text = resources.files("safety_layers").joinpath("data", fname).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return PromptSet(_ALIASES.get(name, name), [r["prompt"] for r in rows],
                     [{k: v for k, v in r.items() if k != "prompt"} for r in rows], f"builtin:{fname}")


def load_hf(dataset_id: str, column: str | None = None, split: str = "train") -> PromptSet:
    """A Hugging Face dataset by id (needs internet or a local datasets cache)."""
    try:
        import datasets
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for "offline"
        raise SafetyLayersError(
            f"cannot load dataset {dataset_id!r} from the Hugging Face hub ({type(e).__name__}): "
            "download it where you have internet and pass the file instead") from None
    rows = [dict(r) for r in ds]
    return _from_rows(dataset_id, rows, list(ds.column_names), column, f"hf:{dataset_id}")


def load_prompts(spec: "str | PromptSet | list[str]", limit: int | None = None) -> PromptSet:
    """Resolve one prompt-set string (see module docstring) into a :class:`PromptSet`."""
    if isinstance(spec, PromptSet):
        return spec.head(limit)
    if isinstance(spec, list):
        return PromptSet("inline", [str(p) for p in spec], [{} for _ in spec], "inline").head(limit)
    spec = str(spec).strip()
    if _ALIASES.get(spec, spec) in BUILTIN:
        return load_builtin(spec).head(limit)
    if spec.startswith("hf:"):
        rest = spec[3:]
        dataset_id, _, column = rest.partition(":") if rest.count(":") else (rest, "", "")
        return load_hf(dataset_id, column or None).head(limit)
    head, sep, tail = spec.partition(":")
    if sep and head in PRESETS:
        return load_file(tail, preset=head).head(limit)
    path, column = spec, None
    if not Path(spec).expanduser().exists() and ":" in spec:
        path, _, column = spec.rpartition(":")
    if not Path(path).expanduser().exists():
        names = ", ".join(list(BUILTIN) + [f"{p}:FILE" for p in PRESETS])
        raise SafetyLayersError(f"prompt set {spec!r} not found: give a file path or one of {names}, hf:DATASET_ID")
    return load_file(path, column=column or None).head(limit)
