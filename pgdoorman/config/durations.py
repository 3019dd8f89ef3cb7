"""Duration values: a number is milliseconds, a string is a number with a unit suffix."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h|d)?\s*")


def parse_duration(value: object) -> float:
    """Return seconds for an int/float (milliseconds) or a string like "250ms", "5s", "1h", "300".

    Raises ValueError with a message fit for a config error; 0 is valid and means "disabled".
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(type(value).__name__)
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if m is None:
            raise ValueError(f"invalid duration {value!r} (expected a number with unit ms, s, m, h or d)")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "ms"]
    else:
        if not math.isfinite(value):
            raise ValueError("duration must be finite")
        seconds = value / 1000
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds in the largest unit that keeps it whole ("90s" not "1.5m"); for configs and SHOW."""
    if seconds == 0:
        return "0"
    for unit in ("d", "h", "m", "s"):
        n = seconds / _UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    ms = seconds * 1000
    return f"{int(ms) if ms == int(ms) else ms}ms"
