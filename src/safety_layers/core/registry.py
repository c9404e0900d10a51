"""Lazy registries: a name maps to an object, or to ``"module:attribute"`` imported on first use.

One mechanism for every "pick by name" in the package (built models, judges, fine-tuning
methods, scenarios), after lm-eval's registry: optional heavy backends cost nothing until a
user asks for them, and an unknown name fails with the valid ones and a close match.
This module imports nothing heavy, so the package can fill registries at import time.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from .errors import SafetyLayersError


class Registry:
    """Names -> objects (resolved lazily from ``"module:attribute"`` strings)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any, *, replace: bool = False) -> Any:
        """Add ``name``; registering a different entry under a taken name needs ``replace``."""
        old = self._entries.get(name)
        if old is not None and not replace and _key(old) != _key(entry):
            raise SafetyLayersError(f"{self.kind} name {name!r} is already registered to {_key(old)}; pick another name")
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Any:
        """The object registered as ``name``, imported on first use."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SafetyLayersError(f"unknown {self.kind} {name!r}; {hint}valid: {', '.join(self.names()) or '(none)'}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry


def _key(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    return f"{getattr(entry, '__module__', '?')}:{getattr(entry, '__qualname__', repr(entry))}"


#: Named models built on first use (``demo``): name -> a function returning the model's folder.
#: The package's ``__init__`` registers its own; ``safety_layers.register_model`` adds yours.
BUILT_MODELS = Registry("built model")
