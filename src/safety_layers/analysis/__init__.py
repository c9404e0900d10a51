"""Existence analysis: layer-wise cosine statistics of normal vs malicious prompts."""

from .run import AnalyzeConfig, AnalyzeResult, analyze

__all__ = ["AnalyzeConfig", "AnalyzeResult", "analyze"]
