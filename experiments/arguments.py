"""Config dataclasses become argparse options: field help is the CLI help, defaults live in one place."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from sae.config import field_help


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, is_list) for annotations like ``int``, ``int | None`` and ``list[str]``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"list": list, "dict": dict})  # from __future__ annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """One ``--field-name`` option per documented field of ``cls`` (fields without help are internal)."""
    defaults = defaults or {}
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not helps.get(f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        base, is_list = _base_type(f.type)
        if f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        shown = "" if f.name in required or default is None else f" (default: {default})"
        help_text = (helps[f.name] + shown).replace("%", "%%")  # argparse %-formats help strings
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif is_list:
            parser.add_argument(
                flag,
                dest=f.name,
                type=base,
                action="append",
                default=None,
                required=f.name in required,
                help=help_text + "; repeat the flag for several",
            )
            parser.set_defaults(**{f"_default_{f.name}": default})
        else:
            parser.add_argument(flag, type=base, default=default, required=f.name in required, help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and hasattr(args, f"_default_{f.name}"):
                value = getattr(args, f"_default_{f.name}")
            values[f.name] = value
    values.update(overrides)
    return cls(**values)
