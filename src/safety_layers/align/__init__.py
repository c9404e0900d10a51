"""Safety alignment by supervised fine-tuning: how a model without refusals gets them."""

from .run import AlignConfig, AlignResult, align, self_distill

__all__ = ["AlignConfig", "AlignResult", "align", "self_distill"]
