"""Line numbers for TOML keys: tomllib reports none, so scan the (already valid) source text.

Tracks [table] headers, `key = value` lines (dotted and quoted keys too), and skips over multi-line
strings and arrays so their contents are never mistaken for keys or headers.
"""

from __future__ import annotations

import re
import tomllib

Path = tuple[str, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_QUOTES = ('"""', "'''", '"', "'")


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t":
        i += 1
    return i


def _close(s: str, i: int, quote: str) -> int:
    """Index just past the string closing `quote` at or after s[i], or -1 if it ends on a later line."""
    basic = quote[0] == '"'
    while i < len(s):
        if basic and s[i] == "\\":
            i += 2
        elif s.startswith(quote, i):
            i += len(quote)
            # A multi-line string may end in up to two extra quote characters that belong to its content.
            while len(quote) == 3 and i < len(s) and s[i] == quote[0]:
                i += 1
            return i
        else:
            i += 1
    return -1


def _parse_key(s: str, i: int) -> tuple[list[str], int] | None:
    """Parse a dotted key at s[i:]; return its parts and the index after it, or None if there is none."""
    parts: list[str] = []
    while True:
        i = _skip_ws(s, i)
        if i < len(s) and s[i] in "\"'":
            end = _close(s, i + 1, s[i])
            if end < 0:
                return None
            parts.append(tomllib.loads(f"k = {s[i:end]}")["k"])  # decode escapes exactly as TOML does
            i = end
        else:
            m = _BARE_KEY.match(s, i)
            if m is None:
                return None
            parts.append(m.group())
            i = m.end()
        i = _skip_ws(s, i)
        if i < len(s) and s[i] == ".":
            i += 1
            continue
        return parts, i


def _scan_value(s: str, i: int, depth: int) -> tuple[int, str | None]:
    """Scan value text; return the bracket depth after it and the quote of a string left open."""
    while i < len(s):
        c = s[i]
        if c == "#":
            break
        quote = next((q for q in _QUOTES if s.startswith(q, i)), None)
        if quote is not None:
            i = _close(s, i + len(quote), quote)
            if i < 0:
                return depth, quote
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth, None


class LineIndex:
    """Maps dotted key paths to the 1-based line that defines them."""

    def __init__(self, text: str) -> None:
        self.source_lines = text.split("\n")  # (a key's own line: where inline hba text starts)
        self._explicit: dict[Path, int] = {}  # headers and assigned keys
        self._implicit: dict[Path, int] = {}  # tables created implicitly by a deeper header or dotted key
        table: Path = ()
        depth = 0  # open [ / { inside a value spanning lines
        open_quote: str | None = None  # multi-line string spanning lines
        for lineno, line in enumerate(text.split("\n"), 1):  # tomllib counts "\n" only
            i = 0
            if open_quote is not None:
                i = _close(line, 0, open_quote)
                if i < 0:
                    continue
                open_quote = None
            elif depth == 0:
                i = _skip_ws(line, 0)
                if i >= len(line) or line[i] == "#":
                    continue
                if line[i] == "[":
                    parsed = _parse_key(line, i + (2 if line.startswith("[[", i) else 1))
                    if parsed is not None:
                        table = tuple(parsed[0])
                        self._add(table, lineno)
                    continue
                parsed = _parse_key(line, i)
                if parsed is None:
                    continue
                parts, i = parsed
                if not line.startswith("=", i):
                    continue
                self._add(table + tuple(parts), lineno)
                i += 1
            depth, open_quote = _scan_value(line, i, depth)

    def _add(self, path: Path, lineno: int) -> None:
        self._explicit.setdefault(path, lineno)
        for n in range(1, len(path)):
            self._implicit.setdefault(path[:n], lineno)

    def line_of(self, path: Path) -> int:
        """The line of `path`, else of its nearest defined ancestor (e.g. the table header); else 1."""
        for n in range(len(path), 0, -1):
            p = path[:n]
            line = self._explicit.get(p) or self._implicit.get(p)
            if line is not None:
                return line
        return 1
