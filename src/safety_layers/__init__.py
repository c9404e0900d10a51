"""safety-layers: find the safety layers of an aligned chat LLM and fine-tune it without losing them.

Implements "Safety Layers in Aligned Large Language Models" (Li et al., ICLR 2025) and goes
beyond it. Layer indices are 0-based and ranges inclusive everywhere: ``6-12`` is blocks 6..12.
"""

__version__ = "0.1.0"

from .analysis import AnalyzeConfig, AnalyzeResult, analyze  # noqa: E402
from .data import PromptSet, load_prompts  # noqa: E402
from .errors import SafetyLayersError  # noqa: E402
from .layers import LayerRange  # noqa: E402
from .models import LoadedModel, find_blocks, load_model, save_model  # noqa: E402

__all__ = ["AnalyzeConfig", "AnalyzeResult", "analyze", "PromptSet", "load_prompts", "SafetyLayersError",
           "LayerRange", "LoadedModel", "find_blocks", "load_model", "save_model", "__version__"]
