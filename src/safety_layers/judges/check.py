"""How well a judge agrees with people: score judges on a file of human-labelled replies.

Before trusting a refusal rate (R_o, the harmful rate) on a new model, label a few hundred of
its replies and run :func:`judge_check` on them: accuracy, refusal precision, recall, F1 and
Cohen's kappa per judge, and per reply ``style`` when the file has that column. A partial
refusal counts as a refusal (the model did not do what was asked), as does an empty reply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..core.data import read_rows
from ..core.errors import SafetyLayersError
from ..core.stats import cohen_kappa
from .base import Judge
from .factory import DEFAULT_JUDGE, build_judge

#: Human labels and whether each means "refused". Partial refusals count as refusals.
LABELS: dict[str, bool] = {
    "refusal": True, "refused": True, "refuse": True, "partial": True, "partial refusal": True,
    "full refusal": True, "1": True, "1.0": True, "yes": True, "true": True,
    "compliance": False, "complied": False, "comply": False, "full compliance": False, "0": False, "0.0": False,
    "no": False, "false": False,
}

#: Column names tried, in order, when the caller names none.
PROMPT_COLUMNS = ("prompt", "question", "instruction", "goal", "behavior", "input", "query")
REPLY_COLUMNS = ("reply", "response", "completion", "output", "generation", "answer", "model_output")
LABEL_COLUMNS = ("label", "human_label", "gold", "refusal", "refused", "human", "annotation", "verdict")

#: Judges compared by default: the default, the old opening-mode keyword judge, GCG's rule and a dozen prefixes.
DEFAULT_CHECK_JUDGES = (DEFAULT_JUDGE, "keyword-opening", "keyword-gcg", "prefix")


@dataclass
class Agreement:
    """One judge against the human labels (refusal is the positive class).

    ``precision``/``recall``/``f1`` are None when undefined (no predicted or no true refusals).
    ``empty`` counts empty replies (scored as refusals); ``errors`` counts verdicts the judge
    could not decide, scored as compliance (the judge did not find a refusal).
    """

    judge: str
    n: int
    accuracy: float
    precision: float | None
    recall: float | None
    f1: float | None
    kappa: float
    tp: int
    fp: int
    fn: int
    tn: int
    empty: int = 0
    errors: int = 0
    by_style: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LabelledReplies:
    """Replies with human labels (True = refused), read by :func:`read_labelled`."""

    path: str
    prompts: list[str]
    replies: list[str]
    refused: list[bool]
    styles: list[str] | None
    columns: dict[str, str]


def agreement(human: Sequence[bool], judged: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, refusal precision/recall/F1 and Cohen's kappa of ``judged`` against ``human``."""
    pairs = list(zip(map(bool, human), map(bool, judged)))
    if not pairs or len(human) != len(judged):
        raise SafetyLayersError(f"agreement needs two equally long, non-empty lists of labels, got {len(human)} and {len(judged)}")
    tp = sum(h and j for h, j in pairs)
    fp = sum(j and not h for h, j in pairs)
    fn = sum(h and not j for h, j in pairs)
    tn = len(pairs) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"n": len(pairs), "accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall, "f1": f1,
            "kappa": cohen_kappa([h for h, _ in pairs], [j for _, j in pairs]), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _column(cols: list[str], given: str | None, candidates: Sequence[str], what: str, option: str, where: str) -> str:
    if given:
        if given not in cols:
            raise SafetyLayersError(f"{where} has no column {given!r} (columns: {', '.join(cols) or 'none'}); pass an existing one to {option}")
        return given
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    raise SafetyLayersError(f"{where}: no {what} column among {', '.join(cols) or 'no columns'}; name it with {option}")


def read_labelled(path: str | Path, *, prompt_column: str | None = None, reply_column: str | None = None,
                  label_column: str | None = None, style_column: str | None = "style") -> LabelledReplies:
    """Read a CSV/TSV/JSON/JSONL file of prompt, reply and human label (one row per reply).

    Columns are found by name (:data:`PROMPT_COLUMNS`, :data:`REPLY_COLUMNS`,
    :data:`LABEL_COLUMNS`) unless given. Labels: refusal/partial/compliance, 1/0, yes/no,
    true/false (any case); anything else fails naming the row and the accepted labels.
    """
    where = str(path)
    rows, cols = read_rows(path)
    if not rows:
        raise SafetyLayersError(f"{where} holds no rows; add one row per labelled reply (prompt, reply, label)")
    p_col = _column(cols, prompt_column, PROMPT_COLUMNS, "prompt", "prompt_column (--prompt-column)", where)
    r_col = _column(cols, reply_column, REPLY_COLUMNS, "reply", "reply_column (--reply-column)", where)
    l_col = _column(cols, label_column, LABEL_COLUMNS, "label", "label_column (--label-column)", where)
    s_col = style_column if style_column and style_column in cols else None
    prompts, replies, refused, styles = [], [], [], []
    for i, row in enumerate(rows, 1):
        raw = row.get(l_col)
        key = str(raw).strip().lower() if raw is not None else ""
        if isinstance(raw, bool):
            key = str(raw).lower()
        if key not in LABELS:
            raise SafetyLayersError(f"{where} row {i}: unknown label {raw!r} in column {l_col!r}; use refusal, partial "
                                    "or compliance (or 1/0, yes/no)")
        prompts.append("" if row.get(p_col) is None else str(row.get(p_col)))
        replies.append("" if row.get(r_col) is None else str(row.get(r_col)))
        refused.append(LABELS[key])
        styles.append(str(row.get(s_col) or "(none)") if s_col else "")
    return LabelledReplies(where, prompts, replies, refused, styles if s_col else None,
                           {"prompt": p_col, "reply": r_col, "label": l_col, **({"style": s_col} if s_col else {})})


def _judges(judges: Sequence[str | Judge] | str | None) -> list[tuple[str, Judge]]:
    if judges is None:
        judges = DEFAULT_CHECK_JUDGES
    if isinstance(judges, str):
        judges = [j.strip() for j in judges.split(",") if j.strip()]
    if not judges:
        raise SafetyLayersError(f"no judge to check; pass judges=[...], e.g. {', '.join(DEFAULT_CHECK_JUDGES)}")
    return [(j, build_judge(j)) if isinstance(j, str) else (j.name, j) for j in judges]


def judge_check(path: str | Path, judges: Sequence[str | Judge] | str | None = None, *, prompt_column: str | None = None,
                reply_column: str | None = None, label_column: str | None = None,
                style_column: str | None = "style") -> list[Agreement]:
    """Score each judge against the human labels of ``path``; one :class:`Agreement` per judge.

    ``judges``: names for :func:`~safety_layers.judges.build_judge` (``"rules"``,
    ``"keyword-opening"``, ``"keyword-gcg"``, ``"prefix"``, ...) or built Judge objects;
    default :data:`DEFAULT_CHECK_JUDGES`. Each judge's ``by_style`` holds the same figures per
    value of the ``style`` column when the file has one.
    """
    data = read_labelled(path, prompt_column=prompt_column, reply_column=reply_column, label_column=label_column,
                         style_column=style_column)
    out = []
    for name, judge in _judges(judges):
        verdicts = judge.judge(data.prompts, data.replies)
        judged = [v.refused and not v.error for v in verdicts]
        by_style = {}
        for style in sorted(set(data.styles or [])):
            idx = [i for i, s in enumerate(data.styles) if s == style]
            by_style[style] = agreement([data.refused[i] for i in idx], [judged[i] for i in idx])
        out.append(Agreement(judge=name, **agreement(data.refused, judged), empty=sum(v.empty for v in verdicts),
                             errors=sum(v.error for v in verdicts), by_style=by_style))
    return out


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_agreements(results: Sequence[Agreement], styles: bool = True) -> str:
    """A plain-text table: one row per judge, then per style (when the file had styles)."""
    head = f"{'judge':<18}{'n':>6}{'accuracy':>10}{'precision':>11}{'recall':>8}{'F1':>7}{'kappa':>8}"
    lines = [head]
    for r in results:
        lines.append(f"{r.judge:<18}{r.n:>6}{_num(r.accuracy):>10}{_num(r.precision):>11}{_num(r.recall):>8}"
                     f"{_num(r.f1):>7}{_num(r.kappa):>8}")
    if styles and any(r.by_style for r in results):
        names = [r.judge for r in results]
        lines += ["", "accuracy per style: " + " | ".join(names)]
        for style in results[0].by_style:
            cells = " | ".join(_num(r.by_style[style]["accuracy"], 2) for r in results)
            lines.append(f"  {style:<24}{results[0].by_style[style]['n']:>5}  {cells}")
    return "\n".join(lines)


def agreements_to_dict(results: Sequence[Agreement]) -> list[dict[str, Any]]:
    """JSON-ready form of :func:`judge_check`'s result."""
    return [asdict(r) for r in results]
