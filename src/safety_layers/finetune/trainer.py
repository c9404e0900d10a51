"""Pieces around the Hugging Face Trainer that every run needs: disk checks before training,
the checkpoint to resume from, and what the optimizer holds."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from ..core.errors import SafetyLayersError


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def estimate_bytes(model: torch.nn.Module, lora: bool) -> dict[str, int]:
    """Disk needed by one checkpoint (weights + AdamW's two moments) and by the final folder."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    saved = trainable if lora else weights
    return {"checkpoint": saved + 2 * trainable, "final": saved, "weights": weights}


def check_disk(args, out: Path, sizes: dict[str, int], margin: float = 1.1) -> None:
    """Raise before training when the disk cannot hold a checkpoint plus the final model."""
    strategy = getattr(args, "save_strategy", "no")
    need_ckpt = 0 if str(getattr(strategy, "value", strategy)) == "no" else sizes["checkpoint"]
    where = {}
    for path, need in ((Path(args.output_dir), need_ckpt), (out.parent, sizes["final"])):
        anc = _existing_ancestor(path)
        dev = anc.stat().st_dev
        where.setdefault(dev, [anc, 0])[1] += need
    for anc, need in where.values():
        free = shutil.disk_usage(anc).free
        if need * margin > free:
            raise SafetyLayersError(
                f"not enough disk space in {anc}: a checkpoint (weights + optimizer, "
                f"~{sizes['checkpoint'] / 1e9:.2f} GB) and the final model (~{sizes['final'] / 1e9:.2f} GB) "
                f"need ~{need * margin / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free: free space, pick another --output_dir/--out, or pass --save_strategy no")


def checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                  key=lambda p: int(p.name.split("-")[1]))


def resume_point(cfg, args) -> str | None:
    """The checkpoint to resume from (``cfg.resume`` or ``--resume-from-checkpoint``), or None;
    checkpoints of an earlier run need a decision: resume, or ``overwrite``."""
    output_dir = Path(args.output_dir)
    ckpts = checkpoints(output_dir)
    asked = getattr(args, "resume_from_checkpoint", None)
    if asked and str(asked).lower() not in ("true", "last"):
        if not Path(asked).is_dir():
            raise SafetyLayersError(f"checkpoint not found: {asked}")
        return str(asked)
    if cfg.resume or (asked and str(asked).lower() in ("true", "last")):
        if not ckpts:
            raise SafetyLayersError(f"no checkpoint in {output_dir} to resume from: run without resuming")
        return str(ckpts[-1])
    if ckpts and not cfg.overwrite:
        raise SafetyLayersError(f"{output_dir} holds checkpoints of an earlier run (last: {ckpts[-1].name}): "
                                "continue it with --resume-from-checkpoint last (resume=True) or pass --overwrite "
                                "to start over")
    return None


def is_main(args) -> bool:
    return getattr(args, "process_index", 0) == 0


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state tensors (AdamW: two moments per trainable parameter)."""
    if optimizer is None:
        return 0
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
