"""Raw v3 protocol tools for the differential protocol-state tests (issue 8).

    conn = direct(pg)                       # PostgreSQL itself, trust_user on testdb
    conn = via(pooler, "ps")                # the same, through pgdoorman
    conn.send(parse("SELECT $1::int") + bind(["7"]) + execute() + SYNC)
    msgs = read_replies(conn, ready=1)      # until one ReadyForQuery; fails clearly on a hang
    assert normalise(msgs_direct) == normalise(msgs_pooler)

`victim(pooler, db, pg)` is the client that comes after a misbehaving one on a one-server pool: it
must be served promptly and see only its own rows, no open transaction and default settings, and its
autocommit write must be committed for everyone.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from helpers import ProtocolEOF, RawConn, data_row_values, message, parse_error_fields, query_message

from pgdoorman.devcluster import Cluster

TIMEOUT = 5.0  # every read of every test: a hang fails with a message, not a stuck test run
DB = "ps"  # the pool name the state tests use
USER = "trust_user"

Msg = tuple[bytes, bytes]


# --------------------------------------------------------------------------------------------
# messages


def _cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def parse(sql: str | bytes, name: str = "", types: Sequence[int] = ()) -> bytes:
    body = _cstr(name) + _cstr(sql) + struct.pack("!H", len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return message(b"P", body)


def bind(params: Iterable[str | bytes | None] = (), stmt: str = "", portal: str = "") -> bytes:
    """Bind with all parameters and results in text format."""
    params = list(params)
    body = bytearray(_cstr(portal) + _cstr(stmt) + struct.pack("!HH", 0, len(params)))
    for p in params:
        if p is None:
            body += struct.pack("!i", -1)
        else:
            b = p.encode() if isinstance(p, str) else p
            body += struct.pack("!i", len(b))
            body += b
    body += struct.pack("!H", 0)
    return message(b"B", bytes(body))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", _cstr(portal) + struct.pack("!I", max_rows))


def describe(kind: bytes, name: str = "") -> bytes:
    return message(b"D", kind + _cstr(name))


def close_msg(kind: bytes, name: str = "") -> bytes:
    return message(b"C", kind + _cstr(name))


def copy_data(data: bytes) -> bytes:
    return message(b"d", data)


def copy_fail(reason: str) -> bytes:
    return message(b"f", _cstr(reason))


SYNC = message(b"S")
FLUSH = message(b"H")
COPY_DONE = message(b"c")
TERMINATE = message(b"X")
Q = query_message


def big_query(sql: str, size: int, tag: str = "") -> bytes:
    """A simple Query of at least `size` bytes: `/*tag*/ sql` and a long comment after it."""
    head = (f"/*{tag}*/ " if tag else "") + sql + "\n-- "
    pad = max(0, size - len(head))
    return query_message(head + "x" * pad)


# --------------------------------------------------------------------------------------------
# connections


def direct(pg: Cluster, timeout: float = TIMEOUT) -> RawConn:
    conn = RawConn(pg.host, pg.port, timeout)
    conn.startup(USER, "testdb")
    return conn


def via(pooler, db: str = DB, timeout: float = TIMEOUT) -> RawConn:
    conn = RawConn.for_pooler(pooler, timeout)
    try:
        conn.startup(USER, db)
    except (TimeoutError, OSError, ProtocolEOF) as exc:
        conn.close()
        raise AssertionError(f"login through the pooler failed or hung: {exc!r}") from exc
    return conn


def send_split(conn: RawConn, data: bytes, cuts: Sequence[int] = (), pause: float = 0.02) -> None:
    """Send data in pieces cut at the given offsets (negative: from the end), pausing between them
    so that each piece arrives in a read of its own."""
    points = sorted({c if c >= 0 else len(data) + c for c in cuts if -len(data) < c < len(data)} - {0})
    start = 0
    for point in points:
        conn.send(data[start:point])
        start = point
        time.sleep(pause)
    conn.send(data[start:])


#: Ways to cut a message into reads: inside the header, at the 64 KB read size, just before the end.
SPLITS = {
    "one-write": (),
    "cut-everywhere": (1, 3, 5, 6, 4096, 65535, 65536, 65537, 131072, -1),
}


# --------------------------------------------------------------------------------------------
# reading with deadlines


def _summary(msgs: Sequence[Msg]) -> str:
    out = []
    for t, b in msgs[-12:]:
        if t == b"E" or t == b"N":
            f = parse_error_fields(b)
            out.append(f"{t.decode()}({f.get('C')} {f.get('M')!r})")
        elif t == b"Z":
            out.append(f"Z({b[:1].decode()})")
        else:
            out.append(t.decode(errors="replace"))
    return " ".join(out)


def read_until(conn: RawConn, stop: Callable[[list[Msg]], bool], timeout: float = TIMEOUT,
               what: str = "replies") -> list[Msg]:
    """Messages until stop(messages) holds; AssertionError on timeout or EOF (says what came)."""
    deadline = time.monotonic() + timeout
    msgs: list[Msg] = []
    while not stop(msgs):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what}: nothing more within {timeout}s; got: {_summary(msgs)}")
        conn.sock.settimeout(left)
        try:
            msgs.append(conn.recv_message())
        except TimeoutError:
            raise AssertionError(f"{what}: nothing more within {timeout}s; got: {_summary(msgs)}") from None
        except (ProtocolEOF, ConnectionError) as exc:
            raise AssertionError(f"{what}: connection closed ({exc}); got: {_summary(msgs)}") from None
    return msgs


def read_replies(conn: RawConn, ready: int = 1, timeout: float = TIMEOUT, what: str = "replies") -> list[Msg]:
    """Messages through the `ready`-th ReadyForQuery."""
    return read_until(conn, lambda ms: sum(1 for t, _ in ms if t == b"Z") >= ready, timeout, what)


def read_through(conn: RawConn, kind: bytes, timeout: float = TIMEOUT, what: str = "replies") -> list[Msg]:
    """Messages through the first one of type `kind` (e.g. b"G" CopyInResponse)."""
    return read_until(conn, lambda ms: bool(ms) and ms[-1][0] == kind, timeout, what)


def nothing_more(conn: RawConn, wait: float = 0.3) -> list[Msg]:
    """Whatever arrives within `wait` seconds (expected: nothing)."""
    msgs: list[Msg] = []
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return msgs
        conn.sock.settimeout(left)
        try:
            msgs.append(conn.recv_message())
        except TimeoutError:
            return msgs
        except (ProtocolEOF, ConnectionError):
            return msgs


def rows_of(msgs: Sequence[Msg]) -> list[list[str | None]]:
    rows: list[list[str | None]] = []
    for t, body in msgs:
        if t == b"D":
            rows.append(data_row_values(body))
    return rows


def errors_of(msgs: Sequence[Msg]) -> list[dict[str, str]]:
    return [parse_error_fields(b) for t, b in msgs if t == b"E"]


def status_of(msgs: Sequence[Msg]) -> bytes:
    z = [b for t, b in msgs if t == b"Z"]
    assert z, f"no ReadyForQuery in {_summary(msgs)}"
    return z[-1][:1]


def normalise(msgs: Sequence[Msg]) -> list[tuple]:
    """What a client receives, comparable between PostgreSQL and the pooler: ParameterStatus and
    BackendKeyData dropped, errors and notices reduced to severity, SQLSTATE and message."""
    out: list[tuple] = []
    for t, b in msgs:
        if t in (b"S", b"K"):
            continue
        if t in (b"E", b"N"):
            f = parse_error_fields(b)
            out.append((t.decode(), f.get("S"), f.get("C"), f.get("M")))
        else:
            out.append((t.decode(errors="replace"), bytes(b)))
    return out


# --------------------------------------------------------------------------------------------
# the victim: the next client of the one-server pool


def victim(pooler, pg: Cluster, db: str = DB, timeout: float = TIMEOUT, what: str = "victim") -> None:
    """A fresh client of the pool gets the (only) server promptly, and it is clean: its answers are
    its own, no transaction is open, settings are the defaults, no temp table is left, and its
    autocommit INSERT is committed (visible from another connection) when it says so."""
    tag = f"victim-{uuid.uuid4().hex[:12]}"
    conn = via(pooler, db, timeout)
    try:
        conn.send(Q(f"SELECT '{tag}', txid_current_if_assigned(), current_setting('statement_timeout'), "
                    "current_setting('search_path'), to_regclass('pg_temp.state_leak')"))
        msgs = read_replies(conn, timeout=timeout, what=f"{what}: first query")
        assert not errors_of(msgs), f"{what}: {errors_of(msgs)}"
        assert rows_of(msgs) == [[tag, None, "0", '"$user", public', None]], \
            f"{what}: not its own clean answer: {rows_of(msgs)}"
        assert status_of(msgs) == b"I", f"{what}: transaction status {status_of(msgs)!r} after a SELECT"
        conn.send(Q(f"INSERT INTO t_hygiene VALUES (0, '{tag}')"))
        msgs = read_replies(conn, timeout=timeout, what=f"{what}: INSERT")
        assert not errors_of(msgs) and status_of(msgs) == b"I", \
            f"{what}: INSERT: {errors_of(msgs)} status {status_of(msgs)!r}"
        for i in range(3):  # every later answer still its own (no shift by one)
            conn.send(Q(f"SELECT '{tag}-{i}'"))
            msgs = read_replies(conn, timeout=timeout, what=f"{what}: query {i}")
            assert rows_of(msgs) == [[f"{tag}-{i}"]], f"{what}: query {i} answered {rows_of(msgs)}"
        extra = nothing_more(conn, 0.15)
        assert not extra, f"{what}: replies nobody asked for: {_summary(extra)}"
        conn.send(TERMINATE)
    finally:
        conn.close()
    seen = pg.psql(f"SELECT count(*) FROM t_hygiene WHERE v = '{tag}'", db="testdb")
    pg.psql(f"DELETE FROM t_hygiene WHERE v = '{tag}'", db="testdb")
    assert seen == "1", f"{what}: its autocommit INSERT was not committed (swallowed by a transaction)"


class VictimThread(threading.Thread):
    """victim() in the background: for a victim that must wait while another client finishes."""

    def __init__(self, pooler, pg: Cluster, db: str = DB, timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.args_ = (pooler, pg, db, timeout)
        self.error: BaseException | None = None

    def run(self) -> None:
        pooler, pg, db, timeout = self.args_
        try:
            victim(pooler, pg, db, timeout, what="concurrent victim")
        except BaseException as exc:  # noqa: BLE001 - re-raised by check()
            self.error = exc

    def check(self, timeout: float = 20.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the concurrent victim never finished"
        if self.error is not None:
            raise self.error


def hang_up(conn: RawConn, how: str) -> None:
    """Vanish without Terminate: "close" (FIN) or "rst" (SO_LINGER 0)."""
    if how == "rst":
        conn.abort()
    else:
        conn.close()


def tag_count(pg: Cluster, tag: str, table: str = "t_hygiene") -> int:
    return int(pg.psql(f"SELECT count(*) FROM {table} WHERE v = '{tag}'", db="testdb"))


def new_tag(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_active(pg: Cluster, marker: str, timeout: float = 10.0) -> int:
    """pid of the backend running a query that starts with /*marker*/."""
    sql = ("SELECT pid FROM pg_stat_activity WHERE state = 'active' "
           f"AND query LIKE '/*{marker}*/%' LIMIT 1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = pg.psql(sql)
        if out:
            return int(out)
        time.sleep(0.05)
    raise AssertionError(f"the query /*{marker}*/ never became active within {timeout}s")


def peak_rss_kib(root_pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in KiB of the largest process of root_pid's tree."""
    pids, todo = [], [root_pid]
    while todo:
        p = todo.pop()
        if not os.path.exists(f"/proc/{p}"):
            continue
        pids.append(p)
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    best = (0, 0)
    for p in pids:
        vals = {}
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        vals[line.split(":")[0]] = int(line.split()[1])
        except OSError:
            continue
        best = max(best, (vals.get("VmHWM", 0), vals.get("VmRSS", 0)))
    return best
