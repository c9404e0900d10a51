"""What trains: the band, freezing, LoRA, and the plan that counts them.

Frozen parameters get ``requires_grad=False`` before a Trainer exists, which keeps them out
of the optimizer entirely. Which parameters freezing a band covers is decided in one place,
:meth:`Blocks.parameters`; LoRA targets come from the ArchSpec (:func:`lora_target_modules`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.models import Blocks
from .config import BAND_METHODS, FinetuneConfig
from .export import export_peft_config


# --------------------------------------------------------------------------- the band

def read_band(path: str | Path) -> LayerRange:
    """The band of a locate result: a JSON file (or run folder holding result.json) with
    ``"safety_layers": [start, end]``, as :class:`~safety_layers.locate.LocateResult` writes it."""
    from ..core.runs import read_json

    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    data = read_json(p, "locate result")
    if data.get("safety_layers") is not None:
        return LayerRange.parse(data["safety_layers"])
    raise SafetyLayersError(f"{p} has no 'safety_layers' entry (found: {', '.join(data) or 'nothing'}): pass a "
                            "locate result, or --layers START-END instead")


def resolve_band(cfg: FinetuneConfig, num_layers: int | None = None) -> LayerRange | None:
    """The band from ``layers`` or ``locate`` (they must agree), checked against the model."""
    band = LayerRange.parse(cfg.layers) if cfg.layers else None
    if cfg.locate:
        located = read_band(cfg.locate)
        if band is not None and band != located:
            raise SafetyLayersError(f"--layers {band} disagrees with {cfg.locate} ({located}): pass only one")
        band = located
    if band is None and cfg.method in BAND_METHODS:
        raise SafetyLayersError(f"method {cfg.method} needs a band: pass --layers START-END (e.g. 6-12) "
                                "or --locate runs/locate-.../result.json")
    if band is not None and num_layers is not None:
        band.check(num_layers)
        if cfg.method in BAND_METHODS and len(band) == num_layers:
            raise SafetyLayersError(f"the band {band} covers all {num_layers} layers: nothing is left to train "
                                    "in the decoder; use --method full or a narrower band")
    return band


# --------------------------------------------------------------------------- freezing and LoRA

@dataclass
class FreezePlan:
    """What trains and what does not, counted over unique parameters."""

    method: str
    band: list[int] | None
    frozen_names: list[str]
    frozen_tensors: int
    frozen_params: int
    trainable_tensors: int
    trainable_params: int
    total_params: int

    @property
    def frozen_fraction(self) -> float:
        return self.frozen_params / max(self.total_params, 1)

    def summary(self) -> str:
        t = self.trainable_params
        lines = [f"trainable params: {t:,} || all params: {self.total_params:,} || "
                 f"trainable%: {100 * t / max(self.total_params, 1):.4f}",
                 f"trainable: {self.trainable_tensors} tensors, {t:,} params; frozen: {self.frozen_tensors} tensors, "
                 f"{self.frozen_params:,} params ({100 * self.frozen_fraction:.2f}% of all)"]
        return "\n".join(lines)


def _plan(model: torch.nn.Module, method: str, band: LayerRange | None, frozen_names: list[str]) -> FreezePlan:
    tr = [p for p in model.parameters() if p.requires_grad]
    fr = [p for p in model.parameters() if not p.requires_grad]
    return FreezePlan(method, [band.start, band.end] if band is not None else None, frozen_names,
                      len(fr), sum(p.numel() for p in fr), len(tr), sum(p.numel() for p in tr),
                      sum(p.numel() for p in model.parameters()))


def freeze(blocks: Blocks, band: LayerRange, norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """Freeze the band's parameters (:meth:`Blocks.parameters`) in place and return them by name."""
    frozen = blocks.parameters(band, norms=norms)
    for p in frozen.values():
        p.requires_grad_(False)
    return frozen


def add_lora(lm, skip: LayerRange | None = None, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
             seed: int = 0):
    """Wrap ``lm.model`` in PEFT LoRA on every attention and MLP matrix, except in the layers
    ``skip`` (which get no adapter at all); the base weights are frozen. Seeded: the A
    matrices are drawn at random."""
    from peft import get_peft_model
    from transformers import set_seed

    peft_cfg = export_peft_config(skip, lm, r=r, alpha=alpha, dropout=dropout)
    set_seed(seed)
    pm = get_peft_model(lm.model, peft_cfg)
    if skip is not None:
        stray = [n for n, _ in pm.named_parameters() if "lora_" in n and _layer_of(n, lm.blocks) in skip]
        if stray:
            raise RuntimeError(f"LoRA weights were created on band layers: {stray[:3]}")
    return pm


def apply_method(lm, cfg: FinetuneConfig, band: LayerRange | None, seed: int = 0):
    """Freeze (or wrap with LoRA) in place; return ``(model to train, FreezePlan, frozen params)``.

    For the LoRA methods every base weight is frozen and the returned model is a PeftModel.
    """
    model = lm.model
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.method in ("sppft", "freeze"):
        frozen = freeze(lm.blocks, band, norms=cfg.freeze_norms)
        return model, _plan(model, cfg.method, band, sorted(frozen)), frozen
    if cfg.method == "full":
        return model, _plan(model, cfg.method, None, []), {}
    skip = band if cfg.method == "sppft-lora" else None
    pm = add_lora(lm, skip, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=seed)
    frozen = {n: p for n, p in pm.named_parameters() if not p.requires_grad}
    return pm, _plan(pm, cfg.method, skip, sorted(frozen)), frozen


def _layer_of(name: str, blocks: Blocks) -> int:
    m = re.search(rf"(?:^|\.){re.escape(blocks.layers_path)}\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


# --------------------------------------------------------------------------- methods with their own setup

@dataclass
class MethodContext:
    """What :func:`~safety_layers.finetune.run.prepare` hands a method module: the run's settings,
    the loaded model, the band (for band methods), the tokenized user data (None for methods that
    train on data of their own) and the collator and callbacks every Trainer of the run shares."""

    cfg: FinetuneConfig
    args: object                     # TrainingArguments
    lm: object                       # LoadedModel
    band: LayerRange | None
    data: object | None              # TokenizedData
    collator: object                 # PadCollator
    callbacks: list
    output_dir: Path


@dataclass
class MethodSetup:
    """What a method module built: the model to train, its freeze plan, the callback that checks
    what is frozen (``result`` and ``groups`` go to the manifest), the Trainer, and facts about
    the method's own data and choices (``info``, recorded in the manifest and result.json)."""

    model: torch.nn.Module
    plan: FreezePlan
    check: object
    trainer: object
    info: dict


class MethodModule:
    """A fine-tuning method that needs more than freezing (NFFT, Lisa, reverse DPO), registered in
    :data:`~safety_layers.finetune.config.METHOD_MODULES`. ``check_inputs`` runs before the
    model loads, ``setup`` builds the Trainer."""

    name = ""

    def check_inputs(self, cfg: FinetuneConfig, args) -> None:
        """Fail early (before loading anything) on settings this method cannot use."""

    def setup(self, ctx: MethodContext) -> MethodSetup:
        raise NotImplementedError


def plan_of(model: torch.nn.Module, method: str, band: LayerRange | None, frozen_names: list[str]) -> FreezePlan:
    """The freeze plan of ``model`` as its ``requires_grad`` flags stand (frozen tensors named)."""
    return _plan(model, method, band, frozen_names)


def as_method(cfg: FinetuneConfig, method: str) -> FinetuneConfig:
    """``cfg`` with another method: a baseline that trains like ``full`` or ``sppft`` freezes through it."""
    from dataclasses import replace

    return replace(cfg, method=method)
