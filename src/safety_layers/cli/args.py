"""Config dataclasses as command-line flags, and flags plus YAML back into a config.

One flag per field that :func:`~safety_layers.core.config.cli_fields` returns
(``reference_model`` -> ``--reference-model``); its help is the field's
``metadata["help"]`` and its shown default the field's default (or, for a field settled
in paper mode, ``metadata["default"]`` and ``metadata["paper"]``). ``Literal`` fields get
choices, bools ``--x/--no-x``, lists a comma-separated value; dict and dataclass fields
are YAML only. Every flag defaults to None, meaning "not given", so a YAML ``--config``
value survives unless a flag overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from ..core.config import check_types, cli_fields, from_mapping, load_yaml

CONFIG_HELP = "YAML file of settings (any field of the config, also those without a flag); flags override it"


def flag(name: str) -> str:
    """``reference_model`` -> ``--reference-model``."""
    return "--" + name.replace("_", "-")


def base_type(tp):
    """``X | None`` -> X (the first non-None member of a union)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def default_text(f: dataclasses.Field) -> str:
    """`` (default: X)``, `` (default: X; paper: Y)`` or nothing, for the end of a help line."""
    value = f.metadata.get("default", _default(f))
    parts = [] if value is None else [f"default: {_shown(value)}"]
    if "paper" in f.metadata and f.metadata["paper"] != value:
        parts.append(f"paper: {_shown(f.metadata['paper'])}")
    return f" ({'; '.join(parts)})" if parts else ""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def is_flag_type(tp) -> bool:
    """Whether a field of (base) type ``tp`` can be a flag: dicts and nested configs are YAML only."""
    return not (tp is dict or typing.get_origin(tp) is dict or dataclasses.is_dataclass(tp))


def add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint, positional: bool = False,
              alias: bool = False) -> None:
    """Add the flag (or, with ``positional``, the positional argument) of one field; with
    ``alias``, its ``--snake_case`` spelling is accepted too (not shown in ``--help``)."""
    tp = base_type(hint)
    text = f.metadata.get("help", "")     # a field without help fails tests/test_architecture.py
    if positional:
        parser.add_argument(f.name, help=text)
        return
    kwargs = {"dest": f.name, "default": None}
    if tp is bool:
        kwargs.update(action=argparse.BooleanOptionalAction)
    elif tp is list or typing.get_origin(tp) is list:
        kwargs.update(type=_csv, metavar="A,B")
        text += " (comma-separated)"
    elif typing.get_origin(tp) is typing.Literal:
        kwargs.update(choices=list(typing.get_args(tp)))
    else:
        kwargs.update(type=tp if tp in (int, float) else str)
    shown = "" if "(default:" in text else default_text(f)      # a help line that states it already
    parser.add_argument(flag(f.name), help=text + shown, **kwargs)
    if alias and "_" in f.name:
        parser.add_argument(f"--{f.name}", help=argparse.SUPPRESS, **kwargs)


def add_config_args(parser: argparse.ArgumentParser, cls, *, yaml: bool = True, positional=(),
                    aliases: bool = False) -> None:
    """``--config`` (with ``yaml``) and one argument per command-line field of ``cls``;
    the fields named in ``positional`` become positional arguments. ``aliases`` accepts
    ``--snake_case`` spellings too, for commands that share a line with the Trainer's flags."""
    if yaml:
        parser.add_argument("--config", metavar="YAML", help=CONFIG_HELP)
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        if is_flag_type(base_type(hints[f.name])):
            add_field(parser, f, hints[f.name], positional=f.name in positional, alias=aliases)


def given(cls, args: argparse.Namespace) -> dict:
    """The command-line fields of ``cls`` that the user set on the command line."""
    return {f.name: getattr(args, f.name) for f in cli_fields(cls) if getattr(args, f.name, None) is not None}


def yaml_values(args: argparse.Namespace) -> dict:
    """The mapping in ``--config`` (empty without one)."""
    path = getattr(args, "config", None)
    return dict(load_yaml(path)) if path else {}


def build_config(cls, args: argparse.Namespace, yaml: dict | None = None):
    """``cls`` from its defaults, then the ``--config`` YAML, then the flags given.

    Unknown YAML keys fail with a close match and the allowed names, and values of the wrong
    type name the file, the key and the expected type (core.config.from_mapping).
    """
    values = yaml_values(args) if yaml is None else dict(yaml)
    path = getattr(args, "config", None)
    if path:
        values = check_types(cls, values, str(Path(path)))
    values.update(check_types(cls, given(cls, args), "the command line"))
    return from_mapping(cls, values, str(Path(path)) if path else "the command line")
