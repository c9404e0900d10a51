"""safety-layers: find the safety layers of an aligned chat LLM and fine-tune it without losing them.

Implements "Safety Layers in Aligned Large Language Models" (Li et al., ICLR 2025) and goes
beyond it. Layer indices are 0-based and ranges inclusive everywhere: ``6-12`` is blocks 6..12.

One config and one verb per step, callable one after another in a notebook::

    from safety_layers import AnalyzeConfig, FinetuneConfig, LocateConfig, analyze, load_model
    from safety_layers.locate import locate
    from safety_layers.finetune import finetune
    lm = load_model("demo")
    res = analyze(AnalyzeConfig(), model=lm)
    band = locate(LocateConfig(), model=lm).safety_layers
    finetune(FinetuneConfig(data="train.json", layers=f"{band[0]}-{band[1]}"), model=lm)

The verbs named like their module (``align``, ``evaluate``, ``finetune``, ``locate``) are
imported from that module, so ``safety_layers.finetune`` always means the module. Names are
imported on first use, so ``import safety_layers`` (and the CLI's ``--help``) stays fast.
"""

from importlib import import_module

from .core import __version__

_EXPORTS = {
    "analysis": ("AnalyzeConfig", "AnalyzeResult", "analyze"),
    "align": ("AlignConfig", "AlignResult"),
    "core.data": ("PromptSet", "load_prompts"),
    "core.errors": ("SafetyLayersError",),
    "core.layers": ("LayerRange",),
    "core.models": ("LoadedModel", "find_blocks", "load_model", "register_model", "save_model"),
    "core.scaling": ("scaled_layers",),
    "engine.generation": ("GenerationSettings", "generate"),
    "evaluate": ("EvaluateConfig", "EvaluateResult", "harmful_rate"),
    "experiment": ("ExperimentConfig", "run_experiment"),
    "finetune": ("FinetuneConfig", "FinetuneResult"),
    "judges": ("get_judge", "list_judges"),
    "locate": ("LocateConfig", "LocateResult"),
    "recipes.demo_model": ("build_demo",),
    "report": ("write_report",),
    "scenarios": ("ScenarioConfig", "build_scenario"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["__version__"]


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'safety_layers' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


def _register_builtin_models() -> None:
    """Named models of this package, built on first use: ``demo`` is the aligned demo model."""
    from .core.registry import BUILT_MODELS

    BUILT_MODELS.register("demo", "safety_layers.recipes.demo_model:build_demo")


_register_builtin_models()
