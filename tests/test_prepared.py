"""Protocol-level prepared statements through the transaction pool, from Python drivers (issue #3).

Every client below keeps using statements it prepared earlier while the pooler lends it whichever
server connection is free, so the pooler must re-prepare them on servers that never saw the Parse,
keep two statements with the same text but different parameter types apart, forget a name the
client closed, survive evictions from a small per-server cache, and recover after DDL changes a
statement's result type. Every value selected is one only that client knows, and is checked.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import threading

import asyncpg
import psycopg
import pytest
from helpers import pool_config
from psycopg import pq

WORKERS = 8
ITERATIONS = 100
USER = "md5_user"

ECHO = "SELECT $1::int AS a, $2::text AS b"
MUL = "SELECT $1::bigint * 100000 + $2::bigint AS n"
SERIES = "SELECT g, $1::text AS t FROM generate_series(1, $2::int) AS g"

INT4_OID, TEXT_OID = 23, 25


@pytest.fixture
def tx_pool(start_pooler):
    """Factory: a fresh pooler with one transaction pool "prep" on testdb for USER."""

    def make(pool_size: int = 2, **overrides):
        return start_pooler(pool_config("prep", "transaction", pool_size, users=[USER], **overrides))

    return make


async def asyncpg_connect(pooler, **kwargs) -> asyncpg.Connection:
    return await asyncpg.connect(pooler.url("prep", USER), timeout=10, **kwargs)


def conninfo(pooler) -> str:
    return pooler.dsn("prep", USER)


# --------------------------------------------------------------------------------------------
# concurrent workers, more than the pool has servers


async def test_asyncpg_statement_cache(tx_pool):
    """asyncpg's default statement cache: Parse/Describe/Sync once per client, then Bind/Execute/Sync."""
    pooler = tx_pool(pool_size=2)

    async def worker(w: int) -> None:
        conn = await asyncpg_connect(pooler)  # statement_cache_size: default (100)
        try:
            explicit = await conn.prepare(ECHO)  # a named statement object reused in every round
            for i in range(ITERATIONS):
                tag = f"asyncpg-w{w}-i{i}"
                row = await conn.fetchrow(ECHO, w, tag)
                assert (row["a"], row["b"]) == (w, tag)
                async with conn.transaction():
                    assert await conn.fetchval(MUL, w, i) == w * 100000 + i
                    k = i % 5 + 1
                    rows = await conn.fetch(SERIES, tag, k)
                    assert [(r["g"], r["t"]) for r in rows] == [(g, tag) for g in range(1, k + 1)]
                    row = await explicit.fetchrow(w, tag + "-tx")
                    assert (row["a"], row["b"]) == (w, tag + "-tx")
                row = await explicit.fetchrow(-w, tag)
                assert (row["a"], row["b"]) == (-w, tag)
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))


async def test_psycopg_prepare_threshold_zero(tx_pool):
    """psycopg 3 with prepare_threshold=0: every query is a named statement (_pg3_N) from its first use,
    inside implicit BEGIN ... COMMIT transactions."""
    pooler = tx_pool(pool_size=2)

    async def worker(w: int) -> None:
        async with await psycopg.AsyncConnection.connect(conninfo(pooler), prepare_threshold=0) as conn:
            for i in range(ITERATIONS):
                tag = f"psycopg-w{w}-i{i}"
                cur = await conn.execute("SELECT %s::int AS a, %s::text AS b", (w, tag))
                assert await cur.fetchone() == (w, tag)
                cur = await conn.execute("SELECT %s::bigint * 100000 + %s::bigint", (w, i))
                assert await cur.fetchone() == (w * 100000 + i,)
                k = i % 5 + 1
                cur = await conn.execute("SELECT g, %s::text FROM generate_series(1, %s::int) AS g", (tag, k))
                assert await cur.fetchall() == [(g, tag) for g in range(1, k + 1)]
                if i % 7 == 3:
                    await conn.rollback()
                else:
                    await conn.commit()

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))


@pytest.mark.parametrize("script", [["-S"], []], ids=["select-only", "tpcb"])
def test_pgbench_prepared(pg, tx_pool, script):
    """pgbench -M prepared, 32 clients over 4 servers, select-only and TPC-B.

    TPC-B needs the pooler to answer PQprepare's Parse+Sync itself for statements it already
    knows: pgbench (PostgreSQL 15) prepares with a blocking PQprepare, so a client waiting for a
    server there would block its whole thread while the thread's other clients hold every server
    in an open transaction."""
    pooler = tx_pool(pool_size=4)
    info = psycopg.conninfo.conninfo_to_dict(conninfo(pooler))
    env = dict(os.environ, PGSSLMODE="disable", PGPASSWORD=str(info.get("password", "")))
    argv = [pg.tool("pgbench"), "-h", str(info["host"]), "-p", str(info["port"]), "-U", str(info["user"]),
            "-M", "prepared", *script, "-c", "32", "-j", "2", "-T", "5", str(info["dbname"])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=70, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"pgbench exit code {proc.returncode}:\n{out}"
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert processed and failed, out
    assert int(processed.group(1)) > 0, out
    assert int(failed.group(1)) == 0, out


# --------------------------------------------------------------------------------------------
# DDL under a prepared statement

CACHED_PLAN = "cached plan must not change result type"


async def test_ddl_changes_result_type(pg, tx_pool):
    """Prepare SELECT * FROM ddl_t, ALTER TABLE ... ADD COLUMN behind the client's back, re-execute.

    PostgreSQL answers "cached plan must not change result type" for a stale statement. Through the
    pooler the client may see that at most once per server connection (the pooler then drops or
    re-prepares its server-side copy); the client re-prepares on each such error, and from then on
    every execution succeeds with the new column. A second client holding a transaction open now
    and then pushes the first one onto the other server connection.
    """
    pool_size = 2
    pg.psql("DROP TABLE IF EXISTS ddl_t; CREATE TABLE ddl_t (a int); INSERT INTO ddl_t VALUES (1)",
            db="testdb")
    pooler = tx_pool(pool_size=pool_size)
    conn = await asyncpg_connect(pooler)
    holder = await asyncpg_connect(pooler, statement_cache_size=0)
    query = "SELECT * FROM ddl_t"
    try:
        stmt = await conn.prepare(query)

        async def execute(hold: bool) -> list[asyncpg.Record]:
            if not hold:
                return await stmt.fetch()
            async with holder.transaction():  # occupy one server, so conn gets another
                await holder.execute("SELECT 1")
                return await stmt.fetch()

        for n in range(6):  # before the DDL: prepared on both servers
            assert [tuple(r) for r in await execute(hold=n % 2 == 1)] == [(1,)]

        pg.psql("ALTER TABLE ddl_t ADD COLUMN b text DEFAULT 'new'", db="testdb")

        outcomes: list[str] = []
        for n in range(16):
            try:
                rows = await execute(hold=n % 2 == 1)
            except asyncpg.PostgresError as e:
                # asyncpg rewords the server's message into InvalidCachedStatementError
                stale = isinstance(e, asyncpg.InvalidCachedStatementError) or CACHED_PLAN in str(e)
                assert stale, f"unexpected error after DDL: {e!r}"
                outcomes.append("stale")
                stmt = await conn.prepare(query)  # what a driver does: prepare again, learn new columns
                continue
            assert [tuple(r) for r in rows] == [(1, "new")], rows
            outcomes.append("ok")
        assert outcomes.count("stale") <= pool_size, outcomes
        assert outcomes[-8:] == ["ok"] * 8, outcomes
    finally:
        await holder.close()
        await conn.close()
        pg.psql("DROP TABLE IF EXISTS ddl_t", db="testdb")


# --------------------------------------------------------------------------------------------
# raw protocol through libpq: names reused after Close, same text with different parameter types


def _exec(pgconn: pq.PGconn, name: bytes, params: list[bytes]) -> tuple[int, list]:
    """Bind/Describe/Execute/Sync a named statement; return (result column type oid, rows as text)."""
    res = pgconn.exec_prepared(name, params)
    assert res.status == pq.ExecStatus.TUPLES_OK, res.get_error_message()
    rows = [[(res.get_value(r, c) or b"").decode() for c in range(res.nfields)] for r in range(res.ntuples)]
    return res.ftype(0), rows


def _prepare(pgconn: pq.PGconn, name: bytes, sql: bytes, types: list[int] | None = None) -> None:
    res = pgconn.prepare(name, sql, types)  # Parse/Sync
    assert res.status == pq.ExecStatus.COMMAND_OK, res.get_error_message()


def _close(pgconn: pq.PGconn, name: bytes) -> None:
    res = pgconn.close_prepared(name)  # Close('S', name)/Sync (libpq >= 17)
    assert res.status == pq.ExecStatus.COMMAND_OK, res.get_error_message()


def _run_threads(target, n: int) -> None:
    errors: list[BaseException] = []

    def wrapped(w: int) -> None:
        try:
            target(w)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]


@pytest.mark.skipif(not psycopg.pq.__build_version__ >= 170000 or psycopg.pq.version() < 170000,
                    reason="PGconn.close_prepared needs libpq >= 17")
def test_name_reused_after_close(tx_pool):
    """Parse "stmt" as one query, Close it, Parse "stmt" again as another: the new text must win, on
    every server the pooler lends (each client uses the same client-side name)."""
    pooler = tx_pool(pool_size=2)

    def worker(w: int) -> None:
        with psycopg.connect(conninfo(pooler), autocommit=True) as conn:
            pg = conn.pgconn
            for i in range(40):
                _prepare(pg, b"stmt", b"SELECT $1::int * 2 AS v")
                n = w * 1000 + i
                assert _exec(pg, b"stmt", [str(n).encode()]) == (INT4_OID, [[str(2 * n)]])
                _close(pg, b"stmt")
                _prepare(pg, b"stmt", b"SELECT 'w' || $1::text AS v")
                assert _exec(pg, b"stmt", [f"{w}-{i}".encode()]) == (TEXT_OID, [[f"w{w}-{i}"]])
                assert _exec(pg, b"stmt", [f"{w}-{i}b".encode()]) == (TEXT_OID, [[f"w{w}-{i}b"]])
                _close(pg, b"stmt")

    _run_threads(worker, WORKERS)


def test_same_text_different_param_types(tx_pool):
    """`SELECT $1` parsed with parameter type int4 and with text: two statements, both correct."""
    pooler = tx_pool(pool_size=2)

    def worker(w: int) -> None:
        with psycopg.connect(conninfo(pooler), autocommit=True) as conn:
            pg = conn.pgconn
            _prepare(pg, b"as_int", b"SELECT $1", [INT4_OID])
            _prepare(pg, b"as_text", b"SELECT $1", [TEXT_OID])
            for i in range(60):
                assert _exec(pg, b"as_int", [str(w * 1000 + i).encode()]) == (INT4_OID, [[str(w * 1000 + i)]])
                assert _exec(pg, b"as_text", [f"t{w}-{i}".encode()]) == (TEXT_OID, [[f"t{w}-{i}"]])

    _run_threads(worker, WORKERS)


async def test_same_text_different_param_types_asyncpg(tx_pool):
    """The asyncpg flavour: the statement cache keys by text, so the types come from casts."""
    pooler = tx_pool(pool_size=2)

    async def worker(w: int) -> None:
        conn = await asyncpg_connect(pooler)
        try:
            as_int = await conn.prepare("SELECT $1::int")
            as_text = await conn.prepare("SELECT $1::text")
            for i in range(60):
                assert await as_int.fetchval(w * 1000 + i) == w * 1000 + i
                assert await as_text.fetchval(f"t{w}-{i}") == f"t{w}-{i}"
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(WORKERS)))


# --------------------------------------------------------------------------------------------
# more statements than the per-server cache holds


async def test_many_statements_evicted(tx_pool):
    """2,000 distinct statements through a pool whose servers keep at most 100 each.

    4 clients hold 500 prepared statements each and execute all of them in 3 shuffled rounds, so
    the pooler keeps evicting (Close on the server) and re-preparing statements clients still use.
    """
    pooler = tx_pool(pool_size=2, prepared_statements_cache_size=100)
    clients, per_client, rounds = 4, 500, 3

    async def worker(w: int) -> None:
        conn = await asyncpg_connect(pooler, statement_cache_size=0)
        try:
            stmts = []
            for k in range(w * per_client, (w + 1) * per_client):
                stmts.append((k, await conn.prepare(f"SELECT $1::int + {k} AS v, '{k}'::text AS k")))
            rng = random.Random(w)
            for r in range(rounds):
                order = list(range(per_client))
                rng.shuffle(order)
                for j in order:
                    k, stmt = stmts[j]
                    arg = w * 100000 + r * 1000 + j
                    row = await stmt.fetchrow(arg)
                    assert (row["v"], row["k"]) == (arg + k, str(k)), (w, r, k)
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(clients)))


def test_error_mid_pipeline_keeps_statement_maps_consistent(tx_pool):
    """Parse ok, Parse fails, Parse skipped, Sync: what the server really prepared is what counts."""
    pooler = tx_pool(pool_size=1)  # every client shares one server, so a stale LRU entry would show
    with psycopg.connect(conninfo(pooler), autocommit=True) as a, \
            psycopg.connect(conninfo(pooler), autocommit=True) as b:
        pg = a.pgconn
        pg.enter_pipeline_mode()
        pg.send_prepare(b"good1", b"SELECT $1::int + 1")
        pg.send_prepare(b"bad", b"SELECT FROM WHERE nonsense")
        pg.send_prepare(b"good2", b"SELECT $1::int + 2")
        pg.pipeline_sync()
        statuses = []
        while len(statuses) < 4:
            pg.consume_input()
            res = pg.get_result()
            if res is not None:
                statuses.append(res.status)
        assert statuses[0] == pq.ExecStatus.COMMAND_OK
        assert statuses[1] == pq.ExecStatus.FATAL_ERROR
        assert statuses[2] == pq.ExecStatus.PIPELINE_ABORTED
        assert statuses[3] == pq.ExecStatus.PIPELINE_SYNC
        while pg.get_result() is not None:
            pass
        pg.exit_pipeline_mode()
        assert _exec(pg, b"good1", [b"10"])[1] == [["11"]]
        # Another client preparing good2's text must get it prepared for real on the shared server.
        _prepare(b.pgconn, b"mine", b"SELECT $1::int + 2")
        assert _exec(b.pgconn, b"mine", [b"5"])[1] == [["7"]]
        # good2 was never prepared by PostgreSQL: using it either works (the pooler re-prepares it)
        # or fails as PostgreSQL would, naming the client's statement, never a pooler-internal one.
        res = pg.exec_prepared(b"good2", [b"1"])
        if res.status == pq.ExecStatus.TUPLES_OK:
            assert res.get_value(0, 0) == b"3"
        else:
            message = res.get_error_message()
            message = message.decode() if isinstance(message, bytes) else message
            assert "good2" in message and "PGDOORMAN" not in message, message
