"""Limits: max_client_conn, query_wait_timeout, statement-mode transactions, named prepared statements."""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import psycopg
import pytest
from helpers import aconnect, pconnect, pool_config, wait_until


async def test_max_client_conn(start_pooler):
    p = start_pooler(pool_config("lim"), {"max_client_conn": 3})
    held = [pconnect(p, "lim") for _ in range(3)]
    try:
        for c in held:
            assert c.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(asyncpg.TooManyConnectionsError) as ei:
            await aconnect(p, "lim")
        assert ei.value.sqlstate == "53300"
        assert "sorry, too many clients already" in str(ei.value)
        with pytest.raises(psycopg.OperationalError) as ei2:
            pconnect(p, "lim")
        assert "sorry, too many clients already" in str(ei2.value)
        # the held clients are unaffected
        for i, c in enumerate(held):
            assert c.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        # a slot frees when a client leaves
        held.pop().close()

        def can_connect() -> bool:
            try:
                with pconnect(p, "lim") as c:
                    return c.execute("SELECT 2").fetchone() == (2,)
            except psycopg.OperationalError:
                return False

        assert wait_until(can_connect, timeout=10), "no slot after a client left"
    finally:
        for c in held:
            c.close()


def test_query_wait_timeout(start_pooler):
    p = start_pooler(pool_config("lim", pool_size=1), {"query_wait_timeout": "1s"})
    with pconnect(p, "lim") as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")  # holds the only server
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error) as ei:
            with pconnect(p, "lim") as waiter:
                waiter.execute("SELECT 'should not run'")
        elapsed = time.monotonic() - t0
        assert elapsed < 10, f"the waiting client got its error only after {elapsed:.1f}s"
        assert str(ei.value).strip(), "the error carries no message"
        # the holder is unaffected and finishes its transaction
        assert holder.execute("SELECT 'holder'").fetchone() == ("holder",)
        holder.execute("COMMIT")
    with pconnect(p, "lim") as later:
        assert later.execute("SELECT 'later'").fetchone() == ("later",)


def test_waiting_client_gets_server_when_freed(start_pooler):
    """Queueing (not timing out) works: a waiter gets the server as soon as the holder commits."""
    p = start_pooler(pool_config("lim", pool_size=1), {"query_wait_timeout": "20s"})
    with pconnect(p, "lim") as holder, pconnect(p, "lim") as waiter:
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        box: dict[str, object] = {}

        def wait_for_it():
            try:
                box["row"] = waiter.execute("SELECT 'waited'").fetchone()
            except Exception as e:  # noqa: BLE001
                box["error"] = e

        t = threading.Thread(target=wait_for_it, daemon=True)
        t.start()
        time.sleep(0.5)
        assert "row" not in box, "the waiter ran although the only server was in a transaction"
        holder.execute("COMMIT")
        t.join(10)
        assert box.get("row") == ("waited",), box


def test_statement_mode_refuses_multi_statement_transaction(pooler):
    with pconnect(pooler, "stmt") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.Error) as ei:
        with pconnect(pooler, "stmt") as conn:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
            conn.execute("COMMIT")
    msg = str(ei.value).lower()
    assert "transaction" in msg or "statement" in msg, f"unclear error: {ei.value!r}"
    # single statements still work, for new clients and with parameters
    with pconnect(pooler, "stmt") as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
        assert conn.execute("SELECT %s::int", (3,)).fetchone() == (3,)
        # a whole transaction inside one Query message ends idle: allowed
        cur = conn.execute("BEGIN; SELECT 4; COMMIT")
        assert cur.pgresult is not None
        assert conn.execute("SELECT 5").fetchone() == (5,)


def test_statement_mode_driver_transaction_refused(pooler):
    """psycopg with autocommit off sends BEGIN first: refused clearly, never silently split."""
    with pytest.raises(psycopg.Error) as ei:
        with pconnect(pooler, "stmt", autocommit=False) as conn:
            conn.execute("SELECT 1")
            conn.execute("SELECT 2")
            conn.commit()
    msg = str(ei.value).lower()
    assert "transaction" in msg or "statement" in msg, f"unclear error: {ei.value!r}"


# --------------------------------------------------------- named protocol prepared statements
# They work in transaction mode: every result must be right, and never from somebody else's
# statement. (With prepared_statements_cache_size = 0 they end the client with a clear error:
# test_named_statement_with_rewriting_off.)


def _ok_or_prepared_error(exc: BaseException) -> None:
    raise AssertionError(f"named prepared statement failed through the pooler: {exc!r}")


async def test_named_prepared_statements_asyncpg_default_cache(start_pooler):
    p = start_pooler(pool_config("prep", pool_size=2))
    conns = [await aconnect(p, "prep", statement_cache_size=100) for _ in range(4)]
    # Same parameter and result types, different meaning: a mix-up shows as a wrong number.
    queries = ["SELECT $1::int + 1", "SELECT $1::int * 100", "SELECT $1::int - 7", "SELECT $1::int * $1::int"]
    funcs = [lambda x: x + 1, lambda x: x * 100, lambda x: x - 7, lambda x: x * x]
    outcomes = {"ok": 0, "error": 0}

    async def worker(i: int) -> None:
        conn = conns[i]
        for n in range(25):
            k = (i + n) % len(queries)
            try:
                got = await conn.fetchval(queries[k], n)
            except asyncpg.PostgresError as e:
                _ok_or_prepared_error(e)
                outcomes["error"] += 1
                continue
            assert got == funcs[k](n), f"client {i} ran {queries[k]!r} with {n} and got {got}"
            outcomes["ok"] += 1
            if n % 5 == 0:
                try:
                    async with conn.transaction():
                        got = await conn.fetchval(queries[k], n + 1)
                        assert got == funcs[k](n + 1)
                except asyncpg.PostgresError as e:
                    _ok_or_prepared_error(e)

    try:
        await asyncio.wait_for(asyncio.gather(*[worker(i) for i in range(len(conns))]), 60)
    finally:
        for c in conns:
            c.terminate()
    assert outcomes == {"ok": 4 * 25, "error": 0}


def test_named_statement_with_rewriting_off(start_pooler):
    """prepared_statements_cache_size = 0 in transaction mode: a named statement gets a clear error."""
    p = start_pooler(pool_config("prep", pool_size=1, prepared_statements_cache_size=0))
    with pconnect(p, "prep", prepare_threshold=0) as conn, pytest.raises(psycopg.Error) as ei:
        conn.execute("SELECT %s::int", (1,))
    assert "prepared statement" in str(ei.value).lower(), repr(ei.value)
    with pconnect(p, "prep") as other:
        assert other.execute("SELECT %s::int", (2,)).fetchone() == (2,)


def test_named_prepared_statements_psycopg_name_collision(start_pooler):
    """psycopg names its statements _pg3_0, _pg3_1, ... per connection: two clients, same names."""
    p = start_pooler(pool_config("prep", pool_size=1))
    a = pconnect(p, "prep", prepare_threshold=0)
    b = pconnect(p, "prep", prepare_threshold=0)
    try:
        for n in range(10):
            for conn, sql, expect in ((a, "SELECT %s::int + 1", n + 1), (b, "SELECT %s::int * 100", n * 100)):
                try:
                    got = conn.execute(sql, (n,)).fetchone()[0]
                except psycopg.Error as e:
                    _ok_or_prepared_error(e)
                    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                        conn.execute("ROLLBACK")
                    continue
                assert got == expect, f"{sql!r} with {n} gave {got}: another client's statement ran"
    finally:
        a.close()
        b.close()
