"""Fine-tuning with the safety layers frozen (SPPFT) and the baselines, on the Hugging Face Trainer."""

from .run import FinetuneConfig, FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]
