"""Every reply to its own client (issue 8): the server's protocol state, tried the nasty way.

Each test drives one misbehaving client with raw v3 messages (split across reads, several in one
write, abandoned at awkward points by FIN or RST) on a pool with ONE server, then lets a victim
client (rawproto.victim) take that server: it must be served promptly and see only its own rows, no
open transaction, default settings and no temp table, and its autocommit write must be committed.
Where the misbehaving client stays, what it receives is compared message by message with what the
same script receives directly from PostgreSQL.

Cases of the issue pinned here: 1 (large simple Query), 2 (extended protocol without Sync),
4 (reply bookkeeping: COPY in the extended protocol, CopyFail, Query in a failed batch), 5 (a client
message half written when the server finishes), 6a (Query and Terminate together), 7 (a 100 MB
Bind parameter) and 11 (the unnamed statement is per client).
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time

import pytest
from helpers import RawConn, cancel_request, pool_config, wait_until
from rawproto import (
    COPY_DONE,
    DB,
    FLUSH,
    SPLITS,
    SYNC,
    TERMINATE,
    USER,
    Q,
    VictimThread,
    big_query,
    bind,
    copy_data,
    copy_fail,
    describe,
    direct,
    errors_of,
    execute,
    hang_up,
    new_tag,
    normalise,
    nothing_more,
    parse,
    peak_rss_kib,
    read_replies,
    read_through,
    read_until,
    rows_of,
    send_split,
    status_of,
    tag_count,
    via,
    victim,
    wait_active,
)

MODES = ["transaction", "session"]
WORKERS = [1, 2]
HANG_UPS = ["close", "rst"]
BAD_SQL = "SELECT FROM WHERE nonsense"


@pytest.fixture
def one_server(start_pooler):
    """Factory: a pooler whose pool DB has exactly one server (pool_size 1) for trust_user."""

    def make(mode: str = "transaction", workers: int = 1, **overrides):
        return start_pooler(pool_config(DB, mode, pool_size=1, users=[USER], **overrides),
                            {"workers": workers})

    return make


@pytest.fixture
def copy_table(pg):
    pg.psql("DROP TABLE IF EXISTS t_copy_ps; CREATE TABLE t_copy_ps (a int, v text)", db="testdb")
    yield "t_copy_ps"


# --------------------------------------------------------------------------------------------
# case 1: a simple Query larger than one socket read is owed a reply from its first byte


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", HANG_UPS)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("txn", ["in-transaction", "autocommit"])
def test_large_query_client_leaves_while_it_runs(pg, one_server, mode, workers, how, split, txn):
    """A 200 KB `[BEGIN; INSERT;] SELECT pg_sleep(1), 'stale'` and the client vanishes while it runs:
    the next client must not get its result (nor the replies of the pooler's own reset), nor its
    open transaction, nor commit its INSERT."""
    p = one_server(mode, workers)
    tag = new_tag("bigq")
    a = via(p)
    sql = f"SELECT pg_sleep(1), 'stale-{tag}'"
    if txn == "in-transaction":
        sql = f"BEGIN; INSERT INTO t_hygiene VALUES (1, '{tag}'); {sql}"
    send_split(a, big_query(sql, 200_000, tag), SPLITS[split])
    wait_active(pg, tag)
    hang_up(a, how)
    victim(p, pg)
    time.sleep(0.5)
    assert tag_count(pg, tag) == 0, "the vanished client's INSERT was committed"


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
def test_large_query_can_be_cancelled(pg, one_server, mode, workers):
    """A cancel of a running 200 KB query reaches it (57014), as it would directly."""
    p = one_server(mode, workers)
    tag = new_tag("bigcancel")
    a = via(p)
    try:
        send_split(a, big_query("SELECT pg_sleep(20)", 200_000, tag), SPLITS["cut-everywhere"])
        wait_active(pg, tag)
        assert a.backend_key is not None
        with RawConn.for_pooler(p) as c:
            c.send(cancel_request(*a.backend_key))
        msgs = read_replies(a, timeout=8, what="the cancelled large query")
        assert [e.get("C") for e in errors_of(msgs)] == ["57014"], normalise(msgs)
        assert status_of(msgs) == b"I"
        a.send(Q(f"SELECT 'after-{tag}'"))
        assert rows_of(read_replies(a, what="query after the cancel")) == [[f"after-{tag}"]]
        a.send(TERMINATE)
    finally:
        a.close()
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '/*{tag}*/%'")
    victim(p, pg)


# --------------------------------------------------------------------------------------------
# case 2: Parse/Bind/Execute(/Flush) with no Sync leaves the backend in an implicit transaction


def _unsynced(conn: RawConn, batch: list[bytes], point: str, expect_last: bytes) -> None:
    """Send an extended-protocol batch without Sync and stop at `point`:
    after-replies: one write, replies read; before-replies: one write per message, nothing read;
    no-flush: the batch without its Flush (PostgreSQL executes it anyway, replies stay buffered)."""
    if point == "after-replies":
        conn.send(b"".join(batch))
        msgs = read_until(conn, lambda ms: bool(ms) and ms[-1][0] == expect_last, what="unsynced batch")
        assert b"Z" not in [t for t, _ in msgs]
    elif point == "before-replies":
        for part in batch:
            conn.send(part)
            time.sleep(0.02)
        time.sleep(0.3)
    else:
        conn.send(b"".join(m for m in batch if m != FLUSH))
        time.sleep(0.3)


UNSYNCED_POINTS = ["after-replies", "before-replies", "no-flush"]


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", HANG_UPS)
@pytest.mark.parametrize("point", UNSYNCED_POINTS)
def test_unsynced_insert_is_not_committed_by_next_client(pg, one_server, mode, workers, how, point):
    p = one_server(mode, workers)
    tag = new_tag("unsynced")
    a = via(p)
    batch = [parse(f"INSERT INTO t_hygiene VALUES (2, '{tag}')"), bind(), execute(), FLUSH]
    _unsynced(a, batch, point, b"C")
    hang_up(a, how)
    victim(p, pg)
    time.sleep(0.3)
    assert tag_count(pg, tag) == 0, "the vanished client's unsynced INSERT was committed"


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", HANG_UPS)
@pytest.mark.parametrize("point", UNSYNCED_POINTS)
def test_unsynced_begin_does_not_swallow_next_clients_writes(pg, one_server, mode, workers, how, point):
    """Parse/Bind/Execute of BEGIN with no Sync, then gone: the victim's autocommit INSERT must commit."""
    p = one_server(mode, workers)
    a = via(p)
    _unsynced(a, [parse("BEGIN"), bind(), execute(), FLUSH], point, b"C")
    hang_up(a, how)
    victim(p, pg)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", HANG_UPS)
def test_failed_parse_without_sync_does_not_hang_next_client(pg, one_server, mode, workers, how):
    """After a failed Parse the backend skips everything until Sync: the next client must not wait
    forever for answers to queries the backend throws away."""
    p = one_server(mode, workers)
    a = via(p)
    a.send(parse(BAD_SQL) + FLUSH)
    msgs = read_through(a, b"E", what="failed Parse + Flush")
    assert errors_of(msgs)[0]["C"] == "42601"
    hang_up(a, how)
    victim(p, pg)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("how", HANG_UPS)
@pytest.mark.parametrize("batch", ["ok", "failed"])
def test_session_unsynced_batch_leaves_no_session_state(pg, one_server, workers, how, batch):
    """Session mode: a session with a temp table and SETs ends inside an unsynced batch (one that
    worked, or a failed Parse): the next session must still start clean (the reset must work)."""
    p = one_server("session", workers)
    a = via(p)
    a.send(Q("CREATE TEMP TABLE state_leak (x int); SET statement_timeout = '4321'; "
             "SET search_path = pg_catalog"))
    msgs = read_replies(a, what="session setup")
    assert not errors_of(msgs), errors_of(msgs)
    if batch == "ok":
        a.send(parse("SELECT 1") + bind() + execute() + FLUSH)
        read_through(a, b"C", what="unsynced batch")
    else:
        a.send(parse(BAD_SQL) + FLUSH)
        read_through(a, b"E", what="failed unsynced Parse")
    hang_up(a, how)
    victim(p, pg)


# --------------------------------------------------------------------------------------------
# case 4: reply bookkeeping that is off by one pins the server


def _copy_extended(conn: RawConn, tag: str, fail: bool) -> list:
    """libpq's PQexecParams("COPY ... FROM STDIN"): Parse/Bind/Describe/Execute/Sync, then the data
    and CopyDone (or CopyFail) followed by a second Sync. PostgreSQL ignores the first Sync in copy-in
    mode: one ReadyForQuery in all."""
    conn.send(parse("COPY t_copy_ps FROM STDIN") + bind() + describe(b"P") + execute() + SYNC)
    msgs = read_through(conn, b"G", what="CopyInResponse")
    rows = copy_data(f"1\t{tag}\n".encode()) + copy_data(f"2\t{tag}\n".encode())
    if fail:
        conn.send(rows + copy_fail("client gave up") + SYNC)
    else:
        conn.send(rows + COPY_DONE + SYNC)
    msgs += read_replies(conn, what="end of COPY")
    msgs += nothing_more(conn)
    conn.send(Q(f"SELECT count(*) FROM t_copy_ps WHERE v = '{tag}'"))
    msgs += read_replies(conn, what="query after COPY")
    return msgs


def _query_in_failed_batch(conn: RawConn, tag: str, variant: str) -> list:
    """A Query inside a batch that has already failed is skipped (no reply of its own)."""
    if variant == "one-write":
        conn.send(parse(BAD_SQL) + bind() + execute() + Q(f"SELECT 'skipped-{tag}'") + SYNC)
        msgs = read_replies(conn, what="failed batch")
    else:  # the Query sent after the client has seen the error
        conn.send(parse(BAD_SQL) + bind() + execute() + FLUSH)
        msgs = read_through(conn, b"E", what="failed batch")
        conn.send(Q(f"SELECT 'skipped-{tag}'"))
        time.sleep(0.2)
        conn.send(SYNC)
        msgs += read_replies(conn, what="Sync after the failed batch")
    msgs += nothing_more(conn)
    conn.send(Q(f"SELECT 'after-{tag}'"))
    msgs += read_replies(conn, what="query after the failed batch")
    return msgs


def _pin_check(pg, p, mode: str, a: RawConn, tag: str) -> None:
    """The client that ran the script is still connected and idle: in transaction mode the one server
    must serve another client now; in both modes once it has left."""
    if mode == "transaction":
        victim(p, pg, what="victim while the first client is idle")
        a.send(Q(f"SELECT 'still-{tag}'"))
        assert rows_of(read_replies(a, what="first client afterwards")) == [[f"still-{tag}"]]
    a.send(TERMINATE)
    a.close()
    victim(p, pg, what="victim after the first client left")


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("end", ["copy-done", "copy-fail"])
def test_copy_in_extended_protocol(pg, one_server, copy_table, mode, workers, end):
    fail = end == "copy-fail"
    tag = new_tag("copyx")
    d = direct(pg)
    expected = _copy_extended(d, tag + "-direct", fail)
    d.close()
    p = one_server(mode, workers)
    a = via(p)
    got = _copy_extended(a, tag, fail)
    # the tags differ only in the count query's result, which is the same
    assert normalise(got) == normalise(expected)
    assert rows_of(got) == [["0" if fail else "2"]]
    _pin_check(pg, p, mode, a, tag)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["one-write", "after-error"])
def test_query_inside_failed_batch(pg, one_server, mode, workers, variant):
    tag = new_tag("failedq")
    d = direct(pg)
    expected = _query_in_failed_batch(d, tag, variant)
    d.close()
    assert rows_of(expected) == [[f"after-{tag}"]]
    p = one_server(mode, workers)
    a = via(p)
    got = _query_in_failed_batch(a, tag, variant)
    assert normalise(got) == normalise(expected)
    _pin_check(pg, p, mode, a, tag)


# --------------------------------------------------------------------------------------------
# case 5: a server is never released while a client message is half written to it


def _copy_error_mid_copydata(conn: RawConn, tag: str, after=None) -> list:
    """COPY FROM STDIN fails on the first CopyData while the client is still writing a 1 MB CopyData.
    `after` runs once the ErrorResponse and ReadyForQuery have arrived, before the rest is sent."""
    conn.send(Q("COPY t_copy_ps FROM STDIN"))
    msgs = read_through(conn, b"G", what="CopyInResponse")
    big = copy_data(b"9\tfiller\n" * 100_000)
    conn.send(copy_data(b"notanint\tbad\n") + big[:20_000])
    msgs += read_replies(conn, what="COPY error")
    if after is not None:
        after()
    send_split(conn, big[20_000:], (1, 4, 65536, 300_000, 600_000), pause=0.1)
    conn.send(COPY_DONE + Q(f"SELECT 'after-{tag}'"))
    msgs += read_replies(conn, what="query after the failed COPY")
    return msgs


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("end", ["finish", *HANG_UPS])
def test_copy_fails_while_copydata_half_written(pg, one_server, copy_table, mode, workers, end):
    tag = new_tag("copymid")
    p = one_server(mode, workers)
    a = via(p)
    if end == "finish":
        d = direct(pg)
        expected = _copy_error_mid_copydata(d, tag)
        d.close()
        assert [e["C"] for e in errors_of(expected)] == ["22P02"]
        assert rows_of(expected) == [[f"after-{tag}"]]
        victims = []

        def start_victim() -> None:
            if mode == "transaction":  # in session mode the server is this client's anyway
                victims.append(VictimThread(p, pg))
                victims[-1].start()
                time.sleep(0.3)

        got = _copy_error_mid_copydata(a, tag, after=start_victim)
        assert normalise(got) == normalise(expected)
        for v in victims:
            v.check()
        a.send(TERMINATE)
        a.close()
    else:
        a.send(Q("COPY t_copy_ps FROM STDIN"))
        read_through(a, b"G", what="CopyInResponse")
        a.send(copy_data(b"notanint\tbad\n") + copy_data(b"9\tfiller\n" * 100_000)[:20_000])
        msgs = read_replies(a, what="COPY error")
        assert [e["C"] for e in errors_of(msgs)] == ["22P02"]
        hang_up(a, end)
    victim(p, pg)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("end", ["finish", *HANG_UPS])
def test_small_query_pipelined_before_large_one(pg, one_server, mode, workers, end):
    """A small Query and the first 30 KB of a 300 KB Query in one write: the small one is answered
    while the large one is half written to the server."""
    tag = new_tag("pipelined")
    small = Q(f"SELECT 'small-{tag}'")
    large = big_query(f"SELECT 'large-{tag}'", 300_000)
    p = one_server(mode, workers)
    a = via(p)
    a.send(small + large[:30_000])
    msgs = read_replies(a, what="small query")
    assert rows_of(msgs) == [[f"small-{tag}"]]
    if end == "finish":
        v = None
        if mode == "transaction":
            v = VictimThread(p, pg)
            v.start()
            time.sleep(0.3)
        send_split(a, large[30_000:], (1, 4, 40_000, 100_000), pause=0.1)
        msgs = read_replies(a, what="large query")
        assert rows_of(msgs) == [[f"large-{tag}"]]
        if v is not None:
            v.check()
        a.send(TERMINATE)
        a.close()
    else:
        hang_up(a, end)
    victim(p, pg)


# --------------------------------------------------------------------------------------------
# case 6a: a Query followed by Terminate is run, as PostgreSQL runs it


def _query_then_terminate(conn: RawConn, tag: str, writes: str, wait_for_eof: bool) -> None:
    data = Q(f"INSERT INTO t_hygiene VALUES (6, '{tag}')")
    if writes == "same-write":
        conn.send(data + TERMINATE)
    else:
        conn.send(data)
        conn.send(TERMINATE)
    if wait_for_eof:
        _, closed = conn.read_all(timeout=10)
        assert closed, "the connection was not closed after Terminate"
    conn.close()


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize(("mode", "server"), [("transaction", "free"), ("transaction", "busy"),
                                              ("session", "free")])
@pytest.mark.parametrize("writes", ["same-write", "next-write"])
def test_query_followed_by_terminate_runs(pg, one_server, mode, workers, writes, server):
    """free: libpq style, Query + Terminate and the socket closed at once. busy (transaction mode):
    the one server is held by another client's open transaction for a moment, and the client waits
    for the pooler to hang up."""
    tag = new_tag("qx")
    d = direct(pg)
    _query_then_terminate(d, tag + "-direct", writes, wait_for_eof=False)
    assert wait_until(lambda: tag_count(pg, tag + "-direct") == 1, timeout=5)
    p = one_server(mode, workers)
    holder = None
    if server == "busy":
        holder = via(p)
        holder.send(Q("BEGIN"))
        read_replies(holder, what="holder BEGIN")
    a = via(p)
    if holder is None:
        _query_then_terminate(a, tag, writes, wait_for_eof=False)
    else:
        waiter = threading.Thread(target=_query_then_terminate, args=(a, tag, writes, True), daemon=True)
        waiter.start()
        time.sleep(0.5)
        holder.send(Q("COMMIT"))
        read_replies(holder, what="holder COMMIT")
        holder.send(TERMINATE)
        holder.close()
        waiter.join(15)
        assert not waiter.is_alive()
    assert wait_until(lambda: tag_count(pg, tag) == 1, timeout=10), \
        "the Query sent with the Terminate never ran"
    victim(p, pg)


# --------------------------------------------------------------------------------------------
# case 7: a message spanning many reads streams through in O(n)

BIG_PARAM = 100 * 1000 * 1000


def test_100mb_bind_parameter(pg, one_server):
    """SELECT length($1), md5($1) with a 100 MB parameter, sent in 1 MB writes, through one worker.

    The bounds are deliberately loose (speed is measured by bench/large_message.py): the old
    re-concatenation took about 57 s and 225 MB; PostgreSQL directly and PgBouncer take 1 to 2 s."""
    p = one_server("transaction", 1)
    a = via(p, timeout=60)
    _, rss_before = peak_rss_kib(p.proc.pid)
    value = b"0123456789abcdef" * (BIG_PARAM // 16)
    body_head = b"\0\0" + struct.pack("!HHi", 0, 1, len(value))
    body_tail = struct.pack("!H", 0)
    t0 = time.monotonic()
    a.send(parse("SELECT length($1::text), md5($1::text)"))
    a.send(b"B" + struct.pack("!I", 4 + len(body_head) + len(value) + len(body_tail)) + body_head)
    view = memoryview(value)
    for i in range(0, len(value), 1 << 20):
        a.sock.sendall(view[i:i + (1 << 20)])
    a.send(body_tail + execute() + SYNC)
    msgs = read_replies(a, timeout=60, what="100 MB Bind")
    elapsed = time.monotonic() - t0
    hwm, _ = peak_rss_kib(p.proc.pid)
    assert not errors_of(msgs), errors_of(msgs)
    assert rows_of(msgs) == [[str(len(value)), hashlib.md5(value).hexdigest()]]
    print(f"100 MB Bind through pgdoorman: {elapsed:.1f} s, worker VmHWM {hwm // 1024} MB "
          f"(RSS before {rss_before // 1024} MB)")
    assert elapsed < 20, f"100 MB Bind took {elapsed:.1f} s"
    assert hwm - rss_before < 64 * 1024, \
        f"the pooler's peak RSS grew by {(hwm - rss_before) // 1024} MB for one 100 MB message"
    a.send(Q("SELECT 'after'"))
    assert rows_of(read_replies(a)) == [["after"]]


# --------------------------------------------------------------------------------------------
# case 11: each client's unnamed statement is its own


def _use_unnamed(conn: RawConn, what: str) -> list:
    if what == "bind":
        conn.send(bind() + execute() + SYNC)
    else:
        conn.send(describe(b"S") + SYNC)
    return read_replies(conn, what=f"{what} of the unnamed statement")


def _unnamed_case(pg, p, what: str, first: str, batch: str) -> None:
    d = direct(pg)
    expected = _use_unnamed(d, what)
    d.close()
    assert [(e["C"], e["M"]) for e in errors_of(expected)] == \
        [("26000", "unnamed prepared statement does not exist")]
    secret = new_tag("secret")
    a = via(p)
    sql = f"SELECT '{secret}' AS mine"
    if batch == "parse-only":
        a.send(parse(sql) + SYNC)
    else:  # libpq's PQexecParams: the unnamed statement stays on the server afterwards
        a.send(parse(sql) + bind() + describe(b"P") + execute() + SYNC)
    msgs = read_replies(a, what="first client's unnamed statement")
    assert not errors_of(msgs)
    if first == "gone":
        a.send(TERMINATE)
        a.close()
        time.sleep(0.2)
    b = via(p)
    got = _use_unnamed(b, what)
    assert secret not in repr(got), "the second client ran the first client's unnamed statement"
    assert normalise(got) == normalise(expected)
    b.send(Q("SELECT 'b-after'"))
    assert rows_of(read_replies(b)) == [["b-after"]]
    b.send(TERMINATE)
    b.close()
    if first == "connected":
        a.send(Q("SELECT 'a-after'"))
        assert rows_of(read_replies(a)) == [["a-after"]]
        a.close()


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("what", ["bind", "describe"])
@pytest.mark.parametrize("first", ["connected", "gone"])
@pytest.mark.parametrize("batch", ["parse-only", "exec-params"])
def test_unnamed_statement_is_per_client(pg, one_server, workers, what, first, batch):
    _unnamed_case(pg, one_server("transaction", workers), what, first, batch)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("what", ["bind", "describe"])
@pytest.mark.parametrize("batch", ["parse-only", "exec-params"])
def test_unnamed_statement_is_per_session(pg, one_server, workers, what, batch):
    _unnamed_case(pg, one_server("session", workers), what, "gone", batch)



def _describe_then_exec(conn: RawConn, sql: str, between=None) -> list:
    """pgx's describe-exec mode: Parse + Describe + Sync, then (another round trip, another
    transaction) Bind + Execute of the same unnamed statement, with no Parse."""
    conn.send(parse(sql) + describe(b"S") + SYNC)
    first = read_replies(conn, what="Parse + Describe")
    if between is not None:
        between()
    conn.send(bind(("7",)) + execute() + SYNC)
    return first + read_replies(conn, what="Bind + Execute without Parse")


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("other", ["simple-query", "own-unnamed", "none"])
def test_unnamed_statement_outlives_the_transaction(pg, one_server, workers, other):
    """Case 11's other half: a client's unnamed statement lives on after Sync, until its own next
    unnamed Parse or simple Query. Another client using the one server in between (a simple Query
    drops the server's unnamed statement; an unnamed Parse replaces it) must not change what the
    client's later Bind runs: the pooler parses the client's statement again, as directly it still
    exists."""
    p = one_server("transaction", workers)
    sql = "SELECT $1::int * 6 AS mine"
    d = direct(pg)
    expected = _describe_then_exec(d, sql)
    d.close()
    assert rows_of(expected) == [["42"]]
    a, b = via(p), via(p)

    def other_client() -> None:
        if other == "simple-query":
            b.send(Q("SELECT 'b'"))
        elif other == "own-unnamed":
            b.send(parse("SELECT 'theirs' AS x") + bind() + execute() + SYNC)
        else:
            return
        assert not errors_of(read_replies(b, what="the other client's request"))

    got = _describe_then_exec(a, sql, other_client)
    assert normalise(got) == normalise(expected)
    # The other client's own unnamed statement is still its own, too.
    if other == "own-unnamed":
        b.send(bind() + execute() + SYNC)
        assert rows_of(read_replies(b)) == [["theirs"]]
    # A simple Query drops the client's unnamed statement, as directly: then 26000.
    a.send(Q("SELECT 1"))
    read_replies(a)
    a.send(bind(("7",)) + execute() + SYNC)
    assert [e["C"] for e in errors_of(read_replies(a))] == ["26000"]
    a.close()
    b.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_requests_then_eof_while_waiting_for_a_server(pg, one_server, workers):
    """Case 6 family: a client sends requests, Terminate, and shuts its side while the one server
    is busy with another client. PostgreSQL would answer them before closing: so must the pooler,
    once the server is free (it closed at the EOF and the requests never ran)."""
    import socket

    p = one_server("transaction", workers)
    holder = via(p)
    holder.send(Q("BEGIN"))
    read_replies(holder)
    expected_conn = direct(pg)
    batch = parse("SELECT 1 / $1::int") + bind(("0",)) + execute() + parse("SELECT $1::int + 1") \
        + bind(("1",)) + execute() + SYNC
    expected_conn.send(batch)
    expected = read_replies(expected_conn)
    expected_conn.close()
    a = via(p)
    a.send(batch + TERMINATE)
    a.sock.shutdown(socket.SHUT_WR)
    time.sleep(0.3)  # it waits for the server, with its side shut
    holder.send(Q("COMMIT"))
    read_replies(holder)
    got = read_replies(a, what="replies after Terminate and EOF")
    assert normalise(got) == normalise(expected)
    assert nothing_more(a) == []
    holder.close()
