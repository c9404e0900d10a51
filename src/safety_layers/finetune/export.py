"""Fine-tuning settings for other tools: a PEFT ``LoraConfig`` that skips the band, and
Axolotl ``unfrozen_parameters`` that reproduce SPPFT. Both read the model's structure only,
so a model name or folder is enough (no weights are loaded)."""

from __future__ import annotations

import torch

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.models import PAPER_COMPONENTS, Blocks


def lora_target_modules(blocks: Blocks, components=PAPER_COMPONENTS) -> list[str]:
    """LoRA target names from the ArchSpec (``q_proj``..., ``qkv_proj`` on phi3, ``c_attn`` on gpt2):
    every attention and MLP matrix, the package's one LoRA target list."""
    return sorted({path.rsplit(".", 1)[-1] for n, path in blocks.spec.components.items() if n in components})


def skeleton(name: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model's structure without its weights (meta tensors), built from its config: exports
    and memory plans need parameter names and shapes only, so an 8B model costs nothing to describe."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.models import load_model, model_location

    kind, loc = model_location(name)
    if kind == "gguf":
        return load_model(name, device="cpu", dtype=dtype or "float32").model
    try:
        config = AutoConfig.from_pretrained(loc)
    except (OSError, ValueError) as e:
        raise SafetyLayersError(f"cannot read the config of {name!r}: {str(e).splitlines()[0][:200]}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))


def _blocks_of(model) -> tuple[torch.nn.Module, Blocks]:
    from ..core.models import LoadedModel, find_blocks

    if isinstance(model, str):
        model = skeleton(model)
    if isinstance(model, LoadedModel):
        return model.model, model.blocks
    return model, find_blocks(model)


def export_peft_config(band: LayerRange | str | None, model, *, r: int = 16, alpha: int = 32,
                       dropout: float = 0.05, components=PAPER_COMPONENTS):
    """A PEFT ``LoraConfig`` that puts adapters on every layer except ``band`` (all layers if None).

    ``model``: a LoadedModel, a module, or a model name/folder (read as a weightless skeleton).

    ``layers_to_transform`` is the explicit list of the other layers and ``layers_pattern``
    names the block list, so the band gets no LoRA weights at all.
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    module, blocks = _blocks_of(model)
    n = len(blocks)
    keep = None
    if band is not None:
        band = LayerRange.parse(band).check(n)
        keep = [i for i in range(n) if i not in band]
        if not keep:
            raise SafetyLayersError(f"the band {band} covers all {n} layers: no layer is left for LoRA; "
                                    "use --method lora or a narrower band")
    first = blocks.component(0, next(c for c in components if c in blocks.spec.components))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora_target_modules(blocks, components), layers_to_transform=keep,
                      layers_pattern=blocks.layers_path.rsplit(".", 1)[-1] if keep is not None else None,
                      fan_in_fan_out=isinstance(first, Conv1D))


def _name_pattern(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "(" + "|".join(names) + ")"


def unfrozen_patterns(band: LayerRange | str, model, freeze_norms: bool = False) -> list[str]:
    """Regexes matching every parameter SPPFT trains (Axolotl's ``unfrozen_parameters`` dialect:
    matched with ``re.match``, a ``.`` is a literal dot, ``.+`` a wildcard)."""
    module, blocks = _blocks_of(model)
    band = LayerRange.parse(band).check(len(blocks))
    frozen = set(blocks.parameters(band, norms=freeze_norms))
    prefix = blocks.layers_path + "."
    outside, band_kept = [], {}
    for name, _ in module.named_parameters():
        if not name.startswith(prefix):
            outside.append(f"^{name}$")
            continue
        layer, rest = name[len(prefix):].split(".", 1)
        if int(layer) in band and name not in frozen:
            band_kept.setdefault(rest, []).append(layer)
    others = [str(i) for i in range(len(blocks)) if i not in band]
    pats = outside
    if others:
        pats.append(f"^{blocks.layers_path}.{_name_pattern(others)}.")
    by_layers: dict[tuple, list[str]] = {}
    for rest, layers in band_kept.items():
        by_layers.setdefault(tuple(layers), []).append(rest)
    for layers, rests in by_layers.items():
        pats.append(f"^{blocks.layers_path}.{_name_pattern(list(layers))}.{_name_pattern(sorted(rests))}$")
    return pats


def export_axolotl(band: LayerRange | str, model, freeze_norms: bool = False) -> str:
    """A YAML block of Axolotl ``unfrozen_parameters`` reproducing SPPFT on ``band``.

    ``model``: a LoadedModel, a module, or a model name/folder (read as a weightless skeleton).
    """
    import yaml

    from ..core import __version__

    module, blocks = _blocks_of(model)
    band = LayerRange.parse(band).check(len(blocks))
    what = "attention, MLP and norms" if freeze_norms else "attention and MLP"
    head = (f"# SPPFT: layers {band} (0-based, inclusive) have their {what} frozen; every other parameter "
            f"trains.\n# {type(module).__name__}, {len(blocks)} layers; written by safety-layers {__version__}.\n"
            "# Axolotl freezes every parameter that no pattern matches (re.match, '.' is a literal dot).\n")
    return head + yaml.safe_dump({"unfrozen_parameters": unfrozen_patterns(band, module, freeze_norms)},
                                 sort_keys=False, width=1000)
