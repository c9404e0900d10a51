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

Types are checked in one place, :func:`check_types`, from the fields' annotations (int, float,
bool, str, ``X | None``, Literal, list, tuple, dict), for YAML, flags and Python alike:
:func:`from_mapping` checks a mapping before it builds a config and :func:`settle`, which every
config's ``__post_init__`` calls first, checks the fields of one built in Python. A new field is
covered without new code.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from .data import read_text
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
    text = read_text(path, "YAML file")
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
    """``cls(**values, **fixed)`` after checking the keys and the types of the values
    (:func:`check_types`); a config saved by a run (with its ``init=False`` result fields)
    reads back too."""
    values = dict(values or {})
    names = init_fields(cls)
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}
    check_keys(where, {k: v for k, v in values.items() if k not in derived}, names)
    kwargs = check_types(cls, {k: v for k, v in values.items() if k in names}, where)
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise SafetyLayersError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- types

class _Mismatch(Exception):
    """A value that does not fit an annotation."""


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def expected_text(tp) -> str:
    """What an annotation asks for, in words: ``an integer or null``, ``one of 'up', 'down'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " or ".join(dict.fromkeys(expected_text(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if tp is type(None):
        return "null"
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    if tp in simple:
        return simple[tp]
    if tp in (list, tuple, set) or origin in (list, tuple, set):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values"
        return f"a list of {_PLURAL.get(args[0], expected_text(args[0]))}" if args else "a list"
    if tp is dict or origin is dict:
        return "a mapping (key: value)"
    return f"a {getattr(tp, '__name__', str(tp))}"


def _fit_scalar(value, tp, coerce: bool):
    """``value`` as bool, int, float or str, or :class:`_Mismatch`. Coercion turns integral
    floats and numeric text into numbers: YAML reads ``1e-5`` (no dot) as text."""
    if tp is bool or isinstance(value, bool) or value is None:
        if isinstance(value, bool) and tp is bool:
            return value
        raise _Mismatch
    if tp is str:
        if isinstance(value, str) or (coerce and isinstance(value, Path)):
            return str(value)
        raise _Mismatch
    if isinstance(value, (int, float)) and not (tp is int and isinstance(value, float)):
        return tp(value)
    if coerce and tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if coerce and isinstance(value, str):
        try:
            return tp(value.strip())
        except ValueError:
            pass
    raise _Mismatch


def _fit_sequence(value, tp, coerce: bool):
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if coerce and isinstance(value, str):                 # a, b -> [a, b], as the command line
        value = [x.strip() for x in value.split(",") if x.strip()]
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch
        return tuple(fit(v, a, coerce) for v, a in zip(value, args))
    items = [fit(v, args[0], coerce) for v in value] if args else list(value)
    return tuple(items) if origin is tuple else set(items) if origin is set else items


def fit(value, tp, coerce: bool = True):
    """``value`` checked against the annotation ``tp`` (and coerced where that is lossless);
    raises :class:`_Mismatch`. Types it does not know (a class of ours) accept any value:
    their own code checks them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        for strict in (True, False):                      # an exact member first: '1' stays text in str | int
            for a in args:
                try:
                    return fit(value, a, coerce and not strict)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is typing.Literal:
        if any(value is a or (type(value) is type(a) and value == a) for a in args):
            return value
        raise _Mismatch
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise _Mismatch
    if tp in (bool, int, float, str):
        return _fit_scalar(value, tp, coerce)
    if tp in (list, tuple, set) or origin in (list, tuple, set):
        return _fit_sequence(value, tp, coerce)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return {k: fit(v, args[1], coerce) for k, v in value.items()} if len(args) == 2 else value
    return value


@functools.lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    """Field name -> resolved annotation; a field whose annotation names something only
    imported for type checking is left out (unchecked)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - NameError, or TypeError from an old-style annotation
        hints = {}
        for f in dataclasses.fields(cls):
            try:
                hints[f.name] = eval(f.type, vars(sys.modules[cls.__module__])) if isinstance(f.type, str) else f.type
            except Exception:  # noqa: BLE001
                continue
        return hints


def _yamlish(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_yamlish, value)) + "]"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _members(tp) -> list:
    return [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]


def check_value(where: str, f: dataclasses.Field, value, tp, *, objects: bool = False):
    """``value`` fitted to the field's annotation, or one line naming the key, the value, the
    expected type and an example (the field's default). ``objects``: a text field also takes
    what Python callers pass beyond text (a list of prompts, a Path), though never a number."""
    try:
        return fit(value, tp)
    except _Mismatch:
        if objects and str in _members(tp) and not isinstance(value, (bool, int, float, type(None))):
            return value
        members = _members(tp)
        if members and all(typing.get_origin(m) is typing.Literal for m in members):
            choices = ", ".join(repr(c) for m in members for c in typing.get_args(m))
            raise SafetyLayersError(f"{where}: unknown {f.name} {_yamlish(value)}: choose one of {choices}") from None
        example = f.metadata.get("default", f.default)
        hint = (f" (e.g. {f.name}: {_yamlish(example)})"
                if example is not None and example is not dataclasses.MISSING and not isinstance(example, dict) else "")
        raise SafetyLayersError(f"{where}: {f.name} must be {expected_text(tp)}, got {_yamlish(value)}{hint}") from None


def check_types(cls, values: Mapping, where: str) -> dict:
    """``values`` (field name -> value) with every value checked against its field's
    annotation and coerced where lossless (``3`` for a float, ``'1e-5'`` for a number);
    keys that are not fields pass unchanged. ``where`` starts the error line."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    return {k: check_value(where, fields[k], v, hints[k]) if k in fields and k in hints else v
            for k, v in values.items()}


def _is_default(f: dataclasses.Field, value) -> bool:
    d = f.default
    return d is not dataclasses.MISSING and (value is d or (type(value) is type(d) and value == d))


def check_fields(cfg) -> None:
    """Check (and coerce) every field of a built config that differs from its default: the
    Python path to :func:`check_types`, called by :func:`settle`."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.init and f.name in hints and not _is_default(f, value):
            fitted = check_value(type(cfg).__name__, f, value, hints[f.name], objects=True)
            if fitted is not value:
                object.__setattr__(cfg, f.name, fitted)


def settle(cfg, paper: bool | None = None) -> list[str]:
    """Check the types of the fields of ``cfg`` (:func:`check_fields`), then fill those left
    None whose metadata names a ``default`` (or, in paper mode, a ``paper`` value); return
    ``["template=alpaca", ...]``, what paper mode set.

    A value the user set is never replaced, so ``--paper --template chat`` keeps the chat
    template. ``paper`` defaults to ``cfg.paper``. Every config's ``__post_init__`` calls
    this first, so a config built in Python is checked like one from YAML or flags.
    """
    check_fields(cfg)
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
