"""What one alignment run does: :class:`AlignConfig` (the recipe, where it comes from, where the
model goes) and :class:`SFTSettings` (how the supervised fine-tuning optimises).

A recipe is a YAML file of AlignConfig values (``recipe``); ``demo`` names the one shipped
with the package, from which the aligned demo model is built. Fields set explicitly win over
the recipe, and what neither sets takes the default in the field's ``metadata["default"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from ..core.config import check_keys, check_types, load_yaml, settle
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.placement import device_settings

Method = Literal["full", "lora"]
#: Recipes shipped with the package: name -> file under ``safety_layers/recipes``.
RECIPES = {"demo": "demo.yaml"}
#: Fields that say where and how a run goes, not what it trains: a recipe may not set them.
RUN_FIELDS = ("recipe", "out", "overwrite", "progress", "checkpoint_minutes")


def _opt(default, help: str, cli: bool = False):
    """A field a recipe may set: None until the recipe or the user sets it, then ``default``."""
    return field(default=None, metadata={"help": help, "default": default, "cli": cli})


@dataclass
@device_settings
class AlignConfig:
    """One alignment recipe (``safety-layers align``). Data fields left None use the bundled files."""

    model: str | None = _opt("smollm2-135m-instruct", "base chat model to align", cli=True)
    recipe: str | None = field(default=None, metadata={
        "help": "recipe YAML of these settings, or 'demo' (the aligned demo model's); explicit settings win"})
    out: str | None = field(default=None, metadata={"help": "output folder (None: ./aligned-<model>)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    malicious: str | None = field(default=None, metadata={
        "help": "JSONL of malicious training prompts (prompt, category)"})
    benign: str | None = field(default=None, metadata={"help": "JSONL of benign training prompts (prompt, category)"})
    refusals: str | None = field(default=None, metadata={"help": "JSONL of refusals (text, categories)", "cli": False})
    heldout_malicious: str | None = field(default=None, metadata={
        "help": "held-out malicious prompts (None: the bundled split for bundled data, else heldout_fraction of "
                "the training file)", "cli": False})
    heldout_benign: str | None = field(default=None, metadata={
        "help": "held-out benign prompts (as heldout_malicious)", "cli": False})
    heldout_fraction: float | None = _opt(0.2, "share of a custom training file held out when no held-out file "
                                                    "is given")
    n_malicious: int | None = field(default=None, metadata={
        "help": "use a seeded sample of this many malicious training prompts (None: all)", "cli": False})
    n_benign: int | None = field(default=None, metadata={
        "help": "use a seeded sample of this many benign training prompts (None: all)", "cli": False})
    borderline: bool | None = _opt(True, "train on benign prompts of category 'borderline' (safe but "
                                         "alarming-sounding)")
    recovery_fraction: float | None = _opt(0.0, "share of malicious prompts also trained as compliant opener + refusal")
    reopen: bool | None = _opt(True, "answer a benign prompt the base model refuses again, the reply started by a "
                                     "helpful opening, instead of dropping it")
    answer_tokens: int | None = _opt(56, "length of the self-distilled benign answers (greedy new tokens)")
    template: str | None = _opt("chat", "prompt template (chat falls back to plain without a chat template)")
    method: Method | None = _opt("full", "full fine-tuning or LoRA (merged into the weights when saved)", cli=True)
    epochs: float | None = _opt(2.0, "passes over the training examples (fractions allowed)")
    lr: float | None = _opt(3e-5, "peak learning rate (AdamW, linear warmup and decay)")
    batch_size: int | None = _opt(16, "examples per optimizer step")
    max_length: int | None = _opt(128, "most tokens per example (prompt + response); responses are cut")
    warmup: float | None = _opt(0.1, "share of steps with linear warmup")
    weight_decay: float | None = _opt(0.0, "AdamW weight decay")
    benign_weight: float | None = _opt(1.0, "loss weight of the benign answers relative to the refusals "
                                            "(>1 pushes against over-refusal)")
    opening_weight: float | None = _opt(1.0, "loss weight of each reply's first opening_tokens tokens, where a reply "
                                             "turns into a refusal or an answer (1: plain mean)")
    opening_tokens: int | None = _opt(4, "reply tokens that opening_weight covers")
    unlikelihood_weight: float | None = _opt(0.0, "weight of the unlikelihood term: each training prompt also gets "
                                                  "an opening of the other kind whose probability is pushed down, "
                                                  "-log(1 - P(opening)) (0: off)")
    frozen_layers: str | None = field(default=None, metadata={
        "help": "decoder blocks left untouched while aligning, 0-based inclusive, e.g. 0-14 (None: train all)",
        "cli": False})
    prefix_cache: bool | None = _opt(True, "compute the prompt prefix every example shares (the chat template's "
                                           "system turn) once per step, without gradient through it")
    lora_r: int | None = _opt(16, "LoRA rank (method=lora)")
    lora_alpha: int | None = _opt(32, "LoRA scaling alpha (method=lora)")
    seed: int | None = _opt(0, "seed for sampling, refusal choice, shuffling and initialisation", cli=True)
    evaluate: bool | None = _opt(True, "measure refusal on the held-out prompts after training")
    eval_tokens: int | None = _opt(48, "greedy new tokens per held-out prompt when measuring refusal")
    training_args: dict = field(default_factory=dict, metadata={
        "help": "TrainingArguments overrides for the SFT Trainer (e.g. deepspeed, bf16, gradient_checkpointing)",
        "cli": False})
    progress: bool = field(default=True, metadata={"help": "show progress bars", "cli": False})
    checkpoint_minutes: float = field(default=5.0, metadata={
        "help": "training minutes between checkpoints in <out>.work, from which a rerun of an interrupted run "
                "continues (0: none); the folder goes once the model is written", "cli": False})

    def __post_init__(self):
        if self.recipe is not None:
            self._fill_from(self.recipe)
        settle(self)
        self._check()

    def _fill_from(self, recipe: str) -> None:
        """Take the recipe's value for every field left unset."""
        values = load_yaml(recipe_path(recipe))
        allowed = [f.name for f in dataclasses.fields(self) if f.init and f.name not in RUN_FIELDS]
        check_keys(f"recipe {recipe}", values, allowed)
        for name, value in check_types(type(self), values, f"recipe {recipe}").items():
            if name == "training_args":
                self.training_args = {**(value or {}), **self.training_args}
            elif getattr(self, name) is None:
                setattr(self, name, value)

    def _check(self) -> None:
        if self.method not in ("full", "lora"):
            raise SafetyLayersError(f"method must be 'full' or 'lora', got {self.method!r}")
        for name in ("lr", "epochs", "benign_weight", "opening_weight"):
            if not getattr(self, name) > 0:
                raise SafetyLayersError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.unlikelihood_weight >= 0:
            raise SafetyLayersError(f"unlikelihood_weight must be >= 0, got {self.unlikelihood_weight}")
        for name in ("batch_size", "answer_tokens", "eval_tokens", "lora_r", "lora_alpha", "opening_tokens"):
            if getattr(self, name) < 1:
                raise SafetyLayersError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 16:
            raise SafetyLayersError(f"max_length must be >= 16 tokens, got {self.max_length}")
        for name in ("heldout_fraction", "warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise SafetyLayersError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.recovery_fraction <= 1:
            raise SafetyLayersError(f"recovery_fraction must be in [0, 1], got {self.recovery_fraction}")
        if self.device_map:
            raise SafetyLayersError("align trains the model: spread it over GPUs with DeepSpeed ZeRO-3 or FSDP "
                                    "(training_args; see examples/), not device_map")
        if self.frozen_layers is not None:
            LayerRange.parse(self.frozen_layers)  # a malformed range fails now, not after distilling
        if self.checkpoint_minutes < 0:
            raise SafetyLayersError(f"checkpoint_minutes must be >= 0 (0: no checkpoints), got {self.checkpoint_minutes}")
        for name in ("n_malicious", "n_benign"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SafetyLayersError(f"{name} must be >= 1 or None (all), got {getattr(self, name)}")

    def sft(self) -> "SFTSettings":
        return SFTSettings(method=self.method, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                           max_length=self.max_length, warmup=self.warmup, weight_decay=self.weight_decay,
                           lora_r=self.lora_r, lora_alpha=self.lora_alpha, seed=self.seed,
                           prefix_cache=self.prefix_cache, kind_weights={"benign": self.benign_weight},
                           opening_tokens=self.opening_tokens, opening_weight=self.opening_weight,
                           unlikelihood_weight=self.unlikelihood_weight, frozen_layers=self.frozen_layers,
                           training_args={**({"use_cpu": True} if self.device == "cpu" else {}),
                                          **self.training_args},
                           checkpoint_seconds=60 * self.checkpoint_minutes)


def recipe_path(recipe: str) -> Path:
    """The YAML file of a recipe: a shipped name (:data:`RECIPES`) or a path."""
    if recipe in RECIPES:
        return Path(str(resources.files("safety_layers") / "recipes" / RECIPES[recipe]))
    path = Path(recipe)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        raise SafetyLayersError(f"unknown recipe {recipe!r}: give a YAML file or one of {', '.join(RECIPES)}")
    return path


@dataclass
class SFTSettings:
    """How :func:`~safety_layers.align.train.train_sft` optimises: AdamW, linear warmup then
    linear decay to zero, gradients clipped to norm ``grad_clip``."""

    method: Method = "full"
    lr: float = 3e-5
    epochs: float = 2.0
    batch_size: int = 16
    max_length: int = 128
    warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prefix_cache: bool = True     # run the prefix all examples share once per step, without gradient
    kind_weights: dict = field(default_factory=dict)   # loss weight per Example.kind, e.g. {"benign": 2.0}
    opening_tokens: int = 4       # how many first reply tokens opening_weight covers
    opening_weight: float = 1.0   # loss weight of those tokens, where refuse-or-answer is decided
    unlikelihood_weight: float = 0.0   # weight of -log(1 - P(Example.avoid)) against the response loss
    frozen_layers: str | None = None   # blocks (0-based inclusive range) whose parameters stay fixed
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    training_args: dict = field(default_factory=dict)  # TrainingArguments overrides (distributed, precision...)
    checkpoint_seconds: float = 300.0  # with a checkpoint folder: training time between checkpoints (0: every step)
