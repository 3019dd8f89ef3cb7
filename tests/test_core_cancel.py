"""Cancel requests through the pooler reach exactly the query of the client that sent them."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from helpers import RawConn, aconnect, cancel_request, pconnect, wait_for_active_query
from psycopg import errors as pgerr


def _run_in_thread(fn):
    box: dict[str, object] = {}

    def target():
        t0 = time.monotonic()
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test thread
            box["error"] = e
        box["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


@pytest.mark.parametrize("db", ["tx", "sess"])
def test_psycopg_cancel_long_query(pg, pooler, db):
    sleep_a = f"SELECT pg_sleep(30) /* cancel {db} */"
    with pconnect(pooler, db) as a, pconnect(pooler, db) as b:
        ta, box_a = _run_in_thread(lambda: a.execute(sleep_a).fetchone())
        tb, box_b = _run_in_thread(lambda: b.execute("SELECT pg_sleep(1), 42").fetchone())
        wait_for_active_query(pg, sleep_a)  # cancel only once A's query runs on a server
        a.cancel_safe(timeout=10)
        ta.join(10)
        assert not ta.is_alive(), "A's pg_sleep(30) still runs 10 s after the cancel"
        err = box_a.get("error")
        assert isinstance(err, pgerr.QueryCanceled), f"expected 57014, got {box_a!r}"
        assert err.sqlstate == "57014"
        tb.join(15)
        assert not tb.is_alive()
        assert box_b.get("result") == ("", 42), box_b
        # A's connection goes on working
        assert a.execute("SELECT 'a again'").fetchone() == ("a again",)
        assert a.execute("SELECT %s::int", (7,)).fetchone() == (7,)
        assert b.execute("SELECT 'b again'").fetchone() == ("b again",)


def test_psycopg_cancel_inside_transaction(pg, pooler):
    sleep_a = "SELECT pg_sleep(30) /* cancel in transaction */"
    with pconnect(pooler, "tx") as a:
        a.execute("BEGIN")
        a.execute("SELECT 1")
        ta, box_a = _run_in_thread(lambda: a.execute(sleep_a).fetchone())
        wait_for_active_query(pg, sleep_a)
        a.cancel_safe(timeout=10)
        ta.join(10)
        assert not ta.is_alive()
        assert isinstance(box_a.get("error"), pgerr.QueryCanceled), box_a
        with pytest.raises(pgerr.InFailedSqlTransaction):
            a.execute("SELECT 1")
        a.execute("ROLLBACK")
        assert a.execute("SELECT txid_current_if_assigned()").fetchone() == (None,)


async def test_asyncpg_timeout_sends_cancel(pooler):
    a = await aconnect(pooler, "tx")
    b = await aconnect(pooler, "tx")
    try:
        slow_b = asyncio.create_task(b.fetchrow("SELECT pg_sleep(1), 42"))
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await a.fetchval("SELECT pg_sleep(30)", timeout=1)
        # asyncpg sent a CancelRequest; the next query waits for the cancelled one to finish
        assert await asyncio.wait_for(a.fetchval("SELECT 'a works'"), 10) == "a works"
        assert time.monotonic() - t0 < 12
        row = await asyncio.wait_for(slow_b, 15)
        assert row[1] == 42
        assert await a.fetchval("SELECT $1::int", 5) == 5
    finally:
        await a.close()
        await b.close()


def test_cancel_with_another_clients_key_does_not_touch_others(pg, pooler):
    """B (idle, no server) sends a cancel with its own key: A's running query must not be cancelled."""
    sleep_a = "SELECT pg_sleep(1.5), 'not cancelled'"
    with pconnect(pooler, "tx") as a:
        raw_b = RawConn.for_pooler(pooler)
        raw_b.startup("trust_user", "tx")
        assert raw_b.backend_key is not None, "the pooler sent no BackendKeyData"
        ta, box_a = _run_in_thread(lambda: a.execute(sleep_a).fetchone())
        wait_for_active_query(pg, sleep_a)
        pid, key = raw_b.backend_key
        for forged in ((pid, key), (random.getrandbits(31), random.getrandbits(32))):
            with RawConn.for_pooler(pooler) as c:
                c.send(cancel_request(*forged))
                data, closed = c.read_all(timeout=10)
                assert closed and data == b"", "a CancelRequest gets no reply, only a close"
        ta.join(15)
        assert not ta.is_alive()
        assert box_a.get("result") == ("", "not cancelled"), box_a
        rows, errors, _ = raw_b.query("SELECT 'b fine'")
        assert rows == [["b fine"]] and not errors
        raw_b.close()


def test_backend_keys_are_the_poolers_own(pg, pooler):
    """The key a client gets must not be a real server's pid (it would let cancels hit other clients)."""
    with pconnect(pooler, "tx") as a:
        client_pid = a.info.backend_pid
        server_pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        server_pids = {int(x) for x in pg.psql("SELECT pid FROM pg_stat_activity").split()}
    assert server_pid in server_pids
    assert client_pid != server_pid
