"""Task quality: Rouge-L against reference answers, and lm-evaluation-harness tasks (paper §4.2).

The paper's S_r is the mean Rouge-L between the model's answers and the labels of a held-out
instruction set, and S_m an MMLU score; here any lm-eval task runs on the in-memory model.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import SafetyLayersError
from ..core.models import load_or_use
from ..engine.distributed import run_on_main
from ..engine.generation import Completion, GenerationSettings
from .rates import SAMPLE, generate_all, summary_dict

#: Field names accepted for the reference answers of a quality file, first match wins.
REFERENCE_FIELDS = ("output", "response", "answer", "reference")
INSTRUCTION_FIELDS = ("instruction", "prompt", "question")


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
    prompts: list[str] = field(default_factory=list, repr=False, metadata=SAMPLE)
    references: list[str] = field(default_factory=list, repr=False, metadata=SAMPLE)
    completions: list[Completion] = field(default_factory=list, repr=False, metadata=SAMPLE)
    scores: list[float] = field(default_factory=list, repr=False, metadata=SAMPLE)

    def to_dict(self) -> dict:
        return summary_dict(self)


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
    from ..core.data import read_rows

    p = Path(path).expanduser()
    if not p.is_file():
        raise SafetyLayersError(f"quality file not found: {p}")
    if p.stat().st_size == 0:
        raise SafetyLayersError(f"quality file is empty: {p}")
    rows, cols = read_rows(p)
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
