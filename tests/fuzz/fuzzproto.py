"""Differential protocol fuzzing (issue 8): the script model, its runner and the comparison.

A *script* is a plain list of `Step`s; a step is a tuple of client messages written as one byte
stream (optionally cut into pieces written separately with small pauses), then either the replies
are read, or the client vanishes (close / RST), or, for a cancel step, a CancelRequest is sent once
the query runs. Everything here is deterministic data with a short repr, so a failing script can be
pasted into tests/fuzz/test_fuzz_regressions.py as it is printed:

    [Step((Query('BEGIN; INSERT INTO fz_t VALUES (1, $$a$$)', pad=70000),), cuts=(70001,), hangup='rst')]

`check_script(env, script)` runs the script directly against PostgreSQL and through pgdoorman, and
fails (AssertionError) if the client receives anything different, if a victim client on the same
one-server pool sees another client's data, transaction or settings, or gets no answer, or if the
committed table contents differ.

How replies are read: `ReplyModel` is a small client-side model of what PostgreSQL owes, in the way
libpq keeps its command queue. Every message written is queued; every reply is matched against the
head of the queue; an ErrorResponse to an extended-protocol message drops everything up to the next
Sync (PostgreSQL skips it, a Query included); CopyInResponse makes the COPY consume the CopyData,
Flush and Sync messages that follow it up to CopyDone/CopyFail (PostgreSQL ignores Sync and Flush in
copy-in mode). The reader waits as long as a barrier (Query, Sync, Flush, Terminate) is still queued:
PostgreSQL flushes its output there, so its replies must come; replies to an unflushed batch are
picked up by a later read. The same reader is used for both runs, so the direct run also checks the
model: a direct run that times out is reported as a fuzzer bug, not as a pooler bug. Every read has
a deadline (READ_TIMEOUT per message, PGDOORMAN_FUZZ_TIMEOUT), so a hang fails as "no reply within
N s after step k".

What is compared (`normalise`, `comparable`): every message after login, in order. Login replies
are reduced to "login ok" (ParameterStatus, BackendKeyData, auth differ legitimately); errors and
notices keep all fields but F/L/R (source location) and P/p/q (positions); NotificationResponse
loses the sender's pid; a cancel step's outcome is reduced to canceled / completed, compared
strictly when both runs saw the query sleeping before cancelling it, loosely otherwise. No NOTICE is
dropped. Then the committed rows of fz_t, unless a hang-up left a committing request unanswered.

The victim (`Victim`), a second client of the same one-server pool: in transaction mode it runs in
its own thread after every step that leaves the attacker between transactions, and once while a
cut write is still unfinished (its request then waits for, or races with, the attacker's last
piece); in every mode once after the attacker is gone. Each check is one write of four requests
(a Bind of the unnamed statement it never parsed, a state query, an autocommit INSERT, a tagged
SELECT): it must get PostgreSQL's own 26000 for the Bind, its own tag back, no transaction or xid,
default settings, no leftover prepared statements (other than the pooler's PGDOORMAN_*), temp
tables, cursors, LISTENs or advisory locks, and its INSERTs must be committed.

State per run: each run empties fz_t first; both runs use the database fz_db of the session
cluster, so the fuzzer's waits and clean-ups (pg_terminate_backend after a failed example, so the
next example starts on a fresh server) touch no other test's backends.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import select
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from helpers import (
    Pooler,
    PoolerLauncher,
    ProtocolEOF,
    RawConn,
    cancel_request,
    message,
    parse_error_fields,
    pool_config,
)

from pgdoorman.devcluster import Cluster
from pgdoorman.protocol import messages

USER = "trust_user"
DATABASE = "fz_db"  # the fuzzer's own database: its checks and clean-ups touch nothing else
POOL = "fz"
TABLE = "fz_t"
VICTIM_TABLE = "fz_victim"

READ_TIMEOUT = float(os.environ.get("PGDOORMAN_FUZZ_TIMEOUT", "2"))  # per message, attacker
VICTIM_TIMEOUT = READ_TIMEOUT + 1.5  # the victim may wait for a transaction the attacker is in
PIECE_PAUSE = 0.004  # between the pieces of a cut write: each piece arrives in a read of its own
VICTIM_HEADSTART = 0.01  # how long the victim's request has before the attacker's last piece
CANCEL_SLEEP = 1  # seconds the query of a cancel step sleeps; a cancel that works ends it at once
#: Error and notice fields compared (F/L/R = source location, P/p/q = positions, are dropped).
ERROR_FIELDS = "SVCMDHWstcdn"


# --------------------------------------------------------------------------------------------
# the script model


class _Compact:
    """repr() that omits fields left at their defaults, so scripts print short and paste as code."""

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            has_default = f.default is not dataclasses.MISSING
            if has_default and value == f.default:
                continue
            parts.append(f"{f.name}={value!r}" if has_default else repr(value))
        return f"{type(self).__name__}({', '.join(parts)})"


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def _padded(text: str, pad: int) -> bytes:
    """`text` with its "{pad}" replaced by `pad` bytes (or, without one, a trailing comment of them)."""
    if not pad:
        return text.encode()
    if "{pad}" in text:
        a, b = text.split("{pad}", 1)
        return a.encode() + b"z" * pad + b.encode()
    return text.encode() + b"\n-- " + b"z" * pad


@dataclass(frozen=True, repr=False)
class Query(_Compact):
    sql: str
    pad: int = 0  # make it a large message: a comment of this many bytes after the SQL

    kind = "Q"

    def encode(self) -> bytes:
        return message(b"Q", _padded(self.sql, self.pad) + b"\0")


@dataclass(frozen=True, repr=False)
class Parse(_Compact):
    sql: str
    name: str = ""
    pad: int = 0

    kind = "P"

    def encode(self) -> bytes:
        return message(b"P", _cstr(self.name) + _padded(self.sql, self.pad) + b"\0" + b"\0\0")


@dataclass(frozen=True, repr=False)
class Pad(_Compact):
    """A Bind parameter of n bytes ("y" * n)."""

    n: int


@dataclass(frozen=True, repr=False)
class Bind(_Compact):
    params: tuple[str | Pad | None, ...] = ()
    stmt: str = ""
    portal: str = ""

    kind = "B"

    def encode(self) -> bytes:
        body = bytearray(_cstr(self.portal) + _cstr(self.stmt) + struct.pack("!HH", 0, len(self.params)))
        for p in self.params:
            if p is None:
                body += struct.pack("!i", -1)
                continue
            b = b"y" * p.n if isinstance(p, Pad) else p.encode()
            body += struct.pack("!i", len(b)) + b
        body += struct.pack("!H", 0)
        return message(b"B", bytes(body))


@dataclass(frozen=True, repr=False)
class Describe(_Compact):
    what: str = "P"  # "S" statement or "P" portal
    name: str = ""

    kind = "D"

    def encode(self) -> bytes:
        return message(b"D", self.what.encode() + _cstr(self.name))


@dataclass(frozen=True, repr=False)
class Execute(_Compact):
    portal: str = ""
    max_rows: int = 0

    kind = "E"

    def encode(self) -> bytes:
        return message(b"E", _cstr(self.portal) + struct.pack("!I", self.max_rows))


@dataclass(frozen=True, repr=False)
class Close(_Compact):
    what: str = "S"
    name: str = ""

    kind = "C"

    def encode(self) -> bytes:
        return message(b"C", self.what.encode() + _cstr(self.name))


@dataclass(frozen=True, repr=False)
class Sync(_Compact):
    kind = "S"

    def encode(self) -> bytes:
        return message(b"S")


@dataclass(frozen=True, repr=False)
class Flush(_Compact):
    kind = "H"

    def encode(self) -> bytes:
        return message(b"H")


@dataclass(frozen=True, repr=False)
class Terminate(_Compact):
    kind = "X"

    def encode(self) -> bytes:
        return message(b"X")


@dataclass(frozen=True, repr=False)
class CopyData(_Compact):
    text: str
    pad: int = 0  # "{pad}" in text stands for this many bytes

    kind = "d"

    def encode(self) -> bytes:
        head, mark, tail = self.text.partition("{pad}")
        return message(b"d", head.encode() + (b"z" * self.pad if mark else b"") + tail.encode())


@dataclass(frozen=True, repr=False)
class CopyDone(_Compact):
    kind = "c"

    def encode(self) -> bytes:
        return message(b"c")


@dataclass(frozen=True, repr=False)
class CopyFail(_Compact):
    reason: str = "fz abort"

    kind = "f"

    def encode(self) -> bytes:
        return message(b"f", _cstr(self.reason))


Msg = (Query | Parse | Bind | Describe | Execute | Close | Sync | Flush | Terminate | CopyData | CopyDone
       | CopyFail)


@dataclass(frozen=True, repr=False)
class Step(_Compact):
    """Write `msgs` as one byte stream cut at byte offsets `cuts` (a pause between pieces); then:
    hangup "" reads the replies; "close" (FIN) / "rst" (SO_LINGER 0) vanish after `hangup_after`
    pieces (-1: all of them) without reading; cancel=True sends a CancelRequest once the query runs."""

    msgs: tuple[Msg, ...]
    cuts: tuple[int, ...] = ()
    hangup: str = ""
    hangup_after: int = -1
    cancel: bool = False

    def payload(self) -> bytes:
        return b"".join(m.encode() for m in self.msgs)

    def pieces(self) -> list[bytes]:
        data = self.payload()
        points = sorted({c for c in self.cuts if 0 < c < len(data)})
        out, start = [], 0
        for p in points:
            out.append(data[start:p])
            start = p
        out.append(data[start:])
        return out


Script = list[Step]


def script_source(script: Sequence[Step]) -> str:
    """The script as Python source for the regression list."""
    if not script:
        return "[]"
    return "[\n" + "".join(f"    {s!r},\n" for s in script) + "]"


# --------------------------------------------------------------------------------------------
# what PostgreSQL owes: the reply model


class _Item:
    __slots__ = ("kind", "sub", "got_t", "copy", "copy_done")

    def __init__(self, kind: str, sub: str = "") -> None:
        self.kind = kind
        self.sub = sub
        self.got_t = False
        self.copy = False  # a COPY FROM STDIN started by this Query/Execute is running
        self.copy_done = False

    def __repr__(self) -> str:
        return self.kind + self.sub


BARRIERS = frozenset("QSHX")  # PostgreSQL flushes its output at these: their replies must come
SILENT = frozenset("Hdcf")  # no reply of their own (CopyData & co. outside COPY are ignored)


class ReplyModel:
    """See the module docstring. `anomalies` lists replies the model did not expect."""

    def __init__(self) -> None:
        self.q: deque[_Item] = deque()
        self.ignoring = False  # PostgreSQL skips input until Sync (an extended-protocol error)
        self.copy: _Item | None = None  # COPY FROM STDIN still consuming input the client sends
        self.status = "I"
        self.unsynced = False  # extended-protocol messages sent since the last Sync or Query
        self.closed = False
        self.anomalies: list[str] = []

    # -- the client side
    def sent(self, m: Msg) -> None:
        kind = m.kind
        if self.copy is not None:
            if kind in "dSH":
                return
            self.copy.copy_done = True  # CopyDone/CopyFail ends it; anything else fails it (08P01)
            self.copy = None
            if kind in "cf":
                return
        if self.ignoring:
            if kind == "S":
                self.ignoring = False
            elif kind != "X":
                return
        sub = m.what if isinstance(m, Describe) else ""
        self.q.append(_Item(kind, sub))
        if kind in "PBDECH":
            self.unsynced = True
        elif kind in "SQ":
            self.unsynced = False

    def waiting(self) -> bool:
        while self.q and self.q[0].kind in SILENT and self.q[0] is not self.copy:
            self.q.popleft()
        return not self.closed and any(i.kind in BARRIERS for i in self.q)

    def between_transactions(self) -> bool:
        """Nothing owed, nothing unsynced, not in COPY, ReadyForQuery said idle."""
        return (not self.closed and not self.q and not self.ignoring and self.copy is None
                and not self.unsynced and self.status == "I")

    def commit_pending(self) -> bool:
        """A request that may commit (a Query or a Sync) is still unanswered."""
        return any(i.kind in "QS" for i in self.q) or self.copy is not None

    # -- the server side
    def received(self, t: str, body: bytes) -> None:
        if t in "NSA":  # notices, ParameterStatus, notifications: at any time
            return
        while self.q and self.q[0].kind in SILENT:
            self.q.popleft()
        if not self.q:
            self.anomalies.append(f"unexpected {t!r} with nothing owed")
            return
        h = self.q[0]
        k = h.kind
        if t == "E":
            if h.copy and not h.copy_done and self.copy is h:
                self.copy = None
            h.copy = False
            if k in "PBDEC":
                self._extended_error()
            elif k not in "QSX":
                self.anomalies.append(f"error reply to {k!r}")
            return
        if k in "QS" and t == "Z":
            self.q.popleft()
            self.status = body[:1].decode()
            return
        if k == "Q":
            if t == "G":
                self._copy_in(h)
            elif t not in "TDCIHdc":
                self.anomalies.append(f"{t!r} in reply to a Query")
            return
        if k == "E":
            if t in "CIs":
                self.q.popleft()
            elif t == "G":
                self._copy_in(h)
            elif t not in "DHdc":
                self.anomalies.append(f"{t!r} in reply to Execute")
            return
        if k == "D":
            if h.sub == "S" and t == "t" and not h.got_t:
                h.got_t = True
            elif t in "Tn":
                self.q.popleft()
            else:
                self.anomalies.append(f"{t!r} in reply to Describe")
            return
        expected = {"P": "1", "B": "2", "C": "3"}.get(k)
        if expected == t:
            self.q.popleft()
        else:
            self.anomalies.append(f"{t!r} in reply to {k!r}")

    def eof(self) -> None:
        self.closed = True
        if self.q and self.q[0].kind == "X":
            self.q.popleft()

    def _extended_error(self) -> None:
        self.q.popleft()
        while self.q and self.q[0].kind not in "SX":
            self.q.popleft()
        if not self.q:
            self.ignoring = True

    def _copy_in(self, h: _Item) -> None:
        h.copy = True
        rest = list(self.q)[1:]
        keep: list[_Item] = []
        done = False
        for i, item in enumerate(rest):
            if item.kind in "dSH":
                continue
            done = True  # CopyDone / CopyFail (consumed) or anything else (fails the COPY)
            keep = rest[i + 1:] if item.kind in "cf" else rest[i:]
            break
        self.q = deque([h, *keep])
        h.copy_done = done
        self.copy = None if done else h


# --------------------------------------------------------------------------------------------
# a connection and its transcript


Norm = tuple[Any, ...]


def normalise(t: str, body: bytes) -> Norm:
    """One reply, as compared between PostgreSQL and the pooler."""
    if t in ("E", "N"):
        f = parse_error_fields(body)
        return (t, *sorted((k, v) for k, v in f.items() if k in ERROR_FIELDS))
    if t == "Z":
        return ("Z", body[:1].decode())
    if t == "K":
        return ("K",)
    if t == "A":  # NotificationResponse: drop the sender's pid
        return ("A", body[4:])
    if t == "S":
        return ("S", *body.rstrip(b"\0").split(b"\0"))
    if t == "D":
        return ("D", *_row(body))
    return (t, body)


def _row(body: bytes) -> list[str | None]:
    """A DataRow's columns as text; long values by their length only (the diff stays readable)."""
    return [v if v is None or len(v) <= 80 else f"<{len(v.encode())} bytes>"
            for v in messages.data_row_values(body)]


def show(n: Norm) -> str:
    t = n[0]
    if t in ("E", "N"):
        f = dict(n[1:])
        return f"{t}({f.get('S')} {f.get('C')} {f.get('M')!r})"
    if t == "Z":
        return f"Z({n[1]})"
    if t == "D":
        return "D" + repr(list(n[1:]))
    if t == "S":
        return "S" + repr(b"=".join(n[1:]))
    if t in ("EOF", "TIMEOUT", "CANCEL", "LOGIN", "SEND-ERROR"):
        return f"<{' '.join(map(str, n))}>"
    body = n[1] if len(n) > 1 else b""
    if isinstance(body, bytes) and len(body) > 60:
        body = body[:60] + b"..."
    return f"{t}{body!r}" if body else t


class Conn:
    """A raw client connection with a transcript: (step index, normalised reply) pairs."""

    def __init__(self, host: str, port: int, db: str, timeout: float = READ_TIMEOUT) -> None:
        self.timeout = timeout
        self.host, self.port = host, port
        self.raw = RawConn(host, port, timeout)
        self.raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each piece goes out now
        self.key: tuple[int, int] | None = None
        try:
            self.raw.startup(USER, db)
        except (OSError, ProtocolEOF, AssertionError) as exc:
            self.raw.close()
            raise LoginFailed(f"login to {host}:{port}/{db} failed: {exc!r}") from exc
        self.key = self.raw.backend_key

    def recv(self, timeout: float) -> tuple[str, bytes]:
        """("EOF"|"TIMEOUT", b"") or (type, body)."""
        self.raw.sock.settimeout(timeout)
        try:
            t, body = self.raw.recv_message()
        except TimeoutError:
            return "TIMEOUT", b""
        except (ProtocolEOF, ConnectionError, OSError):
            return "EOF", b""
        return t.decode(errors="replace"), body

    def close(self, how: str = "close") -> None:
        if how == "rst":
            self.raw.abort()
        else:
            self.raw.close()


class LoginFailed(Exception):
    pass


# --------------------------------------------------------------------------------------------
# the environment: PostgreSQL, one pooler configuration, an admin connection


@dataclass
class FuzzConfig:
    name: str
    workers: int
    mode: str  # "transaction" | "session"


CONFIGS = [
    FuzzConfig("w1-tx", 1, "transaction"),
    FuzzConfig("w1-session", 1, "session"),
    FuzzConfig("w2-tx", 2, "transaction"),
    FuzzConfig("w2-session", 2, "session"),
]

VICTIM_SQL = (
    "SELECT '{tag}', txid_current_if_assigned() IS NULL, now() = statement_timestamp(), "
    "current_setting('search_path'), current_setting('statement_timeout'), "
    "current_setting('lock_timeout'), current_setting('default_transaction_read_only'), "
    "current_setting('default_transaction_isolation'), current_setting('TimeZone'), "
    "current_setting('DateStyle'), current_setting('work_mem'), current_setting('client_min_messages'), "
    "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql OR name NOT LIKE 'PGDOORMAN%'), "
    "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), "
    "(SELECT count(*) FROM pg_cursors), (SELECT count(*) FROM pg_listening_channels()), "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())"
)
VICTIM_COLUMNS = ("tag", "no xid", "no open transaction", "search_path", "statement_timeout",
                  "lock_timeout", "default_transaction_read_only", "default_transaction_isolation",
                  "TimeZone", "DateStyle", "work_mem", "client_min_messages", "leftover prepared statements",
                  "temp tables", "cursors", "LISTENs", "advisory locks")
UNNAMED_PROBE = Bind().encode() + Execute().encode() + Sync().encode()  # no Parse of its own


class FuzzEnv:
    """One pooler configuration for a test module: started once, restarted if it dies."""

    def __init__(self, cfg: FuzzConfig, pg: Cluster, launcher: PoolerLauncher) -> None:
        import psycopg

        self.cfg = cfg
        self.mode = cfg.mode
        self.pg = pg
        self.launcher = launcher
        self._connect_admin = lambda: psycopg.connect(host=pg.host, port=pg.port, user="postgres",
                                                      dbname=DATABASE, autocommit=True,
                                                      options="-c lock_timeout=5s")
        with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname="postgres",
                             autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchall():
                c.execute(f"CREATE DATABASE {DATABASE}")
        self.admin = self._connect_admin()
        self.admin_lock = threading.Lock()
        self.admin.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, v text)")
        self.admin.execute(f"CREATE TABLE IF NOT EXISTS {VICTIM_TABLE} (tag text)")
        self.pooler = self._start()
        self.dirty = False
        self.examples = 0
        self.seconds = 0.0
        self.baseline, self.unnamed_baseline = self._baseline()

    def _start(self) -> Pooler:
        pools = pool_config(POOL, self.mode, 1, users=(USER,), server_database=DATABASE)
        # application_name "": servers report what PostgreSQL reports to a client that sets none
        # (the default "pgdoorman" shows where a rolled-back SET falls back to the pool's value).
        return self.launcher.start(pools, {"workers": self.cfg.workers, "query_wait_timeout": "30s",
                                           "application_name": ""})

    def ensure_pooler(self) -> Pooler:
        if not self.pooler.alive():
            log = self.log_tail()
            self.pooler = self._start()
            raise AssertionError(f"the pooler ({self.cfg.name}) had exited; restarted it. Log tail:\n{log}")
        return self.pooler

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.pooler.log().splitlines()[-n:])

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.admin_lock:
            try:
                cur = self.admin.execute(query, params)
            except Exception:
                if not self.admin.closed and self.admin.info.transaction_status == 0:
                    raise
                self.admin = self._connect_admin()  # a broken admin connection: one retry
                cur = self.admin.execute(query, params)
            return cur.fetchall() if cur.description else []

    def _baseline(self) -> tuple[tuple[Any, ...], list[Norm]]:
        c = Conn(self.pg.host, self.pg.port, DATABASE)
        try:
            c.raw.send(UNNAMED_PROBE)
            unnamed = _read_replies(c, 1, "baseline")
            c.raw.send(Query(VICTIM_SQL.format(tag="TAG")).encode())
            rows = [n for n in _read_replies(c, 1, "baseline") if n[0] == "D"]
            c.raw.send(Terminate().encode())
        finally:
            c.close()
        return rows[0], unnamed

    def reset_tables(self) -> None:
        try:
            self.sql(f"DELETE FROM {TABLE}")
        except Exception as exc:
            who = self.sql("SELECT pid, state, query FROM pg_stat_activity WHERE datname = %s", (DATABASE,))
            raise AssertionError(f"cannot reset {TABLE} ({exc}); backends of {USER}: {who}") from exc

    def table(self) -> list[tuple[Any, ...]]:
        return self.sql(f"SELECT id, md5(v), length(v) FROM {TABLE} ORDER BY id")

    def wait_backend_gone(self, pid: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sql("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)):
            if time.monotonic() > deadline:
                self.sql("SELECT pg_terminate_backend(%s)", (pid,))
                return
            time.sleep(0.005)

    def busy_backends(self) -> list[tuple[Any, ...]]:
        return self.sql("SELECT pid, state, left(query, 60) FROM pg_stat_activity "
                        "WHERE usename = %s AND datname = %s AND state <> 'idle'", (USER, DATABASE))

    def wait_quiet(self, timeout: float = 5.0) -> list[tuple[Any, ...]]:
        """Wait until no backend of USER is busy; returns the busy ones if that never happens."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.busy_backends()
            if not busy or time.monotonic() > deadline:
                return busy
            time.sleep(0.01)

    def kill_servers(self) -> None:
        """After a failure: end every backend of USER so that the next example starts clean."""
        mine = "FROM pg_stat_activity WHERE usename = %s AND datname = %s"
        self.sql(f"SELECT pg_terminate_backend(pid) {mine}", (USER, DATABASE))
        deadline = time.monotonic() + 5
        while self.sql(f"SELECT 1 {mine}", (USER, DATABASE)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        time.sleep(0.05)  # let the pooler notice its servers are gone

    def sleeping(self) -> bool:
        return bool(self.sql("SELECT 1 FROM pg_stat_activity WHERE usename = %s AND datname = %s "
                             "AND wait_event = 'PgSleep'", (USER, DATABASE)))

    def close(self) -> None:
        try:
            self.admin.close()
        except Exception:  # noqa: BLE001
            pass


def _read_replies(c: Conn, ready: int, what: str) -> list[Norm]:
    out: list[Norm] = []
    while sum(1 for n in out if n[0] == "Z") < ready:
        t, body = c.recv(READ_TIMEOUT)
        if t in ("EOF", "TIMEOUT"):
            raise AssertionError(f"{what}: {t} after {[show(n) for n in out]}")
        out.append(normalise(t, body))
    return out


# --------------------------------------------------------------------------------------------
# the victim


class VictimError(AssertionError):
    pass


class Victim:
    """The other client of the one-server pool. check() runs in its own thread (transaction mode:
    concurrently with the attacker) and raises VictimError if what it sees is not its own."""

    def __init__(self, env: FuzzEnv, pooler: Pooler) -> None:
        self.env = env
        self.pooler = pooler
        self.conn: Conn | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fz-victim")
        self.pending: concurrent.futures.Future[None] | None = None
        self.checks = 0
        self.tags: dict[str, str] = {}  # the victim's autocommitted INSERTs: tag -> which check

    def verify_commits(self) -> None:
        """Every INSERT the victim was told was committed is committed (not swallowed by a
        transaction that was rolled back or is still open)."""
        if not self.tags:
            return
        tags = list(self.tags)
        seen = {r[0] for r in self.env.sql(f"SELECT tag FROM {VICTIM_TABLE} WHERE tag = ANY(%s)", (tags,))}
        self.env.sql(f"DELETE FROM {VICTIM_TABLE} WHERE tag = ANY(%s)", (tags,))
        lost = [self.tags[t] for t in tags if t not in seen]
        self.tags = {}
        if lost:
            raise VictimError(f"{lost[0]}: its autocommit INSERT was answered but is not committed "
                              "(it ran in another client's transaction)")

    def start_check(self, where: str) -> None:
        if self.pending is None:
            self.checks += 1
            self.pending = self.pool.submit(self._check, f"victim check {self.checks} ({where})")

    def wait(self) -> None:
        if self.pending is None:
            return
        fut, self.pending = self.pending, None
        try:
            fut.result(timeout=3 * VICTIM_TIMEOUT + 5)
        except concurrent.futures.TimeoutError:
            self.close()
            raise VictimError("victim check never finished") from None

    def check(self, where: str) -> None:
        self.wait()
        self.start_check(where)
        self.wait()

    def _expect(self, what: str, data: bytes, ready: int = 1) -> list[Norm]:
        assert self.conn is not None
        try:
            self.conn.raw.send(data)
        except OSError as exc:
            raise VictimError(f"{what}: send failed: {exc!r}") from exc
        out: list[Norm] = []
        while sum(1 for n in out if n[0] == "Z") < ready:
            t, body = self.conn.recv(VICTIM_TIMEOUT)
            if t == "TIMEOUT":
                raise VictimError(f"{what}: no reply within {VICTIM_TIMEOUT}s; got {[show(n) for n in out]}")
            if t == "EOF":
                raise VictimError(f"{what}: connection closed; got {[show(n) for n in out]}")
            out.append(normalise(t, body))
        return out

    def _check(self, what: str) -> None:
        env = self.env
        if self.conn is None:
            try:
                self.conn = Conn(self.pooler.host, self.pooler.port, POOL, VICTIM_TIMEOUT)
            except LoginFailed as exc:
                raise VictimError(f"{what}: {exc}") from None
        tag = "victim-" + uuid.uuid4().hex[:10]
        # One write, four requests (one round trip): a shifted or stolen answer shows in any of them.
        requests = (UNNAMED_PROBE + Query(VICTIM_SQL.format(tag=tag)).encode()
                    + Query(f"INSERT INTO {VICTIM_TABLE} VALUES ('{tag}')").encode()
                    + Query(f"SELECT '{tag}-2'").encode())
        replies = self._expect(f"{what}: its requests", requests, ready=4)
        parts: list[list[Norm]] = [[]]
        for n in replies:
            parts[-1].append(n)
            if n[0] == "Z":
                parts.append([])
        unnamed, state, insert, second = parts[:4]
        if unnamed != env.unnamed_baseline:
            direct = [show(n) for n in env.unnamed_baseline]
            raise VictimError(f"{what}: Bind to the unnamed statement without a Parse of its own answered "
                              f"{[show(n) for n in unnamed]}, directly: {direct}")
        rows = [n[1:] for n in state if n[0] == "D"]
        expected = (tag, *env.baseline[2:])
        if rows != [expected] or state[-1] != ("Z", "I"):
            if len(rows) == 1 and len(rows[0]) == len(expected):
                diffs = [f"{col}: {a!r} (fresh connection: {b!r})"
                         for col, a, b in zip(VICTIM_COLUMNS, rows[0], expected, strict=True) if a != b]
            else:
                diffs = [f"rows {rows}"]
            raise VictimError(f"{what}: not its own clean session: {'; '.join(diffs)}; "
                              f"replies {[show(n) for n in state]}")
        if ("C", b"INSERT 0 1\0") not in insert or insert[-1] != ("Z", "I"):
            raise VictimError(f"{what}: autocommit INSERT answered {[show(n) for n in insert]}")
        self.tags[tag] = what
        if [n for n in second if n[0] == "D"] != [("D", f"{tag}-2")] or second[-1] != ("Z", "I"):
            raise VictimError(f"{what}: second query answered {[show(n) for n in second]}")

    def close(self) -> None:
        if self.conn is not None:
            try:
                if self.pending is None:
                    self.conn.raw.sock.sendall(Terminate().encode())
                self.conn.raw.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.conn = None


# --------------------------------------------------------------------------------------------
# running a script


@dataclass
class Run:
    target: str
    transcript: list[tuple[int, Norm]] = field(default_factory=list)
    cancel_strict: dict[int, bool] = field(default_factory=dict)  # cancel step: its query was seen running
    table: list[tuple[Any, ...]] | None = None
    table_certain: bool = True
    anomalies: list[str] = field(default_factory=list)
    failure: str = ""  # a hang, or the victim's complaint (pooled run only)
    seconds: float = 0.0


def run_script(env: FuzzEnv, script: Sequence[Step], target: str) -> Run:
    """Run `script` against "direct" PostgreSQL or the "pooled" pgdoorman of env."""
    started = time.monotonic()
    run = Run(target)
    env.reset_tables()
    pooler = env.ensure_pooler() if target == "pooled" else None
    host, port, db = (pooler.host, pooler.port, POOL) if pooler else (env.pg.host, env.pg.port, DATABASE)
    victim = Victim(env, pooler) if pooler else None
    concurrent_victim = victim is not None and env.mode == "transaction"
    model = ReplyModel()
    conn: Conn | None = None
    try:
        try:
            conn = Conn(host, port, db)
        except LoginFailed as exc:
            run.failure = str(exc)
            return run
        run.transcript.append((-1, ("LOGIN", "ok")))
        gone = False
        for k, step in enumerate(script):
            for m in step.msgs:
                model.sent(m)
            pieces = step.pieces()
            n_send = len(pieces) if step.hangup == "" or step.hangup_after < 0 else step.hangup_after
            for i, piece in enumerate(pieces[:n_send]):
                if i:
                    time.sleep(PIECE_PAUSE)
                if (i and i == n_send - 1 and concurrent_victim and victim is not None
                        and not model.unsynced and model.status == "I"):
                    # The victim asks while the attacker's last piece is still unwritten: a server
                    # lent now would get the victim's bytes in the middle of the attacker's message.
                    # (Not when the step leaves the attacker in a batch or a transaction: then it
                    # holds its server, rightly, and the one-server pool makes the victim wait.)
                    victim.start_check(f"before the last piece of step {k}")
                    time.sleep(VICTIM_HEADSTART)
                try:
                    conn.raw.sock.sendall(piece)
                except OSError:
                    break  # the other side closed: what it said before is still read below
            if any(isinstance(m, Terminate) for m in step.msgs):
                _shut_wr(conn)
            if step.hangup:
                conn.close(step.hangup)
                run.table_certain = not model.commit_pending()
                gone = True
                break
            if step.cancel:
                run.cancel_strict[k] = _cancel(env, conn, host, port)
            if not _read(run, conn, model, k, env):
                gone = True
                break
            if model.closed:
                gone = True
                break
            if concurrent_victim and victim is not None and model.between_transactions():
                victim.check(f"after step {k}")
        if not gone:
            k = len(script)
            model.sent(Terminate())
            try:
                conn.raw.sock.sendall(Terminate().encode())
            except OSError:
                pass
            _shut_wr(conn)
            _read(run, conn, model, k, env)
        conn.close()
        if target == "direct" and conn.key:
            env.wait_backend_gone(conn.key[0])
        if victim is not None:
            victim.wait()
            victim.check("after the script, attacker gone")
            victim.close()
            victim.verify_commits()
            busy = env.wait_quiet()
            if busy:
                run.failure = f"servers still busy after every client left: {busy}"
    except VictimError as exc:
        run.failure = str(exc)
    finally:
        if conn is not None:
            conn.close()
        if victim is not None:
            victim.close()
        run.anomalies = model.anomalies
        run.seconds = time.monotonic() - started
    if not run.failure:
        run.table = env.table()
    return run


def _shut_wr(conn: Conn) -> None:
    try:
        conn.raw.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _read(run: Run, conn: Conn, model: ReplyModel, k: int, env: FuzzEnv) -> bool:
    """Read the replies owed after step k; False when the connection ended or a reply never came."""
    while model.waiting():
        t, body = conn.recv(READ_TIMEOUT)
        if t == "TIMEOUT":
            run.transcript.append((k, ("TIMEOUT", f"no reply within {READ_TIMEOUT}s after step {k}",
                                       f"waiting for {list(model.q)}")))
            run.failure = run.failure or f"no reply within {READ_TIMEOUT}s after step {k} ({run.target})"
            return False
        if t == "EOF":
            run.transcript.append((k, ("EOF",)))
            model.eof()
            return False
        run.transcript.append((k, normalise(t, body)))
        model.received(t, body)
    return True


def _cancel(env: FuzzEnv, conn: Conn, host: str, port: int) -> bool:
    """Send a CancelRequest for conn once its query sleeps; whether it was seen sleeping."""
    deadline = time.monotonic() + READ_TIMEOUT
    running = False
    while time.monotonic() < deadline:
        if env.sleeping():
            running = True
            break
        if conn.raw.buf or select.select([conn.raw.sock], [], [], 0.005)[0]:
            break  # a reply came first: the query is not sleeping (failed, or never got that far)
    if conn.key is not None:
        try:
            with socket.create_connection((host, port), timeout=READ_TIMEOUT) as s:
                s.sendall(cancel_request(*conn.key))
                s.settimeout(READ_TIMEOUT)
                try:
                    s.recv(1)  # the server closes it when done
                except OSError:
                    pass
        except OSError:
            pass
    return running


# --------------------------------------------------------------------------------------------
# comparison


def comparable(run: Run) -> list[tuple[int, Norm]]:
    """The transcript with each cancel step reduced to its outcome (canceled or completed)."""
    out: list[tuple[int, Norm]] = []
    steps: dict[int, list[Norm]] = {}
    for k, n in run.transcript:
        steps.setdefault(k, []).append(n)
    for k, msgs in steps.items():
        if k not in run.cancel_strict:
            out += [(k, n) for n in msgs]
            continue
        canceled = any(n[0] == "E" and dict(n[1:]).get("C") == "57014" for n in msgs)
        out.append((k, ("CANCEL", "canceled" if canceled else "completed")))
        out += [(k, n) for n in msgs
                if n[0] not in ("T", "D", "C") and not (n[0] == "E" and dict(n[1:]).get("C") == "57014")]
    return out


def _cancel_loose(direct: Run, pooled: Run, a: list[tuple[int, Norm]], b: list[tuple[int, Norm]]) -> None:
    """Where either run did not see the query running when it cancelled, either outcome is fine."""
    for k, seen in direct.cancel_strict.items():
        if seen and pooled.cancel_strict.get(k, False):
            continue
        for lst in (a, b):
            for i, (kk, n) in enumerate(lst):
                if kk == k and n[0] == "CANCEL":
                    lst[i] = (k, ("CANCEL", "canceled-or-completed"))


def _unflushed_tail_loose(script: Sequence[Step], b: list) -> None:
    """A last step with no Sync, Flush or Query before the closing Terminate: PostgreSQL never
    flushes its replies, while the pooler may already have answered a cached statement's Parse or
    a Close itself. Those two replies of that step only are not compared (docs/protocol.md)."""
    if not script or any(isinstance(msg, (Sync, Flush, Query)) for msg in script[-1].msgs):
        return
    last = len(script) - 1
    b[:] = [(k, n) for k, n in b if not (k == last and n[0] in ("1", "3"))]


def compare(script: Sequence[Step], direct: Run, pooled: Run, env: FuzzEnv) -> str:
    """'' if the pooled run is indistinguishable from the direct run, else a report."""
    a, b = comparable(direct), comparable(pooled)
    _cancel_loose(direct, pooled, a, b)
    _unflushed_tail_loose(script, b)
    problems = []
    if pooled.failure:
        problems.append(pooled.failure)
    if [n for _, n in a] != [n for _, n in b]:
        i = 0
        while i < min(len(a), len(b)) and a[i][1] == b[i][1]:
            i += 1
        lo = max(0, i - 6)
        lines = [f"replies differ at reply {i} (step {(a[i] if i < len(a) else b[i])[0]}):"]
        lines.append("  direct  : " + "  ".join(f"[{k}]{show(n)}" for k, n in a[lo:i + 8]))
        lines.append("  pgdoorman: " + "  ".join(f"[{k}]{show(n)}" for k, n in b[lo:i + 8]))
        problems.append("\n".join(lines))
    if (not problems and direct.table_certain and pooled.table_certain and direct.table is not None
            and pooled.table is not None and direct.table != pooled.table):
        problems.append(f"committed rows of {TABLE} differ:\n  direct   : {direct.table}\n"
                        f"  pgdoorman: {pooled.table}")
    if not problems:
        return ""
    text = (f"[{env.cfg.name}: workers={env.cfg.workers}, {env.mode} mode, pool_size=1]\n"
            + "\n".join(problems))
    if direct.anomalies:
        text += f"\n(note: the reply model was surprised by the direct run too: {direct.anomalies[:5]})"
    text += "\n\nregression script (tests/fuzz/test_fuzz_regressions.py):\n" + script_source(script)
    text += "\n\npooler log tail:\n" + env.log_tail(25)
    return text


class FuzzerBug(AssertionError):
    """The direct run itself did not behave as the reply model predicts: fix the fuzzer."""


def check_script(env: FuzzEnv, script: Sequence[Step],
                 on_result: Callable[[Run, Run], None] | None = None) -> None:
    """Run directly and through the pooler; AssertionError describing the first difference."""
    started = time.monotonic()
    if env.dirty:
        env.kill_servers()
        env.dirty = False
    direct = run_script(env, script, "direct")
    if direct.failure:
        raise FuzzerBug(f"direct run failed ({direct.failure}); replies "
                        f"{[(k, show(n)) for k, n in direct.transcript]}\n{script_source(script)}")
    try:
        pooled = run_script(env, script, "pooled")
        if on_result is not None:
            on_result(direct, pooled)
        report = compare(script, direct, pooled, env)
    except BaseException:
        env.dirty = True
        raise
    finally:
        env.examples += 1
        env.seconds += time.monotonic() - started
    if report:
        env.dirty = True
        raise AssertionError(report)
