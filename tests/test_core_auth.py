"""Authentication: clients to the pooler (md5, SCRAM, trust) and the pooler to PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import time

import asyncpg
import psycopg
import pytest
from helpers import (
    PASSWORDS,
    aconnect,
    md5_secret,
    pconnect,
    pool_config,
    scram_secret,
    scram_secret_matches,
)

PW_USERS = ["md5_user", "scram_user"]


@pytest.mark.parametrize("user", PW_USERS + ["trust_user"])
def test_right_password_psycopg(pooler, user):
    with pconnect(pooler, "tx", user) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


@pytest.mark.parametrize("user", PW_USERS)
async def test_right_password_asyncpg(pooler, user):
    conn = await aconnect(pooler, "sess", user)
    try:
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()


@pytest.mark.parametrize("user", PW_USERS)
async def test_wrong_password_asyncpg(pooler, user):
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await aconnect(pooler, "tx", user, password="wrong-password")
    assert ei.value.sqlstate == "28P01"
    assert f'password authentication failed for user "{user}"' in str(ei.value)


@pytest.mark.parametrize("user", PW_USERS)
def test_wrong_password_psycopg(pooler, user):
    with pytest.raises(psycopg.OperationalError) as ei:
        pconnect(pooler, "tx", user, password="wrong-password")
    assert f'password authentication failed for user "{user}"' in str(ei.value)


@pytest.mark.parametrize("user", PW_USERS)
def test_no_password_psycopg(pooler, user):
    """A password-protected user who sends none gets an error, not a hang and not a session."""
    with pytest.raises(psycopg.OperationalError):
        pconnect(pooler, "tx", user, password="")


async def test_unknown_database(pooler):
    """An unknown database gets the mock password exchange, then 28P01 as a wrong password does:
    "does not exist" would tell which databases are configured (tests/test_enumeration.py)."""
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await aconnect(pooler, "nosuchdb", "trust_user", password="whatever")
    assert ei.value.sqlstate == "28P01"
    assert 'password authentication failed for user "trust_user"' in str(ei.value)
    with pytest.raises(psycopg.OperationalError) as ei2:
        pconnect(pooler, "nosuchdb", "trust_user", password="whatever")
    assert 'password authentication failed for user "trust_user"' in str(ei2.value)


async def test_unknown_user(pooler):
    with pytest.raises(asyncpg.InvalidPasswordError) as ei:
        await aconnect(pooler, "tx", "nosuch_user", password="whatever")
    assert ei.value.sqlstate == "28P01"


async def test_failed_logins_do_not_disturb_others(pooler):
    good = await aconnect(pooler, "tx", "scram_user")
    try:
        for _ in range(5):
            with pytest.raises(asyncpg.InvalidPasswordError):
                await aconnect(pooler, "tx", "md5_user", password="bad")
            assert await good.fetchval("SELECT $1::int", 1) == 1
    finally:
        await good.close()


# ------------------------------------------------------------------------ pooler -> server


def test_wrong_server_password_gives_error_not_hang(start_pooler):
    p = start_pooler(
        pool_config("good", users=("md5_user", "scram_user"))
        | pool_config("badmd5", users=("md5_user",), server_password="not-the-password")
        | pool_config("badscram", users=("scram_user",), server_password="not-the-password"),
        {"server_connect_timeout": "3s", "query_wait_timeout": "5s"},
    )
    for db, user in (("badmd5", "md5_user"), ("badscram", "scram_user")):
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error):
            with pconnect(p, db, user) as conn:
                conn.execute("SELECT 1")
        assert time.monotonic() - t0 < 20, "the client waited too long for its error"
    for user in ("md5_user", "scram_user"):
        with pconnect(p, "good", user) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (user,)
    # and once more: the pooler is not wedged by the failing pool
    with pytest.raises(psycopg.Error):
        with pconnect(p, "badmd5", "md5_user") as conn:
            conn.execute("SELECT 1")
    with pconnect(p, "good", "md5_user") as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


async def test_wrong_server_password_concurrent_with_good_clients(start_pooler):
    p = start_pooler(pool_config("good", users=("md5_user",))
                     | pool_config("bad", users=("md5_user",), server_password="nope"),
                     {"server_connect_timeout": "3s", "query_wait_timeout": "5s"})

    async def bad():
        try:
            conn = await aconnect(p, "bad", "md5_user")
            try:
                await conn.fetchval("SELECT 1")
            finally:
                conn.terminate()
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            return "error"
        return "no error"

    async def good(i):
        conn = await aconnect(p, "good", "md5_user")
        try:
            return await conn.fetchval("SELECT $1::int", i)
        finally:
            await conn.close()

    results = await asyncio.wait_for(asyncio.gather(*[bad() for _ in range(3)],
                                                    *[good(i) for i in range(10)]), 30)
    assert results[:3] == ["error"] * 3
    assert results[3:] == list(range(10))


def _stored_secrets(pg, kind: str) -> dict[str, str]:
    """Secrets as users configure them: from pg_authid, or computed (md5 / SCRAM verifier)."""
    if kind == "pg_authid":
        return {u: pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{u}'") for u in PW_USERS}
    if kind == "md5":
        return {u: md5_secret(PASSWORDS[u], u) for u in PW_USERS}
    assert kind == "scram"
    try:
        from pgdoorman.auth import scram_verifier
    except ImportError:
        return {u: scram_secret(PASSWORDS[u]) for u in PW_USERS}
    out = {u: scram_verifier(PASSWORDS[u]) for u in PW_USERS}
    for u, v in out.items():
        assert scram_secret_matches(v, PASSWORDS[u]), f"pgdoorman.auth.scram_verifier gave a bad verifier {v}"
    return out


@pytest.mark.parametrize("kind", ["md5", "scram", "pg_authid"])
async def test_stored_secret_accepts_right_password(pg, start_pooler, kind):
    secrets = _stored_secrets(pg, kind)
    if kind == "pg_authid":
        assert secrets["md5_user"].startswith("md5")
        assert secrets["scram_user"].startswith("SCRAM-SHA-256$")
    pools = pool_config("hashed", users=PW_USERS,
                        user_overrides={u: {"password": secrets[u], "server_password": PASSWORDS[u]}
                                        for u in PW_USERS})
    p = start_pooler(pools)
    for user in PW_USERS:
        with pconnect(p, "hashed", user) as conn:  # psycopg/libpq: md5 or SCRAM, as asked
            assert conn.execute("SELECT current_user").fetchone() == (user,)
        conn2 = await aconnect(p, "hashed", user)
        try:
            assert await conn2.fetchval("SELECT current_user") == user
        finally:
            await conn2.close()
        with pytest.raises(asyncpg.InvalidPasswordError) as ei:
            await aconnect(p, "hashed", user, password="wrong")
        assert f'password authentication failed for user "{user}"' in str(ei.value)
        with pytest.raises(psycopg.OperationalError):
            pconnect(p, "hashed", user, password="wrong")


def test_server_cleartext_password_auth(start_pooler):
    """A server that asks for a cleartext password (pg_hba `password`) gets server_password."""
    pooler = start_pooler(pool_config("clear", pool_size=1, users=("clear_user",)))
    with psycopg.connect(pooler.dsn("clear", "clear_user"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("clear_user",)


def test_server_connect_timeout(start_pooler):
    """A server that accepts TCP but never answers: the client gets an error after
    server_connect_timeout, not a hang."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes handshakes; nobody ever reads or writes
    try:
        pools = pool_config("silent", pool_size=1, users=("trust_user",),
                            server_port=silent.getsockname()[1])
        pooler = start_pooler(pools, {"server_connect_timeout": "1s", "query_wait_timeout": "30s"})
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError) as ei:
            psycopg.connect(pooler.dsn("silent", "trust_user"), connect_timeout=20)
        assert time.monotonic() - started < 15  # well before query_wait_timeout: not a hang
        assert "timeout" in str(ei.value), ei.value
    finally:
        silent.close()
