"""Fine-tuning with the safety layers frozen (SPPFT) and the baselines, on the Hugging Face Trainer.

Modules: ``config`` (FinetuneConfig, the command line), ``data`` (tokenization and the
collator every trainer of the package shares), ``methods`` (the band, freezing, LoRA),
``callbacks`` (the frozen-parameter check), ``trainer`` (disk, resume, optimizer state),
``export`` (PEFT and Axolotl settings), ``run`` (prepare, train, save). The paper's baselines
that need more than freezing have a module each (``nfft``, ``lisa``, ``rdpo``, their data in
``baseline_data``), loaded when a run uses them.
"""

from .config import METHODS, FinetuneConfig, default_training_args
from .data import Encoded, PadCollator, encode_ids, tokenize_rows
from .export import export_axolotl, export_peft_config, lora_target_modules, skeleton, unfrozen_patterns
from .methods import FreezePlan, add_lora, apply_method, freeze, read_band, resolve_band
from .run import FinetuneResult, Prepared, finetune, prepare, train_and_save
from .trainer import estimate_bytes, optimizer_state_bytes

__all__ = ["METHODS", "Encoded", "FinetuneConfig", "FinetuneResult", "FreezeCheckCallback", "FreezePlan",
           "PadCollator", "Prepared", "add_lora", "apply_method", "default_training_args", "encode_ids",
           "estimate_bytes", "export_axolotl", "export_peft_config", "finetune", "freeze", "lora_target_modules",
           "optimizer_state_bytes", "prepare", "read_band", "resolve_band", "skeleton",
           "tokenize_rows", "train_and_save", "unfrozen_patterns"]


def __getattr__(name):          # the callback class is built on first use (importing transformers costs seconds)
    if name == "FreezeCheckCallback":
        from .callbacks import freeze_check_class

        return freeze_check_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
