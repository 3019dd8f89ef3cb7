"""psycopg 3 and asyncpg through the pooler in session, transaction and statement modes.

Simple queries, parameters (extended protocol, unnamed statements), transactions, errors inside
transactions then ROLLBACK then go on. Named prepared statements are issue #3: psycopg runs with
prepare_threshold=None and asyncpg with statement_cache_size=0 here.
"""

from __future__ import annotations

import uuid

import asyncpg
import psycopg
import pytest
from helpers import aconnect, pconnect, pool_config, wait_until
from psycopg import errors as pgerr

ALL_DBS = ["tx", "sess", "stmt"]
TX_DBS = ["tx", "sess"]  # statement mode refuses multi-statement transactions (test_core_limits)


# ---------------------------------------------------------------------------------- psycopg


@pytest.mark.parametrize("db", ALL_DBS)
def test_psycopg_simple_queries(pooler, db):
    with pconnect(pooler, db) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT 'hello', NULL::text, 2.5::float8").fetchone() == ("hello", None, 2.5)
        # several statements in one Query message (no parameters: psycopg sends a simple Query)
        cur = conn.execute("SELECT 1 AS a; SELECT 2 AS b, 3 AS c")
        assert cur.fetchall() == [(1,)]
        assert cur.nextset()
        assert cur.fetchall() == [(2, 3)]
        # many rows, one big value: replies spanning many network chunks
        rows = conn.execute("SELECT g, md5(g::text) FROM generate_series(1, 5000) g").fetchall()
        assert len(rows) == 5000
        assert rows[4999] == (5000, "a35fe7f7fe8217b4369a0af4244d1fca")
        big = conn.execute("SELECT repeat('xyz', 400000)").fetchone()[0]
        assert big == "xyz" * 400000
        # commands without rows; a notice; an empty query
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hi from the server'; END $$")
        assert conn.execute("SELECT current_database()").fetchone() == ("testdb",)
        assert conn.execute("SELECT 42").fetchone() == (42,)


@pytest.mark.parametrize("db", ALL_DBS)
def test_psycopg_parameters(pooler, db):
    with pconnect(pooler, db) as conn:
        row = conn.execute("SELECT %s::int + 1, %s::text, %s::text IS NULL, %s::bytea",
                           (41, "ünïcode ' \" \\", None, b"\x00\x01\xff")).fetchone()
        assert row == (42, "ünïcode ' \" \\", True, b"\x00\x01\xff")
        big = "p" * 300_000
        assert conn.execute("SELECT length(%s::text)", (big,)).fetchone() == (300_000,)
        # binary results
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT %s::int8 * 2, %s::float8", (21, 0.5))
            assert cur.fetchone() == (42, 0.5)
        # the same query text, many different parameters, each answer checked
        for i in range(50):
            assert conn.execute("SELECT %s::int * 3, %s::text", (i, f"v{i}")).fetchone() == (i * 3, f"v{i}")
        # executemany: a pipeline of Bind/Execute
        with conn.cursor() as cur:
            cur.executemany("SELECT %s::int", [(i,) for i in range(20)], returning=True)
            got = []
            while True:
                got.append(cur.fetchone()[0])
                if not cur.nextset():
                    break
            assert got == list(range(20))


@pytest.mark.parametrize("db", TX_DBS)
def test_psycopg_transactions(pg, pooler, db):
    tag_commit, tag_rollback = f"modes-c-{uuid.uuid4()}", f"modes-r-{uuid.uuid4()}"
    with pconnect(pooler, db, autocommit=False) as conn:
        conn.execute("CREATE TEMP TABLE tt (x int) ON COMMIT DROP")
        conn.execute("INSERT INTO tt SELECT generate_series(1, 3)")
        assert conn.execute("SELECT count(*) FROM tt").fetchone() == (3,)
        assert conn.execute("SELECT txid_current_if_assigned() IS NOT NULL").fetchone() == (True,)
        conn.execute("INSERT INTO t_hygiene VALUES (%s, %s)", (1, tag_commit))
        conn.commit()
        conn.execute("INSERT INTO t_hygiene VALUES (%s, %s)", (2, tag_rollback))
        assert conn.execute("SELECT count(*) FROM t_hygiene WHERE v = %s", (tag_rollback,)).fetchone() == (1,)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM t_hygiene WHERE v = %s", (tag_rollback,)).fetchone() == (0,)
        conn.commit()
        # explicit BEGIN/COMMIT text in autocommit mode, too
        conn.autocommit = True
        conn.execute("BEGIN")
        conn.execute("SET LOCAL statement_timeout = '4321'")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
        conn.execute("COMMIT")
    assert pg.psql(f"SELECT count(*) FROM t_hygiene WHERE v = '{tag_commit}'", db="testdb") == "1"
    assert pg.psql(f"SELECT count(*) FROM t_hygiene WHERE v = '{tag_rollback}'", db="testdb") == "0"


@pytest.mark.parametrize("db", TX_DBS)
def test_psycopg_error_inside_transaction_then_rollback(pooler, db):
    with pconnect(pooler, db, autocommit=True) as conn:
        conn.execute("BEGIN")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(pgerr.DivisionByZero) as ei:
            conn.execute("SELECT 1/0")
        assert ei.value.sqlstate == "22012"
        with pytest.raises(pgerr.InFailedSqlTransaction):
            conn.execute("SELECT 2")
        with pytest.raises(pgerr.InFailedSqlTransaction):  # extended protocol, same state
            conn.execute("SELECT %s::int", (2,))
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 3").fetchone() == (3,)
        # and again with the driver's own transaction handling and an extended-protocol error
        conn.autocommit = False
        conn.execute("SELECT 4")
        with pytest.raises(pgerr.InvalidTextRepresentation):
            conn.execute("SELECT %s::int", ("not a number",))
        conn.rollback()
        assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
        conn.commit()


@pytest.mark.parametrize("db", ALL_DBS)
def test_psycopg_errors_outside_transaction(pooler, db):
    with pconnect(pooler, db) as conn:
        with pytest.raises(pgerr.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(pgerr.SyntaxError):
            conn.execute("SELEKT 1")
        assert conn.execute("SELECT %s::int", (2,)).fetchone() == (2,)
        with pytest.raises(pgerr.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table WHERE x = %s", (1,))
        assert conn.execute("SELECT 3").fetchone() == (3,)
        # error in the middle of a multi-statement Query: the rest is skipped, then all is well
        with pytest.raises(pgerr.DivisionByZero):
            conn.execute("SELECT 1; SELECT 1/0; SELECT 3")
        assert conn.execute("SELECT 4").fetchone() == (4,)


@pytest.mark.parametrize("db", ALL_DBS)
@pytest.mark.parametrize("user", ["trust_user", "md5_user", "scram_user"])
def test_psycopg_each_user(pooler, db, user):
    with pconnect(pooler, db, user) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (user, "testdb")
        assert conn.execute("SELECT %s::text", (user,)).fetchone() == (user,)


# ---------------------------------------------------------------------------------- asyncpg


@pytest.mark.parametrize("db", ALL_DBS)
async def test_asyncpg_queries(pooler, db):
    conn = await aconnect(pooler, db)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        row = await conn.fetchrow("SELECT $1::text, $2::int8, $3::bytea, $4::text IS NULL",
                                  "ünïcode", 2**40, b"\x00\xff", None)
        assert tuple(row) == ("ünïcode", 2**40, b"\x00\xff", True)
        rows = await conn.fetch("SELECT g FROM generate_series(1, 3000) g")
        assert [r[0] for r in rows] == list(range(1, 3001))
        # simple-protocol path: execute() without arguments, several statements
        assert await conn.execute("SELECT 1; SELECT 2") == "SELECT 1"
        for i in range(30):
            assert await conn.fetchrow("SELECT $1::int, $2::text", i, f"s{i}") == (i, f"s{i}")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("SELECT 1/$1::int", 0)
        assert await conn.fetchval("SELECT 7") == 7
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await conn.execute("SELEKT")
        assert await conn.fetchval("SELECT $1::text", "after errors") == "after errors"
    finally:
        await conn.close()


@pytest.mark.parametrize("db", TX_DBS)
async def test_asyncpg_transactions(pooler, db):
    conn = await aconnect(pooler, db)
    try:
        async with conn.transaction():
            await conn.execute("CREATE TEMP TABLE att (x int, y text) ON COMMIT DROP")
            await conn.executemany("INSERT INTO att VALUES ($1, $2)", [(i, f"y{i}") for i in range(50)])
            assert await conn.fetchval("SELECT count(*) FROM att") == 50
            assert await conn.fetchval("SELECT y FROM att WHERE x = $1", 17) == "y17"
        # an error inside a transaction rolls it back; then the connection goes on
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with conn.transaction():
                await conn.execute("SET LOCAL application_name = 'inside'")
                await conn.fetchval("SELECT 1/0")
        assert await conn.fetchval("SELECT txid_current_if_assigned() IS NULL") is True
        assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        # explicit statements, error, the failed state, ROLLBACK
        await conn.execute("BEGIN")
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetchval("SELECT * FROM no_such_table")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await conn.execute("ROLLBACK")
        assert await conn.fetchval("SELECT 'ok'") == "ok"
    finally:
        await conn.close()


@pytest.mark.parametrize("db", ALL_DBS)
@pytest.mark.parametrize("user", ["md5_user", "scram_user"])
async def test_asyncpg_each_user(pooler, db, user):
    conn = await aconnect(pooler, db, user)
    try:
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------- logs


def test_disconnect_is_logged(start_pooler):
    p = start_pooler(pool_config("tx"))
    with pconnect(p, "tx") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert wait_until(lambda: "closing because:" in p.log(), timeout=10), (
        "no 'closing because:' line after a client disconnected; log:\n" + p.log()[-3000:])


def test_psycopg_autocommit_off_default_flow(pooler):
    """The most common application pattern: driver-managed transactions, commit per unit of work."""
    with psycopg.connect(pooler.dsn("tx"), prepare_threshold=None) as conn:
        for i in range(20):
            with conn.transaction():
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
                assert conn.execute("SELECT txid_current() > 0").fetchone() == (True,)
