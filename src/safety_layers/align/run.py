"""Safety-align a chat model by supervised fine-tuning: :func:`align`.

The bundled SmolLM2-135M-Instruct answers almost every harmful request, so it has no safety
layers to find. :func:`align` teaches a model to refuse with data we wrote (:mod:`.data`),
trains it on the Hugging Face Trainer (:mod:`.train`, with the loss of :mod:`.loss`),
measures how often it refuses held-out malicious and benign prompts, and writes the model
once, atomically, with its ``align_manifest.json`` (recipe, data counts, seed, refusal
rates). An interrupted run leaves no model folder, but training checkpoints in a work folder
beside it (``<out>.work``, every ``checkpoint_minutes``): rerunning the same command reuses the
self-distilled answers, which the generation cache keeps on disk, and continues training from
the last checkpoint. The work folder goes once the model is written.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.layers import LayerRange
from ..core.models import LoadedModel, load_or_use
from ..core.prompts import resolve_template
from .config import AlignConfig
from .data import build_data
from .train import train_sft

MANIFEST = "align_manifest.json"


@dataclass
class AlignResult:
    """What :func:`align` produced: the folder, the recipe, the data counts and refusal rates."""

    out: str
    base_model: str
    base_fingerprint: str
    fingerprint: str
    template: str
    config: dict
    counts: dict
    train: dict
    refusal: dict                 # e.g. {"heldout_malicious": {"n", "refused", "rate"}, ...}
    seconds: dict
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- evaluation

def refusal_rate(lm: LoadedModel, prompts: list[str], max_new_tokens: int = 48, template: str = "chat",
                 progress: bool = True, labels: list[dict[str, str]] | None = None) -> dict:
    """Share of greedy replies the keyword judge (opening mode) counts as refusals
    (:func:`evaluate.refusal_rate`, reduced to the counts the align manifest keeps). With
    per-prompt ``labels`` (e.g. ``{"category": "hate", "form": "short"}``) the counts are also
    broken down under ``by`` (see :func:`breakdown`)."""
    from ..evaluate import refusal_rate as over_refusal
    from ..engine.generation import GenerationSettings

    r = over_refusal(lm, prompts, judges=("keyword",), settings=GenerationSettings(max_new_tokens=max_new_tokens),
                     template=template, progress=progress)
    out = {"n": r.n, "refused": r.count, "rate": r.count / max(r.n, 1)}
    if labels:
        by = breakdown([v.refused for v in r.verdicts["keyword"]], labels)
        if by:
            out["by"] = by
    return out


def breakdown(refused: list[bool], labels: list[dict[str, str]]) -> dict[str, dict[str, dict]]:
    """Refusal counts per value of each label field: ``{"category": {"hate": {"n", "refused",
    "rate"}, ...}, "form": {...}}``. A field no prompt carries is left out; prompts without it
    count under ``"(none)"``. Where a recipe is weak is more use than its overall rate."""
    if len(refused) != len(labels):
        raise ValueError(f"{len(refused)} verdicts but {len(labels)} label rows")
    out: dict[str, dict[str, dict]] = {}
    for key in dict.fromkeys(k for row in labels for k in row):
        groups: dict[str, list[bool]] = {}
        for flag, row in zip(refused, labels):
            groups.setdefault(row.get(key, "(none)"), []).append(bool(flag))
        out[key] = {g: {"n": len(v), "refused": sum(v), "rate": sum(v) / len(v)} for g, v in sorted(groups.items())}
    return out


# --------------------------------------------------------------------------- align

def _default_out(model: str) -> Path:
    from ..core.runs import slug
    return Path(f"aligned-{slug(model)}")


def work_folder(out: Path) -> Path:
    """Where an alignment run keeps its training checkpoints until the model is written: beside
    the output, so a rerun of the same command finds them."""
    return out.parent / f"{out.name}.work"


def _save_with_manifest(lm: LoadedModel, out: Path, manifest: dict, overwrite: bool) -> Path:
    """Model, tokenizer and manifest appear together, or not at all (:func:`core.runs.atomic_dir`)."""
    from ..core.models import save_model
    from ..core.runs import atomic_dir, write_json

    with atomic_dir(out, overwrite=overwrite) as stage:
        save_model(lm.model, lm.tokenizer, stage, overwrite=True)
        write_json(stage / MANIFEST, manifest)
    return out


def _heldout_refusal(cfg: AlignConfig, lm: LoadedModel, data, template: str) -> dict:
    if not cfg.evaluate:
        return {}
    refusal = {key: refusal_rate(lm, getattr(data, key), cfg.eval_tokens, template, cfg.progress,
                                 labels=data.heldout_labels.get(key))
               for key in ("heldout_malicious", "heldout_benign")}
    return {**refusal, "judge": "keyword (opening)", "max_new_tokens": cfg.eval_tokens}


def align(cfg: AlignConfig | None = None, *, model=None, manifest: dict | None = None) -> AlignResult:
    """Safety-align ``cfg.model`` (or an already loaded ``model``) and save it to ``cfg.out``.

    Returns an :class:`AlignResult`; the same facts, plus the environment and any extra
    ``manifest`` fields, go into ``<out>/align_manifest.json``.
    """
    from ..core.runs import check_out_dir, environment

    cfg = cfg or AlignConfig()
    t0 = time.perf_counter()
    out = check_out_dir(Path(cfg.out) if cfg.out else _default_out(cfg.model), overwrite=cfg.overwrite, whole=True)
    lm = load_or_use(model if model is not None else cfg.model, cfg)
    if cfg.frozen_layers is not None:  # before minutes of distilling, not after
        LayerRange.parse(cfg.frozen_layers).check(len(lm.blocks.layers))
    notes = []
    template = resolve_template(lm.tokenizer, cfg.template)
    if template != cfg.template:
        notes.append(f"{lm.name} has no chat template: trained and evaluated with the '{template}' template, "
                     "which every command falls back to for this model")
    base_fp = lm.fingerprint()

    t = time.perf_counter()
    data = build_data(cfg, lm)
    t_data = time.perf_counter() - t
    stats = train_sft(lm, data.train, cfg.sft(), template=template, progress=cfg.progress,
                      checkpoints=work_folder(out) if cfg.checkpoint_minutes else None)
    t = time.perf_counter()
    refusal = _heldout_refusal(cfg, lm, data, template)
    seconds = {"data_and_distill": round(t_data, 1), "train": round(stats.seconds, 1),
               "evaluate": round(time.perf_counter() - t, 1)}

    result = AlignResult(
        out=str(out), base_model=lm.name if model is not None else cfg.model, base_fingerprint=base_fp,
        fingerprint=lm.fingerprint(), template=template, config=asdict(cfg), counts=data.counts,
        train=asdict(stats), refusal=refusal, seconds=seconds, notes=notes)
    t = time.perf_counter()
    record = {"kind": "safety-layers aligned model", **asdict(result), "environment": environment(lm),
              **(manifest or {})}
    _save_with_manifest(lm, out, record, cfg.overwrite)
    shutil.rmtree(work_folder(out), ignore_errors=True)
    result.seconds["save"] = round(time.perf_counter() - t, 1)
    result.seconds["total"] = round(time.perf_counter() - t0, 1)
    return result


def read_manifest(folder: str | Path) -> dict | None:
    """The ``align_manifest.json`` of an aligned model folder, or None if it has none."""
    from ..core.runs import read_json

    path = Path(folder) / MANIFEST
    return read_json(path, "align manifest") if path.is_file() else None
