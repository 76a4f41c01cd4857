"""Help screens in plain words: option types read ``INT ≥ 1``, ``NUMBER``, ``PATH``, ``TEXT``
(typer's own are ``<int range> [x>=1]``), flags show none, arguments show their name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

WORDS = {int: "INT", float: "NUMBER", str: "TEXT", Path: "PATH"}
MAX_SHOWN_BOUND = 2**31  # larger bounds are the machine's limits (a seed's 2**63 - 1), not advice


def type_label(param: Any) -> str:
    """What an option takes, as the help screen shows it: ``INT ≥ 1``, ``INT 1..4096``, ``PATH``;
    nothing for a flag."""
    if param.is_flag:
        return ""
    annotation = param.type_descriptor.annotation
    word = WORDS.get((get_args(annotation) or (annotation,))[0], "TEXT")
    low = param.min
    high = param.max if param.max is not None and param.max < MAX_SHOWN_BOUND else None
    if low is not None and high is not None:
        return f"{word} {low}..{high}"
    if low is not None:
        return f"{word} ≥ {low}"
    return f"{word} ≤ {high}" if high is not None else word


class ReadableOption(TyperOption):
    """An option whose type column is :func:`type_label` (its bounds included)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return type_label(self) or None

    def _get_number_range_help_str(self) -> None:
        return None  # the bounds are in the type label


class NamedArgument(TyperArgument):
    """An argument shown by its name alone (``MODEL``), without a type column."""

    def display_type_rich(self, ctx: Any) -> None:
        return None


def _readable(params: list[Any]) -> list[Any]:
    for param in params:
        if isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
        param.__class__ = NamedArgument if isinstance(param, TyperArgument) else ReadableOption
    return params


class ReadableCommand(TyperCommand):
    """A command whose help shows options as :class:`ReadableOption`, arguments by name."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


class ReadableGroup(TyperGroup):
    """The command group, its own options shown the same way."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))
