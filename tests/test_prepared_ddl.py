"""asyncpg's cached statements across DDL, three clients on ONE server (issue 8, case 3).

Three asyncpg connections with their default statement cache share one server of a transaction
pool, so they share the pooler's server-side statement too. Behind their backs the table's column
changes type (ALTER COLUMN TYPE int -> float8), or the table is dropped and created again. Directly
against PostgreSQL each client sees at most the InvalidCachedStatementError that asyncpg itself
raises inside a transaction (outside one it re-prepares and retries transparently). Through the
pooler a client may see that error only where it sees it directly, never a value decoded with the
old row type (a float8 2.0 read as int4 is 1073741824), and new connections work at the first try.
"""

from __future__ import annotations

import asyncpg
import pytest
from helpers import pool_config

USER = "trust_user"
TABLE = "ddl_shared"
SQL = f"SELECT v FROM {TABLE} WHERE id = $1"
ERR = "InvalidCachedStatementError"


def _url(host: str, port: int, db: str) -> str:
    return f"postgresql://{USER}@{host}:{port}/{db}?sslmode=disable"


def _reset(pg, column: str, value: str) -> None:
    pg.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int, v {column}); "
            f"INSERT INTO {TABLE} VALUES (1, {value})", db="testdb")


async def _use(conn: asyncpg.Connection, in_tx: bool, expect: object) -> str:
    """One fetch of SQL: "ok", or what went wrong (the name of the error, a row asyncpg could not
    decode with the RowDescription it was given, a wrong value)."""
    try:
        if in_tx:
            async with conn.transaction():
                value = await conn.fetchval(SQL, 1)
        else:
            value = await conn.fetchval(SQL, 1)
    except asyncpg.InvalidCachedStatementError:
        return ERR
    except Exception as exc:  # noqa: BLE001 - BufferError: a row of another shape than described
        return f"{type(exc).__name__}: {exc}"
    if type(value) is not type(expect) or value != expect:
        return f"WRONG VALUE {value!r} ({type(value).__name__}), expected {expect!r}"
    return "ok"


async def _scenario(pg, url: str) -> dict[str, list[str]]:
    """The same steps directly and through the pooler: {step label: outcome per use}."""
    out: dict[str, list[str]] = {}
    _reset(pg, "int", "2")
    clients = [await asyncpg.connect(url, timeout=10) for _ in range(3)]
    try:
        async def round_of(label: str, expect: object, first_in_tx: tuple[bool, ...]) -> None:
            results = out.setdefault(label, [])
            for first in (first_in_tx, (True, True, True), (False, False, False)):
                for i, conn in enumerate(clients):
                    results.append(await _use(conn, first[i], expect))

        async def newcomer(label: str, expect: object) -> None:
            conn = await asyncpg.connect(url, timeout=10)
            try:
                out[label] = [await _use(conn, False, expect), await _use(conn, True, expect)]
            finally:
                await conn.close()

        await round_of("before", 2, (True, False, True))
        pg.psql(f"ALTER TABLE {TABLE} ALTER COLUMN v TYPE float8", db="testdb")
        await round_of("after ALTER COLUMN TYPE", 2.0, (True, True, False))
        await newcomer("new connection after ALTER", 2.0)
        pg.psql(f"DROP TABLE {TABLE}; CREATE TABLE {TABLE} (id int, v text); "
                f"INSERT INTO {TABLE} VALUES (1, 'two')", db="testdb")
        await round_of("after DROP/CREATE (text)", "two", (True, False, True))
        await newcomer("new connection after DROP/CREATE", "two")
        pg.psql(f"DROP TABLE {TABLE}; CREATE TABLE {TABLE} (id int, v text); "
                f"INSERT INTO {TABLE} VALUES (1, 'three')", db="testdb")
        await round_of("after DROP/CREATE (same type)", "three", (True, True, False))
        pg.psql(f"ALTER TABLE {TABLE} ALTER COLUMN v TYPE int USING length(v)", db="testdb")
        await round_of("after ALTER COLUMN TYPE back to int", 5, (False, True, True))
        await newcomer("new connection at the end", 5)
    finally:
        for conn in clients:
            await conn.close()
    return out


@pytest.mark.parametrize("workers", [1, 2])
async def test_asyncpg_three_clients_one_server_across_ddl(pg, start_pooler, workers):
    direct = await _scenario(pg, _url(pg.host, pg.port, "testdb"))
    assert all(o in ("ok", ERR) for outcomes in direct.values() for o in outcomes), direct
    p = start_pooler(pool_config("ddl", "transaction", pool_size=1, users=[USER]), {"workers": workers})
    pooled = await _scenario(pg, _url(p.host, p.port, "ddl"))
    problems = []
    for label, outcomes in pooled.items():
        for k, (got, want) in enumerate(zip(outcomes, direct[label], strict=True)):
            if label.startswith("new connection") and got != "ok":
                problems.append(f"{label} use {k}: {got} (a new connection must work at the first try)")
            elif got != "ok" and got != want:
                problems.append(f"{label} use {k}: {got}, directly: {want}")
    pg.psql(f"DROP TABLE IF EXISTS {TABLE}", db="testdb")
    assert not problems, "\n".join(problems) + f"\ndirect: {direct}\npooled: {pooled}"
