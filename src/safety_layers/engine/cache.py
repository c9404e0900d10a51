"""KV caches: the one place that makes transformers' cache objects and changes their layers.

Two subclasses of transformers' ``DynamicLayer`` serve our two prefill paths:

- ``"buffered"`` (generation): ``DynamicLayer`` grows by ``torch.cat``, copying the whole
  cache at every decode step (a quarter of decode time on CPU at 32 new tokens). This layer
  allocates room for the whole generation once and writes each step in place;
  ``keys``/``values`` are views.
- ``"frozen"`` (activations): holds a shared prompt prefix's keys and values for one row;
  each batch reads them broadcast to its size and its own keys and values are not kept, so
  the cache neither copies the prefix per row nor grows with the batch's tokens.

Both are built by :func:`layer_class` on first use (transformers is imported only then) and
replace only plain ``DynamicLayer``s (:func:`plain_layers`): sliding-window and other layers
keep their own logic.
"""

from __future__ import annotations

import functools
import inspect
from typing import Literal

import torch

LayerKind = Literal["buffered", "frozen"]


# --------------------------------------------------------------------------- forward arguments

@functools.cache
def _cache_arg_name() -> str:
    """The forward's KV-cache argument: ``cache`` in recent transformers (which warns on the
    old ``past_key_values`` name), ``past_key_values`` before."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """Keyword arguments that pass ``cache`` to a decoder forward and ask it to be filled."""
    return {_cache_arg_name(): cache, "use_cache": True}


def output_cache(out):
    """The KV cache a forward returned, under either transformers name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# --------------------------------------------------------------------------- our layers

@functools.cache
def layer_class(kind: LayerKind) -> type:
    """Our ``DynamicLayer`` subclass of that kind (one class per kind, made on first use)."""
    from transformers.cache_utils import DynamicLayer

    return {"buffered": _buffered_layer, "frozen": _frozen_prefix_layer}[kind](DynamicLayer)


def _buffered_layer(base: type) -> type:
    class BufferedLayer(base):
        """Room for ``capacity`` positions, allocated once and written in place."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self._k = self._v = None
            self._n = 0

        def _view(self):
            self.keys, self.values = self._k[..., :self._n, :], self._v[..., :self._n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            q = key_states.shape[-2]
            if self._k is None or self._n + q > self._k.shape[-2]:
                room = max(self.capacity, 2 * (self._n + q))
                k = key_states.new_empty((*key_states.shape[:-2], room, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:-2], room, value_states.shape[-1]))
                if self._n:
                    k[..., :self._n, :], v[..., :self._n, :] = self.keys, self.values
                self._k, self._v = k, v
            self._k[..., self._n:self._n + q, :] = key_states
            self._v[..., self._n:self._n + q, :] = value_states
            self._n += q
            self._view()
            return self.keys, self.values

        def load(self, keys, values, length: int):
            """Take over buffers [batch, heads, room, head_dim] whose first ``length`` columns are filled."""
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            self._k, self._v, self._n = keys, values, length
            self._view()

        def reset(self):
            self._k = self._v = None
            self._n = 0
            super().reset()

        def crop(self, tokens_to_remove: int):
            if tokens_to_remove < 0 and self._n:
                self._n = max(0, self._n + tokens_to_remove)
                self._view()
            elif tokens_to_remove > 0:
                super().crop(tokens_to_remove)  # raises like the parent

        def batch_repeat_interleave(self, repeats: int):
            if self._n:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._view()

        def batch_select_indices(self, indices):
            if self._n:
                self._k, self._v = self._k[indices, ...], self._v[indices, ...]
                self._view()

        def reorder_cache(self, beam_idx):
            self.batch_select_indices(beam_idx.to(self._k.device) if self._n else beam_idx)

    return BufferedLayer


def _frozen_prefix_layer(base: type) -> type:
    class FrozenPrefixLayer(base):
        """A one-row prefix, read broadcast to each batch; nothing is appended."""

        def update(self, key_states, value_states, *args, **kwargs):
            b = key_states.shape[0]
            return (torch.cat([self.keys.expand(b, -1, -1, -1), key_states], dim=-2),
                    torch.cat([self.values.expand(b, -1, -1, -1), value_states], dim=-2))

    return FrozenPrefixLayer


def _is(layer, kind: LayerKind) -> bool:
    return type(layer) is layer_class(kind)


def plain_layers(cache, upto: int | None = None) -> bool:
    """Whether the cache's layers (0..upto, default all) are plain ``DynamicLayer``s, the only
    kind our subclasses may replace."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    return all(type(l).__name__ == "DynamicLayer" for l in layers[: None if upto is None else upto + 1])


def is_buffered(cache) -> bool:
    """Every layer is a ``"buffered"`` one (so chunked prefill may lay caches side by side)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(_is(l, "buffered") for l in layers)


def can_share_prefix(cache) -> bool:
    """Only plain or buffered layers can be repeated across rows and pruned by row."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(l).__name__ == "DynamicLayer" or _is(l, "buffered") for l in layers) \
        and hasattr(cache, "batch_repeat_interleave")


# --------------------------------------------------------------------------- making caches

def new_cache(model, capacity: int | None = None):
    """A DynamicCache for ``model`` (None on a transformers without one); with ``capacity``
    its plain layers are ``"buffered"`` layers with that much room."""
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - very old transformers
        return None
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56 takes no config
        return DynamicCache()
    if capacity and plain_layers(cache):
        cls = layer_class("buffered")
        cache.layers = [cls(capacity) for _ in cache.layers]
    return cache


def freeze_prefix(cache, upto: int) -> bool:
    """Turn the filled plain layers 0..upto into ``"frozen"`` prefix layers; False (nothing
    changed) when some of them are not plain."""
    if not plain_layers(cache, upto):
        return False
    for layer in cache.layers[: upto + 1]:
        layer.__class__ = layer_class("frozen")
    cache.frozen = True
    return True
