"""Existence analysis: layer-wise cosine statistics of normal vs malicious prompts.

:mod:`.curves` holds the statistics (pure functions on tensors), :mod:`.plots` the figures,
:mod:`.run` the step itself.
"""

from .curves import Curves
from .run import AnalyzeConfig, AnalyzeResult, analyze

__all__ = ["AnalyzeConfig", "AnalyzeResult", "Curves", "analyze"]
