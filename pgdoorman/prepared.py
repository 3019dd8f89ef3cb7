"""Prepared statements in transaction mode: the pool's shared registry and each server's LRU.

A statement is keyed by the full bytes of its Parse body after the name (query text plus
parameter type OIDs), never by a hash alone, and gets a server-side name unique in the process.
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from pgdoorman.protocol.messages import close_statement, parse_message, raise_sql

_next_id = itertools.count(1)
SERVER_NAME_PREFIX = b"PGDOORMAN_"  # server-side names; clients can neither reach nor take them
# After an upgrade (process/upgrade.py) the names carry the generation: a server handed over with a
# pinned client still has the old process's statements, and a name must never mean two queries.
_generation_tag = b""


def set_generation(generation: int) -> None:
    global _generation_tag
    _generation_tag = b"%d_" % generation if generation else b""


@dataclass(slots=True, eq=False)
class Statement:
    key: bytes
    server_name: bytes
    parse_msg: bytes  # the Parse to send a server that lacks it
    close_msg: bytes
    confirmed: bool = False  # some server answered its Parse with ParseComplete
    # What clients were told it returns: the (name, type, typmod) columns of the first
    # RowDescription a client's Describe got (b"n": NoData); None until then.
    shape: bytes | None = None
    # Its result type changed under DDL ("cached plan must not change result type"): every use
    # now fails as it would on the client's own connection, and a new Parse gets a new statement.
    retired: bool = False
    uses: int = 0  # Binds of it by clients (SHOW PREPARED_STATEMENTS)


def new_statement(key: bytes) -> Statement:
    name = SERVER_NAME_PREFIX + _generation_tag + b"%d" % next(_next_id)
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

    def retire(self, stmt: Statement) -> None:
        stmt.retired = True
        if self._by_key.get(stmt.key) is stmt:
            del self._by_key[stmt.key]

    def __len__(self) -> int:
        return len(self._by_key)

    def statements(self) -> list[Statement]:
        return list(self._by_key.values())

    def known(self, key: bytes) -> Statement | None:
        """The statement for key if a server has already prepared it successfully."""
        stmt = self._by_key.get(key)
        return stmt if stmt is not None and stmt.confirmed else None


def row_shape(kind: int, body: bytes | bytearray) -> bytes:
    """The part of a RowDescription (or NoData) that PostgreSQL's "cached plan must not change
    result type" check compares: each column's name, type OID and typmod."""
    if kind != 84:
        return b"n"
    count = int.from_bytes(body[0:2], "big")
    pos, out = 2, bytearray(body[0:2])
    for _ in range(count):
        name_end = body.index(0, pos)
        out += body[pos : name_end + 1]
        pos = name_end + 1
        out += body[pos + 6 : pos + 10]  # type OID (after table OID and column number)
        out += body[pos + 12 : pos + 16]  # typmod (after typlen)
        pos += 18
    return bytes(out)


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

    def all(self) -> list[Statement]:
        return list(self._lru)

    def clear(self) -> None:
        self._lru.clear()
        self.stale.clear()

    def __len__(self) -> int:
        return len(self._lru)


# DEALLOCATE [PREPARE] name | ALL, or PREPARE name ...: one statement, as psycopg sends it.
_OWN_QUERY = re.compile(
    rb'\s*(deallocate|prepare)\s+(?:(?<=deallocate\s)prepare\s+)?("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
    rb'\s*(.*?)\s*;?\s*', re.IGNORECASE | re.DOTALL)


def parse_own_query(sql: bytes) -> tuple[str, bytes] | None:
    """(verb, statement name as PostgreSQL resolves it) of a DEALLOCATE or PREPARE, with verb
    "deallocate all" for DEALLOCATE ALL; None for anything else (the server judges it)."""
    match = _OWN_QUERY.fullmatch(sql)
    if match is None:
        return None
    verb, name, rest = match.group(1).lower().decode(), match.group(2), match.group(3)
    if verb == "deallocate" and rest:
        return None  # several statements, or not DEALLOCATE: the server's to judge
    if name.startswith(b'"'):
        name = name[1:-1].replace(b'""', b'"')
    elif verb == "deallocate" and name.lower() == b"all":
        return "deallocate all", b""
    else:
        name = name.lower()  # unquoted identifiers fold to lower case
    return verb, name


_DEALLOCATE_SERVER_NAME = re.compile(rb'deallocate\s+(?:prepare\s+)?"(PGDOORMAN_(?:[^"]|"")*)"',
                                     re.IGNORECASE)
_PREPARE_SERVER_NAME = re.compile(rb'prepare\s+"PGDOORMAN_', re.IGNORECASE)


def guard_server_names(sql: bytes) -> bytes | None:
    """A query (of several statements, say) that names the pooler's own statements, rewritten so
    that each DEALLOCATE of one fails as if it did not exist (and a PREPARE of such a name fails
    the whole query); None if it names none. Text inside string literals is not told apart."""
    if b'"PGDOORMAN_' not in sql:
        return None
    if _PREPARE_SERVER_NAME.search(sql):
        return raise_sql("42939", PREPARE_RESERVED).encode()

    def fail(match: re.Match[bytes]) -> bytes:
        name = match.group(1).replace(b'""', b'"').decode(errors="replace")
        return raise_sql("26000", f'prepared statement "{name}" does not exist').encode()

    guarded = _DEALLOCATE_SERVER_NAME.sub(fail, sql)
    return None if guarded == sql else guarded


PREPARE_RESERVED = (f'prepared statement names beginning with "{SERVER_NAME_PREFIX.decode()}" '
                    "are reserved by the connection pooler")
