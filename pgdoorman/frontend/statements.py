"""A client's prepared statements in transaction and statement mode: its names mapped to the pool's
shared server-side statements, its unnamed statement, and the SQL that names them.

StatementMapping is mixed into ClientConn (client.py): the relay hands it the messages that carry a
statement name (Parse, Bind, Describe, Close, a Query starting with DEALLOCATE or PREPARE) and sends
what it returns instead. docs/protocol.md ("Statements") describes the rules.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pgdoorman.prepared import (
    PREPARE_RESERVED,
    SERVER_NAME_PREFIX,
    Statement,
    guard_server_names,
    parse_own_query,
)
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m
from pgdoorman.protocol.scan import (
    BIND,
    BIND_NAMED,
    DESCRIBE,
    DESCRIBE_NAMED,
    HIDDEN_CLOSE,
    HIDDEN_PARSE,
    HIDDEN_QUERY,
    QUERY,
    SYNC,
    SYNTH_QUERY,
    mentions_session_state,
)
from pgdoorman.server import SYNTH_REPLY, UNNAMED_REPARSE, ServerConn

if TYPE_CHECKING:
    import asyncio

    from pgdoorman.pool import Pool

_unpack_len = struct.Struct("!I").unpack_from
_pack_hdr = struct.Struct("!cI").pack
_STATUS_FAILED = 69

UNCHANGED = b"<unchanged>"  # sentinel: forward the message as it is
HOLD = b"<hold>"  # sentinel: send the injected messages, hold the rest until they are answered
RAISED = b"<raised>"  # sentinel: the request was replaced by an error raised on the server
_CLOSE_UNNAMED = m.message(b"C", b"S\0")
_DEALLOCATE_DONE = m.message(b"C", b"DEALLOCATE\0")
_SYNC = m.message(b"S")
_PARSE_COMPLETE = m.parse_complete()
CACHED_PLAN_ERROR = "cached plan must not change result type"
# As PostgreSQL words it, routine included: drivers (asyncpg) recognise it by that and re-prepare.
_CACHED_PLAN_REPLY = m.message(b"E", b"SERROR\0VERROR\0C0A000\0M" + CACHED_PLAN_ERROR.encode()
                               + b"\0Fplancache.c\0RRevalidateCachedQuery\0\0")
_CLOSED_KEEP = 16  # names of statements closed while replies were owed (name_of)
UNNAMED_KEEP = 4096  # a read up to this size is kept by reference for _unnamed_parse


class StatementMapping:
    """The statement half of a ClientConn (which provides the attributes declared here)."""

    __slots__ = ("_closed", "_dropping", "_hold_prefix", "_no_verify", "_unnamed", "_unnamed_before",
                 "_unnamed_saved", "_verify_hold", "stmts")

    if TYPE_CHECKING:
        pool: Pool | None
        server: ServerConn | None
        state: int
        transport: asyncio.Transport
        stmts: dict[bytes, Statement]
        _stmt_cap: int
        _unnamed: tuple[bytes, int, int] | bytes | None
        _unnamed_saved: tuple[bytes, int, int] | bytes | None
        _unnamed_before: tuple[bytes, int, int] | bytes | None
        _closed: dict[Statement, bytes]
        _verify_hold: bytearray | None
        _hold_prefix: bytes
        _no_verify: bool
        _dropping: bool
        _paused: bool

        def _forward(self, data: bytes | bytearray, server: ServerConn) -> None: ...
        def note_settings(self, server: ServerConn, sql: bytes | bytearray) -> None: ...

    def _prepare_locally(self, data: bytes | bytearray) -> bool:
        """Answer "Parse(named)... Sync" outside a transaction without a server when every statement
        is one the pool has already prepared successfully: libpq's PQprepare (pgbench -M prepared)
        then never waits for a server while its thread's other connections hold them all."""
        assert self.pool is not None
        registry = self.pool.registry
        found: list[tuple[bytes, Statement]] = []
        pos, n = 0, len(data)
        while pos + 5 <= n:
            kind, end = data[pos], pos + 1 + _unpack_len(data, pos + 1)[0]
            if end > n:
                return False
            if kind == 83 and end == n and found:  # the Sync, last
                break
            if kind != 80 or data[pos + 5] == 0:
                return False
            name_end = data.index(0, pos + 5, end)
            stmt = registry.known(bytes(data[name_end + 1 : end]))
            if stmt is None:
                return False
            name = bytes(data[pos + 5 : name_end])
            if name in self.stmts:
                return False  # the server path answers "already exists"
            found.append((name, stmt))
            pos = end
        else:
            return False
        for name, stmt in found:
            self._remember(name, stmt)
        registry.stats.client_parses += len(found)
        registry.stats.hits += len(found)
        self.transport.write(m.parse_complete() * len(found) + m.ready_for_query(b"I"))
        return True

    def _closing(self, name: bytes, server: ServerConn) -> Statement | None:
        """The client closes (Close or SQL DEALLOCATE) its statement name; returns what it named."""
        closed = self.stmts.pop(name, None)
        if closed is not None and server.pending:  # errors owed before it still name it
            self._closed[closed] = name
            if len(self._closed) > _CLOSED_KEEP:
                del self._closed[next(iter(self._closed))]
        return closed

    def on_close_skipped(self, stmt: Statement | None, name: bytes) -> None:
        """Its Close was skipped by the server after an error: the statement is still its own."""
        if stmt is not None and name not in self.stmts:
            self.stmts[name] = stmt
            self._closed.pop(stmt, None)

    def _note_unnamed(self, data: bytes | bytearray, start: int, end: int) -> None:
        """data[start:end] holds this client's latest unnamed Parse (or a Query after it). Kept by
        reference while small and immutable; read only if a later Bind needs it (_unnamed_guard)."""
        self._unnamed_before = self._unnamed  # (on_unnamed_parses_skipped)
        if type(data) is bytes and len(data) <= UNNAMED_KEEP:
            self._unnamed = (data, start, end)
        else:
            self._unnamed = _last_unnamed_parse(data, start, end)

    def _unnamed_parse(self) -> bytes | None:
        """The Parse of this client's unnamed statement as it exists directly, or None."""
        src = self._unnamed
        if isinstance(src, tuple):
            src = self._unnamed = _last_unnamed_parse(*src)
        return src

    def _unnamed_guard(self, data: bytes | bytearray, pos: int, end: int, server: ServerConn,
                       kind: int) -> bytes:
        """A Bind or Describe of the unnamed statement, which on this server is not this client's.
        Directly it would be the client's own last unnamed Parse (it outlives Sync and the
        transaction): parse that again first, hidden. With none, close the server's (hidden), so
        PostgreSQL answers "unnamed prepared statement does not exist" as it would directly."""
        server.unnamed_owner = self
        parse = self._unnamed_parse()
        if parse is None:
            server.pending.append(HIDDEN_CLOSE)
            server.pending.append(kind)
            return _CLOSE_UNNAMED + bytes(data[pos:end])
        server.pending.append(HIDDEN_PARSE)
        server.refs.append(UNNAMED_REPARSE)
        server.pending.append(kind)
        return parse + bytes(data[pos:end])

    def _synthetic(self, server: ServerConn, kind: int) -> None:
        """A reply the pooler gives itself: now if nothing is owed before it, else in order."""
        if server.pending:
            server.pending.append(kind)
        elif not server.skipping:  # else PostgreSQL would skip the request: no reply
            self.transport.write(SYNTH_REPLY[kind])

    def _parse(self, data: bytes | bytearray, pos: int, end: int, server: ServerConn) -> bytes:
        assert self.pool is not None
        name_end = data.index(0, pos + 5, end)
        name = bytes(data[pos + 5 : name_end])
        if name in self.stmts:  # as PostgreSQL would answer on the client's own connection:
            # the query is parsed first (a syntax error wins), then the name is found taken.
            out = bytearray()
            server.check_syntax(bytes(data[name_end + 1 : end]), out)
            server.raise_error(out, codes.DUPLICATE_PREPARED_STATEMENT,
                               f'prepared statement "{name.decode(errors="replace")}" already exists')
            return bytes(out)
        stmt = self.pool.registry.get(bytes(data[name_end + 1 : end]))
        stats = self.pool.registry.stats
        stats.client_parses += 1
        out = bytearray()
        if server.statements.has(stmt):
            stats.hits += 1
            if server.skipping and not server.pending:
                return b""  # PostgreSQL would skip this Parse: no reply, and no statement
            if server.pending or server.status == _STATUS_FAILED:
                # What comes before it, or a failed transaction (25P02), may make this Parse
                # fail: PostgreSQL parses it (under a throw-away name), its reply is the client's.
                server.parse_in_place(bytes(data[name_end + 1 : end]), out, name)
            else:
                self.transport.write(_PARSE_COMPLETE)  # PostgreSQL would surely accept it
        else:
            server.prepare_statement(stmt, out, client_name=name)
        self._remember(name, stmt)
        return bytes(out)

    def _remember(self, name: bytes, stmt: Statement) -> None:
        stmts = self.stmts
        stmts.pop(name, None)
        stmts[name] = stmt
        if self._stmt_cap and len(stmts) > self._stmt_cap:
            del stmts[next(iter(stmts))]

    def _lookup(self, name: bytes, server: ServerConn, out: bytearray) -> Statement | None | bytes:
        """The client's statement by its name, made to exist on this server (messages for that
        appended to out). Returns HOLD when the re-prepared statement's shape must be checked
        first, or RAISED when out makes PostgreSQL fail the request as it would directly."""
        stmt = self.stmts.get(name)
        if stmt is None:
            if name.startswith(SERVER_NAME_PREFIX):  # the pooler's own: no client may reach them
                server.raise_error(out, codes.INVALID_SQL_STATEMENT_NAME,
                                   f'prepared statement "{name.decode(errors="replace")}" does not exist')
                return RAISED
            return None
        if stmt.retired:
            server.raise_error(out, codes.FEATURE_NOT_SUPPORTED, CACHED_PLAN_ERROR, _CACHED_PLAN_REPLY)
            return RAISED
        if not server.statements.has(stmt):
            server.prepare_statement(stmt, out)
            if stmt.shape is not None and not self._no_verify:
                # Clients were told its result shape; DDL may have changed it since. Check before
                # anything runs it here (one round trip, on a server's first use of it only).
                server.describe_hidden(stmt, out)
                return HOLD
        return stmt

    def _bind(self, data: bytes | bytearray, pos: int, name_at: int, end: int,
              server: ServerConn) -> bytes | bytearray:
        name_end = data.index(0, name_at, end)
        out = bytearray()
        name = bytes(data[name_at:name_end])
        stmt = self._lookup(name, server, out)
        if stmt is None:
            server.pending.append(BIND)
            return UNCHANGED  # unknown name: the server answers "does not exist" itself
        if isinstance(stmt, bytes):
            return self._held_or_raised(stmt, out)
        server.pending.append(BIND_NAMED)
        server.refs.append(stmt)
        server.client_names.append(name)
        server.pool.registry.stats.binds += 1
        stmt.uses += 1
        # end may lie beyond data (a large Bind, streamed): the length is the whole message's.
        server_name = stmt.server_name
        out += _pack_hdr(b"B", name_at - pos - 1 + len(server_name) + end - name_end)
        out += data[pos + 5 : name_at]
        out += server_name
        out += data[name_end:end]
        return out

    def _describe(self, data: bytes | bytearray, pos: int, end: int, server: ServerConn) -> bytes | None:
        out = bytearray()
        name = bytes(data[pos + 6 : end - 1])
        stmt = self._lookup(name, server, out)
        if stmt is None:
            server.pending.append(DESCRIBE)
            return None
        if isinstance(stmt, bytes):
            return self._held_or_raised(stmt, out)
        out += m.message(b"D", b"S" + stmt.server_name + b"\0")
        server.pending.append(DESCRIBE_NAMED)
        server.refs.append(stmt)
        server.client_names.append(name)
        return bytes(out)

    def _held_or_raised(self, outcome: bytes, out: bytearray) -> bytes:
        if outcome is HOLD:
            self._hold_prefix = bytes(out)
            return HOLD
        self._dropping = True  # RAISED: the error instead of the request, all of it
        return bytes(out)

    def _own_query(self, data: bytes | bytearray, pos: int, end: int, server: ServerConn) -> bytes:
        """A simple Query starting with DEALLOCATE or PREPARE, where statements are mapped: the
        client's protocol-level names are the pooler's to deallocate, and the pooler's own
        server-side names are no client's."""
        server.pending.append(QUERY)
        if mentions_session_state(data, pos + 5, end):
            self.note_settings(server, data[pos + 5 : end - 1])  # read back after the transaction
        server.unnamed_owner = None  # any simple Query drops the unnamed statement
        self._unnamed_saved, self._unnamed = self._unnamed, None
        sql = bytes(data[pos + 5 : end - 1])
        parsed = parse_own_query(sql)
        if parsed is None:
            guarded = guard_server_names(sql)
            return UNCHANGED if guarded is None else m.query(guarded.decode(errors="replace"))
        verb, name = parsed
        if name.startswith(SERVER_NAME_PREFIX):
            if verb == "deallocate":
                error = (codes.INVALID_SQL_STATEMENT_NAME,
                         f'prepared statement "{name.decode(errors="replace")}" does not exist')
            else:
                error = (codes.RESERVED_NAME, PREPARE_RESERVED)
            # Raised on the server in its place (its own transaction state follows), then Sync:
            # the client gets the ErrorResponse and the ReadyForQuery its Query would get.
            del server.pending[-1]
            out = bytearray()
            server.raise_error(out, *error)
            out += _SYNC
            server.pending.append(SYNC)
            return bytes(out)
        if verb == "deallocate" and name in self.stmts:
            self._closing(name, server)
            del server.pending[-1]
            if server.pending:
                server.pending.append(SYNTH_QUERY)
                server.synth_replies.append(_DEALLOCATE_DONE)
            elif server.skipping:
                pass  # PostgreSQL skips a Query inside a failed batch: no reply
            elif server.unsynced:
                # Inside a batch (after Flush): the Query would end its implicit transaction, as
                # a Sync does. Send one (its ReadyForQuery hidden), then answer in order.
                server.pending.append(HIDDEN_QUERY)
                server.pending.append(SYNTH_QUERY)
                server.synth_replies.append(_DEALLOCATE_DONE)
                return _SYNC
            else:
                self.transport.write(server.synthetic_now(SYNTH_QUERY, _DEALLOCATE_DONE))
            return b""
        if verb == "deallocate all":
            self.stmts.clear()  # and the server drops its own (the pooler notes DEALLOCATE ALL)
        return UNCHANGED

    def name_of(self, stmt: Statement) -> bytes | None:
        """The client's own name for a shared statement (for its error messages)."""
        for name, mine in self.stmts.items():
            if mine is stmt:
                return name
        return self._closed.get(stmt)

    def on_statements_discarded(self) -> None:
        self.stmts.clear()

    def on_query_skipped(self) -> None:
        """A simple Query of this client's was skipped (inside a failed batch): it dropped no
        unnamed statement after all."""
        if self._unnamed is None:
            self._unnamed = self._unnamed_saved

    def on_unnamed_parses_skipped(self, count: int) -> None:
        """The last `count` unnamed Parses it sent are skipped (a failed batch): its unnamed
        statement is the one before them, as directly, when the read they came in is still at
        hand; otherwise the latest Parse stays (docs/protocol.md: known difference)."""
        src = self._unnamed
        if not isinstance(src, tuple):
            return
        parses, after_query = _unnamed_parses(*src)
        if len(parses) > count:
            start, stop = parses[-1 - count]
            self._unnamed = bytes(src[0][start:stop])
        elif len(parses) == count:  # all of that read's: the one before it, or none after a Query
            before = self._unnamed_before
            self._unnamed = None if after_query else (
                _last_unnamed_parse(*before) if isinstance(before, tuple) else before)

    def on_parse_failed(self, name: bytes, stmt: Statement | None) -> None:
        """This client's Parse of name failed or was skipped: the name does not exist (unless a
        later Parse, already answered by the pooler, gave it again)."""
        if not name:  # its unnamed Parse: known difference, a skipped one leaves none either
            self._unnamed = None
            return
        mine = self.stmts.get(name)
        if mine is not None and (stmt is None or mine is stmt):
            del self.stmts[name]


def _unnamed_parses(data: bytes | bytearray, start: int, end: int) -> tuple[list[tuple[int, int]], bool]:
    """Where the whole unnamed Parses in the messages data[start:end] are, after the last Query,
    and whether there was a Query (which drops the unnamed statement)."""
    found: list[tuple[int, int]] = []
    query = False
    pos, n = start, len(data)
    while pos + 5 <= end:
        kind, stop = data[pos], pos + 1 + _unpack_len(data, pos + 1)[0]
        if kind == 81:
            found, query = [], True
        elif kind == 80 and stop <= n and data[pos + 5] == 0:
            found.append((pos, stop))
        pos = stop
    return found, query


def _last_unnamed_parse(data: bytes | bytearray, start: int, end: int) -> bytes | None:
    """The last whole unnamed Parse in the messages data[start:end], unless a Query follows it."""
    found = _unnamed_parses(data, start, end)[0]
    return bytes(data[found[-1][0] : found[-1][1]]) if found else None
