"""Safety alignment by supervised fine-tuning: how a model without refusals gets them.

Modules: ``config`` (AlignConfig, recipes, SFTSettings), ``data`` (training pairs, held-out
prompts, self-distillation), ``loss`` (the weighted response loss), ``train`` (the SFT
Trainer), ``run`` (:func:`align`: data, training, held-out refusal, the saved model).
"""

from .config import AlignConfig, SFTSettings, recipe_path
from .data import Example, build_data, self_distill
from .run import AlignResult, align, read_manifest
from .train import TrainStats, train_sft

__all__ = ["AlignConfig", "AlignResult", "Example", "SFTSettings", "TrainStats", "align", "build_data",
           "read_manifest", "recipe_path", "self_distill", "train_sft"]
