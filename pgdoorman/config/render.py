"""Render a nested dict as TOML text: the inverse of tomllib for the value types a config uses."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _string(s: str) -> str:
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or c == "\x7f":  # TOML forbids raw control characters in basic strings
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _key(k: object) -> str:
    if isinstance(k, int) and not isinstance(k, bool):
        k = str(k)  # users keyed 0, 1, ... become tables "0", "1", ...
    if not isinstance(k, str):
        raise TypeError(f"TOML keys must be strings, got {type(k).__name__}")
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _is_table_list(v: object) -> bool:
    return isinstance(v, list | tuple) and bool(v) and all(isinstance(x, Mapping) for x in v)


def _value(v: object) -> str:
    if isinstance(v, bool):  # before int: bool is an int subclass
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # repr always keeps a "." or exponent, so it reads back as a float
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {type(v).__name__} as a TOML value")


def _table(path: list[str], data: Mapping[Any, Any], out: list[str]) -> None:
    # A list of dicts becomes tables named by index, e.g. users = [{...}] -> [pools.x.users.0].
    data = {k: dict(enumerate(v)) if _is_table_list(v) else v for k, v in data.items()}
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping) and v is not None]
    tables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    # A header is needed for own keys, or to make an empty table exist; parents of subtables are implicit.
    if path and (scalars or not tables):
        if out:
            out.append("")
        out.append("[" + ".".join(path) + "]")
    out.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars)
    for k, v in tables:
        _table([*path, _key(k)], v, out)


def render_config(data: Mapping[str, Any]) -> str:
    """Dict shaped like the TOML (e.g. {"general": {...}, "pools": {"db": {"users": {"0": {...}}}}}) -> TOML.

    Values may be str, int, float, bool or lists of those; None values are left out (key unset);
    a non-empty list of dicts becomes subtables "0", "1", ... (the PgDoorman layout for users).
    """
    out: list[str] = []
    _table([], data, out)
    return "\n".join(out) + "\n"
