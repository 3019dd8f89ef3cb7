"""PostgreSQL restarts or goes away under the pooler.

These tests restart and stop their own small cluster, so the shared `pg` and `pooler` of the
session are never disturbed.
"""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
from helpers import apconnect, pconnect, pool_config

from pgdoorman.devcluster import Cluster, Role

GENERAL = {"server_connect_timeout": "3s", "query_wait_timeout": "5s"}


@pytest.fixture(scope="module")
def own_pg():
    cluster = Cluster(roles=[Role("trust_user", None, "trust"), Role("md5_user", "md5_pass", "md5")],
                      databases=["testdb"])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _pools(own_pg):
    return (pool_config("tx", "transaction", 2, users=("trust_user", "md5_user"), pg=own_pg)
            | pool_config("sess", "session", 2, users=("trust_user",), pg=own_pg))


async def _next_query_outcome(conn, sql: str) -> str:
    """Run one query with a generous bound; 'ok' or 'error' (a driver exception), never a hang."""
    try:
        cur = await asyncio.wait_for(conn.execute(sql), timeout=15)
        await cur.fetchall()
        return "ok"
    except psycopg.Error:
        return "error"


async def test_restart_while_clients_connected(own_pg, start_pooler):
    p = start_pooler(_pools(own_pg), GENERAL)
    tx_conns = [await apconnect(p, "tx") for _ in range(3)]
    sess_conn = await apconnect(p, "sess")
    idle_in_tx = await apconnect(p, "tx")
    try:
        for c in [*tx_conns, sess_conn, idle_in_tx]:
            await (await c.execute("SELECT 1")).fetchall()
        await idle_in_tx.execute("BEGIN")
        await idle_in_tx.execute("SELECT 1")

        own_pg.restart()

        # Existing clients: the next query errors clearly or works, within a bound.
        outcomes = [await _next_query_outcome(c, "SELECT 1") for c in [*tx_conns, sess_conn, idle_in_tx]]
        print("outcomes after restart:", outcomes)
        # The client whose transaction died with the server cannot have it back.
        assert outcomes[-1] == "error", "a transaction survived a server restart?"
        # A transaction-mode client that was idle had no server: it may go on, after at most one error.
        for c in tx_conns:
            if not c.closed:
                try:
                    await _next_query_outcome(c, "SELECT 1")
                except psycopg.OperationalError:
                    pass

        # A new client after the restart works: the pooler makes new servers.
        for db in ("tx", "sess"):
            conn = await apconnect(p, db)
            try:
                cur = await asyncio.wait_for(conn.execute("SELECT 'after restart', %s::int", (1,)), 15)
                assert await cur.fetchone() == ("after restart", 1)
            finally:
                await conn.close()
        with pconnect(p, "tx", "md5_user") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("md5_user",)
    finally:
        for c in [*tx_conns, sess_conn, idle_in_tx]:
            await c.close()
    assert p.alive()


def test_server_down_then_back(own_pg, start_pooler):
    p = start_pooler(_pools(own_pg), GENERAL)
    with pconnect(p, "tx") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    own_pg.stop_server()
    try:
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error):
            with pconnect(p, "tx") as conn:
                conn.execute("SELECT 1")
        assert time.monotonic() - t0 < 20, "a client waited too long for the error while PostgreSQL was down"
        assert p.alive()
    finally:
        own_pg.start_server()
    with pconnect(p, "tx") as conn:
        assert conn.execute("SELECT 'back'").fetchone() == ("back",)
    with pconnect(p, "sess") as conn:
        assert conn.execute("SELECT 'back'").fetchone() == ("back",)


def test_server_connection_killed(own_pg, start_pooler):
    """pg_terminate_backend on the server a client uses: the client gets an error; the pool recovers."""
    p = start_pooler(pool_config("tx", "transaction", 1, users=("trust_user",), pg=own_pg), GENERAL)
    with pconnect(p, "tx") as conn:
        conn.execute("BEGIN")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        own_pg.psql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT 1")
    with pconnect(p, "tx") as conn:
        assert conn.execute("SELECT 'recovered'").fetchone() == ("recovered",)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
