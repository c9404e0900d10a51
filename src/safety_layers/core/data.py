"""Data files: prompt sets (the package's own, files, Hugging Face datasets, benchmark
presets) and instruction records, all read by one file reader (:func:`read_located_rows`).

A prompt set is named by one string, so the CLI and the API take the same thing:

- a built-in name: ``normal``, ``malicious``, ``over-rejection`` (written by us, shipped);
- a file: ``prompts.csv``, ``data.json``, ``data.jsonl``, ``list.txt`` (``path.csv:column``
  picks a column; otherwise one of prompt / goal / instruction / question / text);
- a benchmark preset with its file: ``advbench:harmful_behaviors.csv``,
  ``xstest-safe:xstest_prompts.csv``, ``xstest-unsafe:xstest_prompts.csv``;
- a Hugging Face dataset: ``hf:org/name[:column]`` (needs internet).
"""

from __future__ import annotations

import csv
import hashlib
import io
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
        """The first ``n`` prompts (all when ``n`` is None); ``n`` below 1 is an error, never
        a slice from the end."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise SafetyLayersError(f"limit must be a whole number of prompts, at least 1; got {n!r}: leave it "
                                    "unset to use every prompt")
        if n is None or n >= len(self):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], self.meta[:n], self.source)

    def require(self, n: int, what: str = "prompts") -> "PromptSet":
        if len(self) < n:
            raise SafetyLayersError(
                f"prompt set {self.name!r} has {len(self)} {what}; at least {n} are needed: "
                "use a larger set or a different column")
        return self


#: File types :func:`read_rows` reads, by suffix.
CSV_SUFFIXES, JSON_SUFFIXES, TEXT_SUFFIXES = (".csv", ".tsv"), (".json", ".jsonl", ".ndjson"), (".txt", "")


def read_text(path: str | Path, what: str = "data file") -> str:
    """The text of a file: UTF-8 (a leading BOM dropped) or UTF-16 with its BOM; anything else
    is one line naming the first bad byte and its line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise SafetyLayersError(f"{path} is a folder: give the path of a {what}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SafetyLayersError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}; saved as "
                                "Latin-1 or Windows-1252?): save it as UTF-8") from None


def _header_like(cell: str) -> bool:
    """A column name: short, a few words, not a sentence."""
    return 0 < len(cell) <= 40 and len(cell.split()) <= 4 and not cell.endswith(("?", ".", "!", ":"))


def csv_has_header(first: list[str], column: str | None = None) -> bool:
    """Whether the first row of a CSV names its columns.

    A one-column file of prompts without a header (the paper's over-rejection file) must keep
    its first prompt: a row holding a known prompt column name, or the ``column`` asked for
    (unless that is a sentence), is a header; so is a row of several short names; a single
    cell that is no known name, or any sentence, is data."""
    cells = [c.replace("\ufeff", "").strip() for c in first]
    if column is not None and column.strip() in cells:
        return _header_like(column.strip())
    if any(c.lower() in PROMPT_COLUMNS for c in cells):
        return True
    return len(cells) > 1 and all(_header_like(c) for c in cells)


def _one_column(text: str, delimiter: str, name: str) -> list[tuple[str, dict]]:
    """Rows of a header-less CSV: one prompt per line, whole (commas inside are text, as in
    the paper's file; a line that is one quoted field loses its quotes)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line], delimiter=delimiter))
        except (csv.Error, StopIteration):
            fields = []
        out.append((f"line {i}", {name: fields[0].strip() if len(fields) == 1 else line.strip()}))
    return out


def _csv_rows(text: str, suffix: str, column: str | None) -> list[tuple[str, dict]]:
    delimiter = "\t" if suffix == ".tsv" else ","
    try:
        first = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error:
        first = []
    if not csv_has_header(first, column):
        return _one_column(text, delimiter, column or "text")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    reader.fieldnames = [str(c).replace("\ufeff", "").strip() for c in reader.fieldnames or []]
    return [(f"line {reader.line_num}", row) for row in reader]   # line_num: quoted newlines count


def read_located_rows(path: str | Path, column: str | None = None) -> list[tuple[str, object]]:
    """``(where, row)`` pairs of a CSV/TSV, JSON (a list, or an object holding one list),
    JSONL or text file (one ``{"text": line}`` row per non-blank line).

    ``where`` names the row for error messages (``line 3``, ``record 1 (0-based)``). A
    ``.json`` file that holds one object per line reads as JSONL. A CSV without a header row
    (:func:`csv_has_header`; ``column`` is the column a caller will pick) reads one row per
    line under that name. The one reader of data files: prompt sets, instruction records
    and reference answers all come through here.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise SafetyLayersError(f"{path} is a folder: give the path of a data file (.csv, .tsv, .json, .jsonl, .txt)")
    if not path.is_file():
        raise SafetyLayersError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSON_SUFFIXES + TEXT_SUFFIXES:
        raise SafetyLayersError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .txt")
    text = read_text(path)
    if not text.strip():
        raise SafetyLayersError(f"{path} is empty{' (only whitespace)' if text else ''}: it needs one row per "
                                "prompt or record")
    if suffix in CSV_SUFFIXES:
        return _csv_rows(text, suffix, column)
    if suffix in TEXT_SUFFIXES:
        return [(f"line {i}", {"text": line.strip()}) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    whole = _json_document(path, text)
    if whole is not None:
        return [(f"record {i} (0-based)", row) for i, row in enumerate(whole)]
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SafetyLayersError(f"{path} line {i} is not valid JSON ({e.msg}, column {e.colno}): expected a "
                                    "JSON list or one JSON object per line") from None
    return out


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _json_document(path: Path, text: str) -> list | None:
    """The records of a whole-file JSON document (a list, or an object holding exactly one
    list), or None when the file is JSON Lines. A ``.json`` file is one document unless it
    holds several objects, one per line; its top level must hold the records."""
    stripped = text.lstrip()
    if not stripped.startswith("[") and path.suffix.lower() != ".json":
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if stripped.startswith("{") and e.msg == "Extra data":
            return None                       # one object per line in a .json file
        raise SafetyLayersError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                                "fix the file") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SafetyLayersError(f"{path}: expected a JSON list of records (or one list inside an object), "
                                    f"got an object with {len(lists)} lists")
        data = lists[0]
    if not isinstance(data, list):
        raise SafetyLayersError(f"{path} holds {_JSON_NAMES.get(type(data), type(data).__name__)} "
                                f"({str(data)[:40]!r}), not a list of records: write a JSON list, e.g. "
                                "[\"first prompt\", \"second\"] or [{\"prompt\": ...}]")
    return data


def read_rows(path: str | Path, column: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows as dicts (a bare value becomes ``{"text": value}``) and the column names, in the
    order they first appear; see :func:`read_located_rows` for the formats and ``column``."""
    rows = [r if isinstance(r, dict) else {"text": str(r)} for _, r in read_located_rows(path, column)]
    return rows, list(dict.fromkeys(k for r in rows for k in r))


def _pick(rows: list[dict], cols: list[str], column: str | None, where: str) -> str:
    if column:
        if column not in cols:
            raise SafetyLayersError(
                f"{where} has no column {column!r}; columns: {', '.join(cols) or '(none)'}")
        return column
    lower = {str(c).lower(): c for c in reversed(cols)}
    for c in PROMPT_COLUMNS:
        if c in lower:
            return lower[c]
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
    if not path.exists():
        raise SafetyLayersError(f"prompt file not found: {path}")
    row_filter = None
    if preset:
        preset_col, row_filter = PRESETS[preset]
        column = column or preset_col
    rows, cols = read_rows(path, column)
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


# --------------------------------------------------------------------------- instruction records

#: Recognised row layouts: (instruction key, input key or None, output key).
LAYOUTS = {
    "alpaca": ("instruction", "input", "output"),
    "advbench": ("goal", None, "target"),       # AdvBench harmful_behaviors.csv: the answer is the target prefix
    "qa": ("question", None, "answer"),         # GSM8K and similar
    "prompt": ("prompt", None, "response"),
}


@dataclass
class Records:
    """Rows of one file in the common {instruction, input, output} form."""

    rows: list[dict]
    path: str
    layout: str
    dropped_empty: int = 0
    dropped_duplicate: int = 0


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (manifests record which data a run was built from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    raw = read_located_rows(path)
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
