"""general.pidfile: the running pooler's pid (the acceptor's with several workers), for init scripts
and `pgdoorman upgrade`. An upgrade's successor writes its own once it serves; the old process,
exiting after it, leaves the file alone."""

from __future__ import annotations

import contextlib
import os


def write_pidfile(path: str) -> None:
    if not path:
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(temporary, path)  # a reader never sees a half-written pid


def read_pidfile(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def remove_pidfile(path: str) -> None:
    """At exit, only if it still names this process (after an upgrade it names the successor)."""
    if path and read_pidfile(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
