"""Size values: an integer is bytes, a string is a number with a unit ("1MB", "256MB", "64kB").

Units are PostgreSQL's memory units, powers of 1024 as in postgresql.conf (kB, MB, GB, TB), plus
their IEC spellings (KiB, MiB, GiB, TiB) and B; case-insensitive, since "1mb" can only mean one thing.
"""

from __future__ import annotations

import re

_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)?\s*")


def parse_size(value: object) -> int:
    """Bytes for an int (bytes) or a string like "1MB"; ValueError with a message for a config error."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(type(value).__name__)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    m = _SIZE.fullmatch(value)
    unit = (m.group(2) or "b").lower() if m is not None else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"invalid size {value!r} (expected bytes, or a number with unit B, kB, MB, GB "
                         "or TB)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(size: int) -> str:
    """The largest unit that keeps it whole ("1536kB", not "1.5MB"); for configs and SHOW."""
    for unit, factor in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
