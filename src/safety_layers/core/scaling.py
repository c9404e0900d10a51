"""Scale the weights of a layer band in place, and put them back exactly.

The paper's localization multiplies "the parameters of a layer" by alpha (docs/paper.md §3.1):
in its code, the attention q, k, v, o and MLP gate, up, down weight matrices; norms,
biases and embeddings stay as they are. ``scaled_layers`` does that in place on the loaded
model (no copy, no reload per candidate) and restores the saved originals on exit, also
after an exception, so the weights are bit-identical afterwards (we copy the originals
back rather than dividing by alpha, which would not round-trip in floating point).
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
    ``"mlp"`` or a list of canonical names. Yields the list of scaled parameter names.
    """
    if not alpha > 0:
        raise SafetyLayersError(f"alpha must be > 0, got {alpha}: use alpha > 1 to amplify a band, < 1 to weaken it")
    names = resolve_components(components)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    scaled: list[str] = []
    try:
        with torch.no_grad():
            for i in _layer_list(model, layers):
                for name, w in model.blocks.weights(i, names).items():
                    saved.append((w, w.detach().clone()))
                    w.mul_(alpha)
                    scaled.append(f"blocks.{i}.{name}")
        if not scaled:
            raise SafetyLayersError(f"no weights matched components {list(names)} in this architecture")
        yield scaled
    finally:
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)
