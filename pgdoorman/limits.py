"""Client caps over the whole pooler (max_user_client_connections, max_db_client_connections) and
the failed-login delay.

The caps count logged-in clients per user and per database. With several workers the acceptor
holds the counts (one ClientCaps, asked over the channel at each login, told at each close), so the
caps are the pooler's, not each worker's; with one process the App holds them. A client is counted
once it has authenticated, as PostgreSQL checks rolconnlimit/datconnlimit: strangers who know a user
name cannot use its places up.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pgdoorman.protocol import codes

Refusal = tuple[str, str]  # (SQLSTATE, message)


@dataclass
class ClientCaps:
    users: Counter[str] = field(default_factory=Counter)
    databases: Counter[str] = field(default_factory=Counter)

    def admit(self, user: str, database: str, max_user: int, max_db: int) -> Refusal | None:
        """Count the client in, or say which cap it would break (PostgreSQL's words, plus the key)."""
        if max_user and self.users[user] >= max_user:
            return codes.TOO_MANY_CONNECTIONS, (
                f'too many connections for role "{user}" (max_user_client_connections = {max_user})')
        if max_db and self.databases[database] >= max_db:
            return codes.TOO_MANY_CONNECTIONS, (
                f'too many connections for database "{database}" (max_db_client_connections = {max_db})')
        self.users[user] += 1
        self.databases[database] += 1
        return None

    def leave(self, user: str, database: str) -> None:
        for counter, key in ((self.users, user), (self.databases, database)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def add(self, other: ClientCaps, sign: int = 1) -> None:
        """Merge a worker's counts in (sign -1: take them out, when the worker has died)."""
        for mine, theirs in ((self.users, other.users), (self.databases, other.databases)):
            for key, n in theirs.items():
                mine[key] += sign * n
                if mine[key] <= 0:
                    del mine[key]


FORGET_AFTER = 60.0  # a quiet minute forgets an address's failures


class FailureDelay:
    """Failed logins from one address wait before their error: `base` seconds, doubling with each
    further failure up to `cap`. Only that address waits (the delay is a timer on its connection),
    and a success or a quiet minute forgets it."""

    __slots__ = ("_failures",)

    def __init__(self) -> None:
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures, last failure)

    def failed(self, address: str, base: float, cap: float, now: float | None = None) -> float:
        """Record a failure; returns how long its error should wait."""
        now = time.monotonic() if now is None else now
        count, last = self._failures.get(address, (0, now))
        if now - last > FORGET_AFTER:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        if len(self._failures) > 100_000:  # bounded memory under a spray of addresses
            self.expire(now)
        if not base:
            return 0.0
        return min(cap or base, base * 2 ** min(count - 1, 30))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._failures = {a: v for a, v in self._failures.items() if now - v[1] <= FORGET_AFTER}


class MemoryBudget:
    """max_memory_usage: bytes this worker holds for messages in flight (its share of the pooler's
    limit: each of N workers gets limit / N, so all together never exceed it).

    Counted where the pooler holds data beyond one socket read: an incomplete message it must read
    whole, requests waiting for a server beyond their first read, and what waits for a slow peer
    once its socket's write buffer is over the high-water mark. Each holder charges its current
    total (charge()); a charge that would go over the limit is refused, and the holder's client
    then ends with 53200: nobody else waits and nothing blocks."""

    __slots__ = ("limit", "peak", "refused", "used")

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit  # 0: no limit (still counted, for SHOW MEM)
        self.used = 0
        self.peak = 0
        self.refused = 0  # clients ended by the limit

    def change(self, delta: int) -> bool:
        """Apply a holder's change of `delta` bytes; False (and nothing applied) if a growth would
        go over the limit."""
        used = self.used + delta
        if delta > 0 and self.limit and used > self.limit:
            self.refused += 1
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True


OUT_OF_MEMORY = (codes.OUT_OF_MEMORY, "out of memory")


def memory_detail(budget: MemoryBudget, wanted: int) -> str:
    return (f"max_memory_usage reached: this worker holds {budget.used} bytes for messages in flight "
            f"(its share is {budget.limit}); the connection needed {wanted} more")
