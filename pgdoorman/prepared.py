"""Prepared statements in transaction mode: the pool's shared registry and each server's LRU.

A statement is keyed by the full bytes of its Parse body after the name (query text plus
parameter type OIDs), never by a hash alone, and gets a server-side name unique in the process.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from pgdoorman.protocol.messages import close_statement, parse_message

_next_id = itertools.count(1)


@dataclass(slots=True, eq=False)
class Statement:
    key: bytes
    server_name: bytes
    parse_msg: bytes  # the Parse to send a server that lacks it
    close_msg: bytes
    confirmed: bool = False  # some server answered its Parse with ParseComplete


def new_statement(key: bytes) -> Statement:
    name = b"PGDOORMAN_%d" % next(_next_id)
    return Statement(key, name, parse_message(name, key), close_statement(name))


@dataclass(slots=True)
class PreparedStats:
    client_parses: int = 0
    server_parses: int = 0
    binds: int = 0
    hits: int = 0
    evictions: int = 0


@dataclass(slots=True)
class Registry:
    """Pool-wide statements by key, so clients with the same query share one server name."""

    capacity: int
    stats: PreparedStats = field(default_factory=PreparedStats)
    _by_key: OrderedDict[bytes, Statement] = field(default_factory=OrderedDict)

    def get(self, key: bytes) -> Statement:
        stmt = self._by_key.get(key)
        if stmt is None:
            stmt = new_statement(key)
            self._by_key[key] = stmt
            if len(self._by_key) > self.capacity:
                # Clients holding the evicted entry keep using it; it just stops being shared.
                self._by_key.popitem(last=False)
        else:
            self._by_key.move_to_end(key)
        return stmt

    def known(self, key: bytes) -> Statement | None:
        """The statement for key if a server has already prepared it successfully."""
        stmt = self._by_key.get(key)
        return stmt if stmt is not None and stmt.confirmed else None

    def __len__(self) -> int:
        return len(self._by_key)


class ServerStatements:
    """The statements prepared on one server connection, least recently used first."""

    __slots__ = ("capacity", "_lru", "stale")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[Statement, None] = OrderedDict()
        # Statements whose plan went stale on this server: Close them before re-preparing.
        self.stale: set[Statement] = set()

    def has(self, stmt: Statement) -> bool:
        if stmt in self._lru:
            self._lru.move_to_end(stmt)
            return True
        return False

    def add(self, stmt: Statement) -> Statement | None:
        """Record stmt; returns the statement evicted to make room, if any."""
        self._lru[stmt] = None
        if len(self._lru) > self.capacity:
            victim, _ = self._lru.popitem(last=False)
            return victim
        return None

    def discard(self, stmt: Statement) -> None:
        self._lru.pop(stmt, None)

    def clear(self) -> None:
        self._lru.clear()
        self.stale.clear()

    def __len__(self) -> int:
        return len(self._lru)
