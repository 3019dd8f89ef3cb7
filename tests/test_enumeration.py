"""No enumeration of users or databases (issue 8, case 10).

An unknown user or database gets the same exchange as a known user with a wrong password: the
same authentication request, a SCRAM salt that is the same on every try (and in every worker, and
after a restart), then FATAL 28P01 `password authentication failed for user "X"`.
"""

from __future__ import annotations

import struct

import asyncpg
import psycopg
import pytest
from helpers import (
    PASSWORDS,
    PoolerLauncher,
    RawConn,
    ScramClient,
    aconnect,
    md5_secret,
    message,
    parse_error_fields,
    pconnect,
    pool_config,
    startup_packet,
)

SCRAM_USERS = ("md5_user", "scram_user")  # plain-text secrets: the pooler asks for SCRAM
MD5_OVERRIDES = {u: {"password": md5_secret(PASSWORDS[u], u)} for u in SCRAM_USERS}


def exchange(pooler, user: str, database: str, password: str = "wrong") -> tuple[list[str], str, dict]:
    """Try to log in: (the authentication requests seen, the SCRAM salt or "", the final error)."""
    conn = RawConn.for_pooler(pooler)
    seen: list[str] = []
    salt = ""
    scram = ScramClient(password)
    with conn:
        conn.send(startup_packet({"user": user, "database": database}))
        while True:
            kind, body = conn.recv_message()
            if kind == b"E":
                return seen, salt, parse_error_fields(body)
            assert kind == b"R", (kind, body)
            code = struct.unpack("!i", body[:4])[0]
            if code == 10:
                seen.append("SASL " + body[4:].decode())
                conn.send(scram.initial())
            elif code == 11:
                attrs = dict(part.split(b"=", 1) for part in body[4:].split(b","))
                salt = attrs[b"s"].decode()
                seen.append(f"SASLContinue i={attrs[b'i'].decode()} salt-length={len(attrs[b's'])}")
                conn.send(scram.final(body[4:]))
            elif code == 5:
                seen.append("MD5 salt-length=" + str(len(body) - 4))
                conn.send(message(b"p", b"md5" + b"0" * 32 + b"\0"))
            else:
                raise AssertionError(f"authentication request {code}: logged in or unexpected")


def _error(fields: dict) -> tuple:
    return fields.get("S"), fields.get("C"), fields.get("M")


@pytest.fixture(scope="module")
def poolers(pg, tmp_path_factory):
    """Two workers (a salt must not depend on the worker); "tx" with SCRAM users, "md5db" whose
    users all have md5 secrets."""
    launcher = PoolerLauncher(tmp_path_factory.mktemp("enumeration"), pg)
    try:
        pools = (pool_config("tx", users=SCRAM_USERS)
                 | pool_config("md5db", users=SCRAM_USERS, user_overrides=MD5_OVERRIDES))
        yield launcher, pools, launcher.start(pools, {"workers": 2})
    finally:
        launcher.stop_all()


@pytest.mark.parametrize(("user", "database"), [("nosuch_user", "tx"), ("scram_user", "nosuchdb"),
                                                ("nosuch_user", "nosuchdb"), ("trust_user", "tx")])
def test_unknown_names_look_like_a_wrong_password(poolers, user, database):
    _, _, pooler = poolers
    known_seen, _, known_error = exchange(pooler, "scram_user", "tx")
    seen, salt, error = exchange(pooler, user, database)
    assert seen == known_seen
    assert salt
    assert _error(error) == ("FATAL", "28P01", f'password authentication failed for user "{user}"')
    assert _error(known_error) == ("FATAL", "28P01", 'password authentication failed for user "scram_user"')
    assert set(error) == set(known_error)  # the same fields, nothing that tells them apart


def test_md5_database_mocks_md5(poolers):
    _, _, pooler = poolers
    known_seen, _, _ = exchange(pooler, "md5_user", "md5db")
    assert known_seen == ["MD5 salt-length=4"]
    seen, _, error = exchange(pooler, "nosuch_user", "md5db")
    assert seen == known_seen
    assert _error(error) == ("FATAL", "28P01", 'password authentication failed for user "nosuch_user"')


def test_salts_are_stable_per_name_across_tries_workers_and_restarts(poolers):
    launcher, pools, pooler = poolers
    names = ["nosuch_user", "another_unknown", "scram_user"]  # scram_user: a plain-text secret
    salts = {name: {exchange(pooler, name, "tx")[1] for _ in range(8)} for name in names}
    for name, seen in salts.items():
        assert len(seen) == 1, (name, seen)  # 8 tries over 2 workers
    assert len({next(iter(s)) for s in salts.values()}) == len(names)  # one salt per name
    again = launcher.start(pools, {"workers": 2})
    try:
        for name in names:
            assert exchange(again, name, "tx")[1] in salts[name]
    finally:
        again.stop()


async def test_drivers_see_a_wrong_password(poolers):
    _, _, pooler = poolers
    for user, db in (("nosuch_user", "tx"), ("scram_user", "nosuchdb")):
        with pytest.raises(asyncpg.InvalidPasswordError) as ei:
            await aconnect(pooler, db, user, password="whatever")
        assert str(ei.value) == f'password authentication failed for user "{user}"'
        with pytest.raises(psycopg.OperationalError) as pe:
            pconnect(pooler, db, user, password="whatever")
        assert f'password authentication failed for user "{user}"' in str(pe.value)
    # the right password of a configured user still works
    conn = await aconnect(pooler, "tx", "scram_user")
    try:
        assert await conn.fetchval("SELECT current_user") == "scram_user"
    finally:
        await conn.close()
