"""Settings as dataclasses: one YAML loader, one builder from mappings, one paper-mode rule.

Every step's ``XConfig`` is a dataclass whose fields carry their documentation in
``metadata["help"]``; the CLI, YAML files and Python users fill the same classes.
Field metadata this module reads:

``help``
    one line for ``--help`` and the docs.
``cli``
    False keeps a field out of the command line (YAML and Python only): knobs for research
    on this package, not choices a user of the method makes.
``default`` / ``paper``
    for a field whose declared default is None: the value it takes when the user leaves it
    unset, ours and the paper's. :func:`settle` fills them, so ``paper=True`` sets only what
    the user did not set, and says what it set.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import SafetyLayersError

T = TypeVar("T")


def load_yaml(path: str | Path, *, documents: bool = False) -> Any:
    """The mapping in a YAML file (``documents``: the list of mappings of a ``---`` file).

    Every problem is one line naming the file: missing, not UTF-8, not YAML (with the line
    and column), not a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SafetyLayersError(f"config file not found: {path}" if not path.is_dir() else
                                f"{path} is a folder: give the path of a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SafetyLayersError(f"{path} is not UTF-8 text: save the config file as UTF-8") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SafetyLayersError(f"{path} is not valid YAML{where} ({problem}): fix the file") from None
    for d in docs:
        if not isinstance(d, dict):
            raise SafetyLayersError(f"{path}: expected a mapping of settings (key: value lines), "
                                    f"got a {type(d).__name__}")
    if documents:
        return docs
    if len(docs) > 1:
        raise SafetyLayersError(f"{path} holds {len(docs)} YAML documents (---): this command reads one")
    return docs[0] if docs else {}


def unknown_key_error(where: str, key: str, allowed, shown: str | None = None) -> SafetyLayersError:
    """``unknown key 'x' in WHERE (did you mean 'y'?); allowed: ...``; ``shown`` replaces the
    list of allowed keys when it would be too long to read."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SafetyLayersError(f"unknown key {key!r} in {where}{hint}; allowed: {shown or ', '.join(allowed)}")


def init_fields(cls) -> list[str]:
    """Names of the fields a user may set (``init=False`` fields are results, not settings)."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def check_keys(where: str, values: Mapping, allowed) -> None:
    """Raise :func:`unknown_key_error` for the first key of ``values`` not in ``allowed``."""
    if not isinstance(values, Mapping):
        raise SafetyLayersError(f"{where} must be a mapping of settings, got {type(values).__name__}")
    allowed = set(allowed)
    for key in values:
        if key not in allowed:
            raise unknown_key_error(where, key, allowed)


def from_mapping(cls: type[T], values: Mapping | None, where: str, **fixed) -> T:
    """``cls(**values, **fixed)`` after checking the keys; a config saved by a run (with its
    ``init=False`` result fields) reads back too."""
    values = dict(values or {})
    names = init_fields(cls)
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}
    check_keys(where, {k: v for k, v in values.items() if k not in derived}, names)
    kwargs = {k: v for k, v in values.items() if k in names}
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SafetyLayersError(f"{where}: {e}") from None


def settle(cfg, paper: bool | None = None) -> list[str]:
    """Fill the fields of ``cfg`` left None whose metadata names a ``default`` (or, in paper
    mode, a ``paper`` value); return ``["template=alpaca", ...]``, what paper mode set.

    A value the user set is never replaced, so ``--paper --template chat`` keeps the chat
    template. ``paper`` defaults to ``cfg.paper``.
    """
    paper = bool(getattr(cfg, "paper", False)) if paper is None else paper
    applied = []
    for f in dataclasses.fields(cfg):
        if getattr(cfg, f.name) is not None:
            continue
        if paper and "paper" in f.metadata:
            setattr(cfg, f.name, f.metadata["paper"])
            applied.append(f"{f.name}={f.metadata['paper']}")
        elif "default" in f.metadata:
            setattr(cfg, f.name, f.metadata["default"])
    return applied


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that become command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]
