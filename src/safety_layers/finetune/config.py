"""What one fine-tuning run does (:class:`FinetuneConfig`) and the Trainer's defaults.

``safety-layers finetune`` makes FinetuneConfig's command-line fields its flags and passes
every other flag to ``TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..core.config import settle
from ..core.errors import SafetyLayersError
from ..core.placement import device_settings

METHODS = ("sppft", "full", "freeze", "lora", "sppft-lora")
BAND_METHODS = ("sppft", "freeze", "sppft-lora")
LORA_METHODS = ("lora", "sppft-lora")


@dataclass
@device_settings
class FinetuneConfig:
    """Settings of one fine-tuning run (``safety-layers finetune``); Trainer flags pass through separately."""

    model: str = field(default="demo", metadata={
        "help": "model: alias (demo, smollm2-135m-instruct), local folder, .gguf file or Hugging Face id"})
    data: str | None = field(default=None, metadata={
        "help": "training data: JSON list or JSONL of {instruction, input, output} (see `safety-layers scenario`)"})
    method: Literal["sppft", "full", "freeze", "lora", "sppft-lora"] = field(default="sppft", metadata={
        "help": "sppft: freeze the band's attention+MLP; full: train all; freeze: sppft mechanics on another band "
                "(ablation); lora: LoRA on all layers; sppft-lora: LoRA on every layer except the band"})
    layers: str | None = field(default=None, metadata={
        "help": "band to freeze / skip, 0-based inclusive, e.g. 6-12"})
    locate: str | None = field(default=None, metadata={
        "help": "read the band from a locate result (its result.json or run folder)"})
    freeze_norms: bool = field(default=False, metadata={
        "help": "also freeze the band's layer norms (the paper's code leaves them trainable)", "cli": False})
    template: str | None = field(default=None, metadata={
        "help": "prompt template: chat (the model's own), alpaca (the paper's), alpaca_short, plain",
        "default": "chat", "paper": "alpaca"})
    train_on_inputs: bool | None = field(default=None, metadata={
        "help": "compute the loss on prompt tokens too (the paper's code does); default: response only",
        "cli": False, "default": False, "paper": True})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template and loss on prompt + response, where not set otherwise"})
    max_length: int = field(default=256, metadata={"help": "truncate each example to this many tokens (paper: 256)"})
    limit: int | None = field(default=None, metadata={
        "help": "use only the first LIMIT rows of the data", "cli": False})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (methods lora and sppft-lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha", "cli": False})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout", "cli": False})
    merge_lora: bool = field(default=False, metadata={
        "help": "merge the LoRA weights and save a full model instead of an adapter", "cli": False})
    out: str | None = field(default=None, metadata={
        "help": "final model/adapter folder (default: <output_dir>/model or <output_dir>/adapter)", "cli": False})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing final folder and delete earlier checkpoints in output_dir"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last checkpoint in output_dir (flag: --resume-from-checkpoint last)", "cli": False})
    check_memory: bool = field(default=True, metadata={
        "help": "refuse to start when the memory plan (safety-layers plan) does not fit the device", "cli": False})
    check_disk: bool = field(default=True, metadata={
        "help": "refuse to start when the disk cannot hold a checkpoint and the final model", "cli": False})
    paper_set: list = field(init=False, default_factory=list, metadata={
        "help": "what paper mode set (fields the user left unset)", "cli": False})

    def __post_init__(self):
        self.paper_set = settle(self)
        if self.method not in METHODS:
            raise SafetyLayersError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.max_length < 8:
            raise SafetyLayersError(f"--max_length must be at least 8 tokens, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise SafetyLayersError(f"--limit must be at least 1, got {self.limit}")
        if self.device_map:
            raise SafetyLayersError("finetune spreads a model over GPUs with FSDP or DeepSpeed ZeRO-3 (accelerate launch "
                                    "--config_file examples/accelerate-fsdp.yaml), not device_map")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise SafetyLayersError("LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")


def default_training_args(output_dir: str | Path, **overrides):
    """TrainingArguments with this package's defaults (batch 4, 3 epochs, lr 1e-4, one checkpoint per epoch).

    The paper's per-model learning rates are in its Table 6 (§4.3); pass them explicitly.
    """
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=3,
                learning_rate=1e-4, logging_steps=10, save_strategy="epoch", save_total_limit=1,
                report_to="none", seed=42)
    base.update(overrides)
    return TrainingArguments(**base)
