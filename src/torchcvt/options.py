"""Options declared once, as dataclass fields: default, help text, group and allowed range together.

``option(default, help, group=...)`` declares a field. ``add_options(parser, cls)`` makes each such
field of a dataclass a command-line option (``batch_size`` -> ``--batch-size``, the type from the
annotation, a ``bool`` as a flag) whose help ends with its default, and ``check_options(obj)``
raises a one-line ConfigError naming the option when a value lies outside its declared range or
choices. So a default, its help and its check are written in one place, the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError

# check name -> (test, what the error says the value must be)
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "> 0": (lambda v: v > 0, "must be positive"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    ">= 1": (lambda v: v >= 1, "must be >= 1"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "(0, 1]": (lambda v: 0 < v <= 1, "must lie in (0, 1]"),
    "probability": (lambda v: 0 <= v <= 1, "must be a probability in [0, 1]"),
}


def option(
    default: Any, help: str, *, group: str, check: str | None = None, choices: Sequence[str] | None = None,
    default_help: str | None = None, none: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option.

    ``check``: a key of ``CHECKS`` (None values are never checked); ``choices``: the allowed values;
    ``default_help``: the default as ``--help`` states it, when the command line's default is not the
    field's (it depends on other options); ``none``: what the value None means, for ``--help``.
    """
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; one of {', '.join(CHECKS)}")
    metadata = {"help": help, "group": group, "check": check, "choices": choices, "default_help": default_help, "none": none}
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The option of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def show(value: Any, f: dataclasses.Field) -> str:
    """A value as ``--help`` writes it: None as the field's ``none`` text, floats short."""
    if value is None:
        return f.metadata.get("none") or "none"
    return format(value, "g") if isinstance(value, float) else str(value)


def default_help(f: dataclasses.Field) -> str | None:
    """The default ``--help`` states for a field (None: say nothing, as for flags and unset options)."""
    if f.metadata.get("default_help"):
        return f.metadata["default_help"]
    if isinstance(f.default, bool) or (f.default is None and not f.metadata.get("none")):
        return None
    return show(f.default, f)


def _option_type(annotation: Any) -> type:
    """int, float, str or bool from an annotation such as ``int | None``; other types are read as str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else str
    return annotation if annotation in (int, float, str, bool) else str


def add_options(
    parser: argparse.ArgumentParser, cls: type, describe_default: Callable[[dataclasses.Field], str | None] = default_help,
) -> dict[str, argparse._ArgumentGroup]:
    """Every ``option`` field of dataclass ``cls`` as an option of ``parser``, in argument groups by
    ``group`` (returned by title, so a caller can add options that are not fields). Options default
    to None (flags to False): "not given", so the caller fills in what depends on other options.
    ``describe_default(field)`` gives the default's text in the help."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        title = f.metadata["group"]
        group = groups[title] if title in groups else groups.setdefault(title, parser.add_argument_group(title))
        default = describe_default(f)
        text = f.metadata["help"] + (f" (default: {default})" if default else "")
        text = text.replace("%", "%%")  # argparse %-formats help texts
        kind = _option_type(hints[f.name])
        if kind is bool:
            group.add_argument(flag(f.name), action="store_true", help=text)
        else:
            metavar = {int: "N", float: "X"}.get(kind)
            group.add_argument(flag(f.name), type=kind, default=None, choices=f.metadata["choices"], metavar=metavar, help=text)
    return groups


def check_options(obj: Any) -> None:
    """A one-line ConfigError for the first field of ``obj`` outside its ``check`` or ``choices``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None or not f.metadata:
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        check = f.metadata.get("check")
        if check is not None and not CHECKS[check][0](value):
            raise ConfigError(f"{flag(f.name)} {CHECKS[check][1]}, got {value}")
