"""Scale the weights of a layer band in place, and put them back exactly.

The paper's localization multiplies "the parameters of a layer" by alpha (docs/paper.md §3.1):
in its code (Llama, Phi-3, Gemma 1, no biases, no q/k norms), the attention q, k, v, o and
MLP gate, up, down weight matrices. Here "the parameters of a layer" are one definition,
:meth:`core.models.Blocks.parameter_paths`, that freezing uses too: each projection's weight
*and bias*, so every scaled projection's output is alpha times its unscaled output on every
architecture, and the gain of a q/k norm after q or k, so q and k come out scaled by alpha
as they do without such a norm (a gemma-style ``1 + w`` gain is set to ``alpha * (1 + w) - 1``).
Block norms and embeddings stay as they are. What that does to a layer's output, per
architecture, is :data:`SCALING_EFFECTS`.

``scaled_layers`` scales in place on the loaded model (no copy, no reload per candidate)
and restores the saved originals on exit, also after an exception, so the weights are
bit-identical afterwards (we copy the originals back rather than dividing by alpha, which
would not round-trip in floating point).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch

from .errors import SafetyLayersError
from .layers import LayerRange
from .models import NO_O_PROJ_COMPONENTS, PAPER_COMPONENTS, LoadedModel

#: named choices of what to scale; "paper" is the GitHub code, "no-o-proj" the OpenReview
#: submission's code, which never wrote the scaled o_proj back into the model
COMPONENT_SETS = {"paper": PAPER_COMPONENTS, "no-o-proj": NO_O_PROJ_COMPONENTS,
                  "attn": tuple(c for c in PAPER_COMPONENTS if c.startswith("attn.")),
                  "mlp": tuple(c for c in PAPER_COMPONENTS if c.startswith("mlp."))}


_PLAIN = ("attention logits x alpha^2 (q, k), attention output x alpha^2 (v, o), MLP output x alpha "
          "(down) on top of the changed activation of alpha-scaled gate/up")
#: model type -> what scaling every paper component of a block by alpha does to its output
SCALING_EFFECTS = {
    **dict.fromkeys(("llama", "mistral", "gemma", "phi3"), _PLAIN + "; no biases, as in the paper's code"),
    "qwen2": _PLAIN + "; the q, k, v biases are scaled with their matrices, so q, k, v are exactly x alpha",
    **dict.fromkeys(("gpt2", "gpt_neox"), _PLAIN + "; every projection's bias is scaled with its matrix, so each "
                    "projection's output is exactly x alpha (the fused qkv scales q, k and v alike)"),
    "qwen3": _PLAIN + "; the q/k norms would undo the scaling of q and k, so their gains are scaled by alpha too "
             "and q, k come out x alpha",
    "olmo2": _PLAIN + "; the q/k norms' gains are scaled by alpha so q, k come out x alpha, but the "
             "post-attention and post-feedforward norms renormalise both sublayer outputs, so the block's output "
             "changes only through the softmax and the MLP's activation",
    "gemma2": _PLAIN + "; but the post-attention and post-feedforward norms renormalise both sublayer outputs, "
              "so the block's output changes only through the sharper/flatter softmax and the MLP's activation, "
              "not by the alpha factors",
    **dict.fromkeys(("gemma3", "gemma3_text"), _PLAIN + "; the q/k norms' 1 + w gains become alpha * (1 + w) so q, k "
                    "come out x alpha, but the post-attention and post-feedforward norms renormalise both sublayer "
                    "outputs, so the block's output changes only through the softmax and the MLP's activation"),
}


def resolve_components(components: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(components, str):
        if components not in COMPONENT_SETS:
            raise SafetyLayersError(
                f"unknown component set {components!r}: use one of {', '.join(COMPONENT_SETS)} or a list of names")
        return COMPONENT_SETS[components]
    return tuple(components)


def _layer_list(model: LoadedModel, layers) -> list[int]:
    if isinstance(layers, (LayerRange, str, tuple)):
        return LayerRange.parse(layers).check(len(model.blocks)).indices
    out = list(layers)
    for i in out:
        LayerRange(i, i).check(len(model.blocks))
    return out


@contextmanager
def scaled_layers(model: LoadedModel, layers, alpha: float, components: str | Iterable[str] = "paper"):
    """Within the block, the band's chosen weights are multiplied by ``alpha``.

    ``layers``: a LayerRange, ``"6-12"`` (0-based, inclusive) or a list of indices.
    ``components``: ``"paper"`` (q, k, v, o, gate, up, down; fused phi3/gpt2 projections
    scaled as a whole, which equals scaling their parts alike), ``"no-o-proj"``, ``"attn"``,
    ``"mlp"`` or a list of canonical names; each with its bias and q/k norm gain
    (:meth:`Blocks.layer_parameters`). Yields the list of scaled parameter names.
    """
    if not alpha > 0:
        raise SafetyLayersError(f"alpha must be > 0, got {alpha}: use alpha > 1 to amplify a band, < 1 to weaken it")
    names = resolve_components(components)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    scaled: list[str] = []
    try:
        with torch.no_grad():
            offset = model.blocks.norm_offset
            for i in _layer_list(model, layers):
                for name, w in model.blocks.layer_parameters(i, names).items():
                    saved.append((w, w.detach().clone()))
                    w.mul_(alpha)
                    if offset and ".norm." in name:     # gain 1 + w -> alpha * (1 + w)
                        w.add_(offset * (alpha - 1))
                    scaled.append(f"blocks.{i}.{name}")
        if not scaled:
            raise SafetyLayersError(f"no weights matched components {list(names)} in this architecture")
        yield scaled
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
