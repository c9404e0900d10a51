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
from ..core.registry import Registry

#: The baselines that need more than freezing: name -> the module that sets up their training
#: (:class:`~safety_layers.finetune.methods.MethodSetup`), imported when a run uses it.
METHOD_MODULES = Registry("fine-tuning method")
METHOD_MODULES.register("nfft", "safety_layers.finetune.nfft:NFFT")
METHOD_MODULES.register("lisa", "safety_layers.finetune.lisa:LISA")
METHOD_MODULES.register("rdpo", "safety_layers.finetune.rdpo:RDPO")
METHOD_MODULES.register("rdpo-sppft", "safety_layers.finetune.rdpo:RDPO_SPPFT")

METHODS = ("sppft", "full", "freeze", "lora", "sppft-lora", "nfft", "lisa", "rdpo", "rdpo-sppft")
BAND_METHODS = ("sppft", "freeze", "sppft-lora", "nfft", "rdpo-sppft")
LORA_METHODS = ("lora", "sppft-lora")
#: FinetuneConfig settings of the baselines (an experiment's ``method_options``).
BASELINE_FIELDS = ("alignment_data", "nfft_utility_top", "nfft_samples", "nfft_utility", "nfft_scores",
                   "lisa_alignment_steps", "lisa_finetune_steps", "lisa_rho", "compliant_model", "rdpo_beta",
                   "rdpo_tokens", "rdpo_prompts", "rdpo_pairs")
#: Methods that train on something else than ``data`` (reverse DPO: preference pairs it builds).
DATALESS_METHODS = ("rdpo", "rdpo-sppft")


@dataclass
@device_settings
class FinetuneConfig:
    """Settings of one fine-tuning run (``safety-layers finetune``); Trainer flags pass through separately."""

    model: str = field(default="demo", metadata={
        "help": "model: alias (demo, smollm2-135m-instruct), local folder, .gguf file or Hugging Face id"})
    data: str | None = field(default=None, metadata={
        "help": "training data: JSON list or JSONL of {instruction, input, output} (see `safety-layers scenario`)"})
    method: Literal["sppft", "full", "freeze", "lora", "sppft-lora", "nfft", "lisa", "rdpo", "rdpo-sppft"] = field(
        default="sppft", metadata={
            "help": "sppft: freeze the band's attention+MLP; full: train all; freeze: sppft mechanics on another "
                    "band (ablation); lora / sppft-lora: LoRA everywhere / but the band; nfft: freeze as many "
                    "safety-critical weights as the band holds; lisa: Lisa bi-state training; rdpo / rdpo-sppft: "
                    "reverse DPO (the band frozen)"})
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
    alignment_data: str | None = field(default=None, metadata={
        "help": "lisa, nfft, rdpo: prompt/response refusal pairs (default: the bundled malicious prompts with the "
                "bundled refusals)", "cli": False})
    nfft_utility_top: float | None = field(default=None, metadata={
        "help": "nfft: utility share p left out per matrix (Wei et al.'s top-p); None: p = q", "cli": False})
    nfft_samples: int = field(default=128, metadata={
        "help": "nfft: safety and utility examples each that score the weights (Wei et al.: 128)", "cli": False})
    nfft_utility: str | None = field(default=None, metadata={
        "help": "nfft utility data: instruction/output file (default: bundled benign prompts, the model's answers)",
        "cli": False})
    nfft_scores: str | None = field(default=None, metadata={
        "help": "nfft: SNIP scores file, written once, reused (default <output_dir>/nfft_scores.safetensors)",
        "cli": False})
    lisa_alignment_steps: int = field(default=100, metadata={
        "help": "lisa: steps on alignment data per round (Lisa paper: 100)", "cli": False})
    lisa_finetune_steps: int = field(default=900, metadata={
        "help": "lisa: steps on the user's data per round (Lisa paper: 900)", "cli": False})
    lisa_rho: float = field(default=1.0, metadata={
        "help": "lisa: proximal weight rho pulling each state to the other's weights (Lisa paper: 1)", "cli": False})
    compliant_model: str | None = field(default=None, metadata={
        "help": "rdpo: model whose answers to malicious prompts are the preferred replies (demo: the bare SmolLM2)"})
    rdpo_beta: float = field(default=0.1, metadata={"help": "rdpo: DPO beta (TRL's default)", "cli": False})
    rdpo_tokens: int = field(default=128, metadata={
        "help": "rdpo: tokens generated for each compliant reply", "cli": False})
    rdpo_prompts: int | None = field(default=None, metadata={
        "help": "rdpo: malicious prompts the pairs are built from (None: all of the alignment data)", "cli": False})
    rdpo_pairs: str | None = field(default=None, metadata={
        "help": "rdpo: preference pairs file, built once, reused (default <output_dir>/rdpo_pairs.jsonl)",
        "cli": False})
    paper_set: list = field(init=False, default_factory=list, metadata={
        "help": "what paper mode set (fields the user left unset)", "cli": False})

    def __post_init__(self):
        self.paper_set = settle(self)
        if self.method not in METHODS:
            raise SafetyLayersError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        self._check_baselines()
        if self.max_length < 8:
            raise SafetyLayersError(f"--max_length must be at least 8 tokens, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise SafetyLayersError(f"--limit must be at least 1, got {self.limit}")
        if self.device_map:
            raise SafetyLayersError("finetune spreads a model over GPUs with FSDP or DeepSpeed ZeRO-3 (accelerate launch "
                                    "--config_file examples/accelerate-fsdp.yaml), not device_map")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise SafetyLayersError("LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")

    def _check_baselines(self) -> None:
        if self.nfft_utility_top is not None and not 0 < self.nfft_utility_top < 1:
            raise SafetyLayersError(f"nfft_utility_top is a share in (0, 1), got {self.nfft_utility_top}")
        if self.nfft_samples < 1 or self.rdpo_tokens < 1 or (self.rdpo_prompts is not None and self.rdpo_prompts < 1):
            raise SafetyLayersError("nfft_samples, rdpo_tokens and rdpo_prompts must be at least 1")
        if self.lisa_alignment_steps < 0 or self.lisa_finetune_steps < 1 or self.lisa_rho < 0:
            raise SafetyLayersError("lisa needs lisa_alignment_steps >= 0, lisa_finetune_steps >= 1 and lisa_rho >= 0")
        if self.rdpo_beta <= 0:
            raise SafetyLayersError(f"rdpo_beta must be > 0, got {self.rdpo_beta}")


#: The paper's Table 6 learning rates of its four models (docs/paper.md); harmful-data runs use 1e-5.
PAPER_LRS = {"meta-llama/Meta-Llama-3-8B-Instruct": 1e-4, "meta-llama/Llama-2-7b-chat-hf": 3e-4,
             "google/gemma-2b-it": 1e-4, "microsoft/Phi-3-mini-4k-instruct": 6e-4}


#: The Trainer settings paper mode fixes for every model (docs/paper.md §4.3); experiments read them too.
PAPER_TRAINING = {"warmup_steps": 100, "num_train_epochs": 3, "per_device_train_batch_size": 4}


def paper_training_args(model: str, given: set[str]) -> dict:
    """The Trainer settings paper mode fixes (:data:`PAPER_TRAINING` and Table 6's learning rate
    of the model), less those in ``given`` (set by the user)."""
    fixed = dict(PAPER_TRAINING)
    if model in PAPER_LRS:
        fixed["learning_rate"] = PAPER_LRS[model]
    return {k: v for k, v in fixed.items() if k not in given}


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
