"""No dirty server is ever lent.

Transaction mode, pool_size 1: a client vanishes mid-transaction (no Terminate); the next client on
the same pool must find the server out of any transaction, with default settings, and must not see
the uncommitted row. Session mode, pool_size 1: session state left by one client (SET, temp table,
SQL PREPARE, LISTEN, advisory lock) is gone for the next (DISCARD ALL).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from helpers import RawConn, aconnect, pconnect, pool_config, query_message, wait_until


def _dirty_raw(p, tag: str, how: str) -> None:
    raw = RawConn.for_pooler(p)
    raw.startup("trust_user", "hyg")
    for sql in ("BEGIN", "SET LOCAL statement_timeout = '1234'",
                f"INSERT INTO t_hygiene VALUES (1, '{tag}')",
                "SELECT pg_advisory_xact_lock(777)"):
        rows, errors, status = raw.query(sql)
        assert not errors, errors
        assert status == b"T"
    if how == "rst":
        raw.abort()  # RST: SO_LINGER 0
    else:
        raw.close()  # FIN without a Terminate message


async def _dirty_asyncpg(p, tag: str) -> None:
    conn = await aconnect(p, "hyg")
    await conn.execute("BEGIN")
    await conn.execute("SET LOCAL statement_timeout = '1234'")
    await conn.execute("INSERT INTO t_hygiene VALUES ($1, $2)", 1, tag)
    await conn.execute("SELECT pg_advisory_xact_lock(777)")
    conn.terminate()  # closes the transport: no Terminate message


def _assert_clean_tx(p, pg, tag: str) -> None:
    with pconnect(p, "hyg") as conn:
        # not inside the vanished client's transaction
        assert conn.execute("SELECT txid_current_if_assigned()").fetchone() == (None,)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert conn.execute("SELECT count(*) FROM t_hygiene WHERE v = %s", (tag,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND objid = 777").fetchone() == (0,)
        # a transaction of our own works and is ours alone
        conn.execute("BEGIN")
        assert conn.execute("SELECT txid_current_if_assigned()").fetchone() == (None,)
        conn.execute("SELECT txid_current()")
        conn.execute("ROLLBACK")
    # the uncommitted row never became visible to anyone
    assert pg.psql(f"SELECT count(*) FROM t_hygiene WHERE v = '{tag}'", db="testdb") == "0"


@pytest.mark.parametrize("how", ["fin", "rst", "asyncpg_terminate"])
def test_abrupt_disconnect_mid_transaction_leaves_no_dirty_server(pg, start_pooler, how):
    p = start_pooler(pool_config("hyg", "transaction", pool_size=1))
    tag = f"hygiene-{how}-{uuid.uuid4()}"
    if how == "asyncpg_terminate":
        asyncio.run(_dirty_asyncpg(p, tag))
    else:
        _dirty_raw(p, tag, how)
    _assert_clean_tx(p, pg, tag)
    # No server of this pool is left idle in transaction: rolled back or closed.
    assert wait_until(lambda: pg.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'trust_user' "
        "AND state LIKE 'idle in transaction%'") == "0", timeout=10)


def test_disconnect_while_query_running_mid_transaction(pg, start_pooler):
    """The client vanishes while its query still runs: the server must not be lent with that reply owed."""
    p = start_pooler(pool_config("hyg", "transaction", pool_size=1))
    tag = f"hygiene-running-{uuid.uuid4()}"
    raw = RawConn.for_pooler(p)
    raw.startup("trust_user", "hyg")
    raw.query("BEGIN")
    raw.query(f"INSERT INTO t_hygiene VALUES (2, '{tag}')")
    raw.send(query_message("SELECT pg_sleep(2), 'stale reply'"))
    raw.abort()
    with pconnect(p, "hyg") as conn:
        for i in range(5):
            assert conn.execute("SELECT %s::int, txid_current_if_assigned()", (i,)).fetchone() == (i, None)
        assert conn.execute("SELECT 'mine'").fetchone() == ("mine",)
        assert conn.execute("SELECT count(*) FROM t_hygiene WHERE v = %s", (tag,)).fetchone() == (0,)


def test_session_mode_state_is_discarded(pg, start_pooler):
    p = start_pooler(pool_config("hyg", "session", pool_size=1))
    with pconnect(p, "hyg") as a:
        a.execute("SET search_path = pg_catalog")
        a.execute("SET application_name = 'leaky-client'")
        a.execute("SET statement_timeout = '4321'")
        a.execute("CREATE TEMP TABLE leak_tmp (x int)")
        a.execute("PREPARE leak_stmt AS SELECT 1")
        a.execute("LISTEN leak_chan")
        a.execute("SELECT pg_advisory_lock(4242)")
        a.execute("DECLARE leak_cur CURSOR WITH HOLD FOR SELECT 1")
        pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    with pconnect(p, "hyg") as b:
        pid_b = b.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert b.execute("SHOW application_name").fetchone() != ("leaky-client",)
        assert b.execute("SHOW statement_timeout").fetchone() == ("0",)
        assert b.execute("SELECT to_regclass('pg_temp.leak_tmp')").fetchone() == (None,)
        assert b.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak_stmt'"
                         ).fetchone() == (0,)
        assert b.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)
        assert b.execute("SELECT count(*) FROM pg_cursors WHERE name = 'leak_cur'").fetchone() == (0,)
        assert b.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
                         ).fetchone() == (0,)
        # a PREPARE of the same name must succeed on this server
        b.execute("PREPARE leak_stmt AS SELECT 2")
        assert b.execute("EXECUTE leak_stmt").fetchone() == (2,)
    # Informative, not required: with pool_size 1 the server is normally reused.
    print(f"session A backend {pid_a}, session B backend {pid_b}")


async def test_session_mode_asyncpg_close_then_next_client_clean(start_pooler):
    p = start_pooler(pool_config("hyg", "session", pool_size=1))
    a = await aconnect(p, "hyg")
    await a.execute("SET work_mem = '7MB'")
    await a.execute("CREATE TEMP TABLE leak2 (x int)")
    await a.close()
    b = await aconnect(p, "hyg")
    try:
        assert await b.fetchval("SHOW work_mem") != "7MB"
        assert await b.fetchval("SELECT to_regclass('pg_temp.leak2')") is None
    finally:
        await b.close()
