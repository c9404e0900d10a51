"""Attention weights of a causal LM: the eager kernel for one pass, then the model as it was.

Fused kernels (SDPA, flash attention) never materialise the attention matrix, so reading it
needs the eager implementation. :func:`eager_attention` switches a model to it for the
duration of a ``with`` block and restores the implementation it had, also when the block
raises; :func:`last_token_attention` runs one prompt and returns, per layer, how the last
position attends to every position, averaged over heads.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..core.errors import SafetyLayersError


def attention_implementation(model: torch.nn.Module) -> str | None:
    """The attention kernel a model's config names (``eager``, ``sdpa``, ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@contextmanager
def eager_attention(model: torch.nn.Module):
    """Run the block with the eager attention kernel; the previous kernel comes back on exit."""
    before = attention_implementation(model)
    if before == "eager":
        yield model
        return
    if not hasattr(model, "set_attn_implementation"):
        raise SafetyLayersError(f"{type(model).__name__} cannot switch its attention kernel: attention maps need "
                                "a transformers model that supports attn_implementation='eager'")
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def last_token_attention(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    """``[layers, seq]``: the last position's attention to each position, mean over heads (float32).

    Call it inside :func:`eager_attention`; a kernel that returns no weights is an error, never
    a silent zero map.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True, use_cache=False)
    maps = out.attentions
    if not maps or any(a is None for a in maps):
        raise SafetyLayersError("the model returned no attention weights: run it inside eager_attention(model)")
    # each map: [batch=1, heads, query, key]; keep the last query row
    return torch.stack([a[0, :, -1, :].float().mean(0) for a in maps]).cpu()
