"""Connection ids for logs (C-n clients, S-n servers), unique across worker processes.

Worker w of n numbers its connections w+1, w+1+n, w+1+2n, ... so a log line's id is never shared
by two processes writing to the same log.
"""

from __future__ import annotations

import itertools

_clients = itertools.count(1)
_servers = itertools.count(1)


_prefix = ""


def configure(worker: int, workers: int, generation: int = 0) -> None:
    """generation: how many upgrades made this process (process/upgrade.py): C-2.7 is the seventh
    client of the second, so ids stay apart from those of clients handed over by older ones."""
    global _clients, _servers, _prefix
    _clients = itertools.count(worker + 1, workers)
    _servers = itertools.count(worker + 1, workers)
    _prefix = f"{generation}." if generation else ""


def client_id() -> str:
    return f"C-{_prefix}{next(_clients)}"


def server_id() -> str:
    return f"S-{_prefix}{next(_servers)}"
