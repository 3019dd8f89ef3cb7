"""Connection ids for logs (C-n clients, S-n servers), unique across worker processes.

Worker w of n numbers its connections w+1, w+1+n, w+1+2n, ... so a log line's id is never shared
by two processes writing to the same log.
"""

from __future__ import annotations

import itertools

_clients = itertools.count(1)
_servers = itertools.count(1)


def configure(worker: int, workers: int) -> None:
    global _clients, _servers
    _clients = itertools.count(worker + 1, workers)
    _servers = itertools.count(worker + 1, workers)


def client_id() -> str:
    return f"C-{next(_clients)}"


def server_id() -> str:
    return f"S-{next(_servers)}"
