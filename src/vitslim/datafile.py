"""Reading the plain-data files users hand vitslim (recipes, QuantConfigs, quant.json) and
checking the types of what they hold, before anything expands or runs.

Limits are checked on the token stream, before YAML builds any object: a file of at most
``MAX_FILE_BYTES``, nesting at most ``MAX_DEPTH`` deep, and at most ``MAX_NODES`` values
*after* expanding YAML aliases (a few hundred bytes of nested aliases can otherwise expand
to gigabytes). Every failure is a ``ConfigError`` naming the file.
"""

from __future__ import annotations

import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vitslim.errors import ConfigError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 10_000
MAX_INT = 1 << 31
MAX_STR = 1000


def read_data_file(path: str | Path, what: str) -> Any:
    """The data in a ``.json`` file (JSON) or any other file (YAML), within the limits above."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist or is not a regular file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"{what} {str(path)!r} is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        text = path.read_bytes()[:MAX_FILE_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_data_text(text, "json" if path.suffix.lower() == ".json" else "yaml", f"{what} {str(path)!r}")


def parse_data_text(text: str, fmt: str, where: str) -> Any:
    """Parse YAML (safe subset) or JSON text; ``where`` names it in errors."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: more than {MAX_FILE_BYTES} bytes")
    try:
        if fmt == "json":
            data = json.loads(text, parse_constant=_reject_constant)
        else:
            _check_yaml_size(text, where)
            data = yaml.safe_load(text)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    except (yaml.YAMLError, ValueError) as err:  # JSONDecodeError and int-size errors are ValueErrors
        raise ConfigError(f"{where}: not valid {fmt.upper()}: {_first_line(err)}") from None
    _check_depth(data, where)
    return data


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows; write a finite number")


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def _check_yaml_size(text: str, where: str) -> None:
    """Depth and expanded size from YAML's event stream (no objects are built yet)."""
    expanded: dict[str, int] = {}  # anchor -> values it stands for
    open_nodes: list[list] = []  # per open collection: [anchor, values so far]
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([event.anchor, 1])
            if len(open_nodes) > MAX_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            n = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size = open_nodes.pop()
            if anchor:
                expanded[anchor] = size
            if open_nodes:
                open_nodes[-1][1] += size
            continue
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            n = expanded.get(event.anchor, 1) if isinstance(event, yaml.AliasEvent) else 1
            if isinstance(event, yaml.ScalarEvent) and event.anchor:
                expanded[event.anchor] = 1
            if open_nodes:
                open_nodes[-1][1] += n
        else:
            continue
        total += n
        if total > MAX_NODES:
            raise ConfigError(f"{where}: more than {MAX_NODES} values once YAML aliases are expanded; "
                              "write the values out or shorten the file")


def _check_depth(data: Any, where: str) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]


def brief(value: Any, limit: int = 80) -> str:
    """A short repr for error messages: never the whole of a large value."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` if it has type ``hint`` (int, float, bool, str, None, unions, list[X],
    tuple[X, ...], dict[str, X], Any); a ``ConfigError`` naming ``where`` otherwise. Ints
    stay within ±2**31, floats are finite, strings at most 1000 characters; bools are not
    numbers and lists become tuples where a tuple is expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return check_type(value, option, where)
            except ConfigError:
                continue
        raise _type_error(value, hint, where)
    if hint is type(None):
        if value is None:
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise ConfigError(f"{where}={brief(value)} is out of range (at most {MAX_INT} in size)")
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}={value!r}: give a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            if len(value) > MAX_STR:
                raise ConfigError(f"{where}: text of {len(value)} characters; at most {MAX_STR}")
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            items = [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            return {check_type(k, args[0], f"{where} key"): check_type(v, args[1], f"{where}.{k}")
                    for k, v in value.items()}
    else:
        raise TypeError(f"check_type does not handle {hint!r}")  # a vitslim bug, not user input
    raise _type_error(value, hint, where)


def _type_error(value: Any, hint: Any, where: str) -> ConfigError:
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return ConfigError(f"{where}={brief(value)} has the wrong type ({type(value).__name__}); expected {name}")


def check_fields(cls: type, data: dict, where: str, nested: dict[str, type] | None = None) -> dict:
    """Type-check ``data`` against the fields of dataclass ``cls`` (names checked by the
    caller); fields listed in ``nested`` must be mappings and are left to the caller."""
    check_mapping(data, where.rstrip(". ") or cls.__name__)
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in data.items():
        if nested and name in nested:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}={brief(value)}: expected a mapping of options")
            out[name] = value
        else:
            out[name] = check_type(value, hints[name], f"{where}{name}")
    return out


def check_mapping(data: Any, where: str) -> dict[str, Any]:
    """``data`` if it is a mapping with text keys (what every vitslim file holds)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of names to values, got {type(data).__name__} {brief(data)}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be names (text), got {brief(bad[0])}")
    return data
