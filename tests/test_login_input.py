"""Requests sent with (or right after) the last login message are served (issue 8, case 6b).

A client may pipeline its first queries behind its last authentication message (the SCRAM final
message, the md5 password, or the startup packet itself for trust), and may go on sending while
the pooler still waits for a server (session mode) or has PostgreSQL judge its startup settings.
Those bytes must reach a server, in order, however the reads split them.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import time

import pytest
from helpers import (
    PASSWORDS,
    TERMINATE,
    PoolerLauncher,
    RawConn,
    ScramClient,
    md5_secret,
    message,
    parse_error_fields,
    pool_config,
    query_message,
    startup_packet,
)

USERS = ("trust_user", "md5_user", "scram_user")
# md5_user's configured secret is an md5 hash, so the pooler asks it for md5; scram_user's is
# plain text, which the pooler verifies with SCRAM.
_OVERRIDES = {"md5_user": {"password": md5_secret(PASSWORDS["md5_user"], "md5_user")}}
QUERIES = query_message("SELECT 1") + query_message("SELECT 2")


@pytest.fixture(scope="module")
def pooler(pg, tmp_path_factory):
    launcher = PoolerLauncher(tmp_path_factory.mktemp("login-input"), pg)
    try:
        yield launcher.start(pool_config("tx", pool_size=2, users=USERS, user_overrides=_OVERRIDES)
                             | pool_config("sess", "session", pool_size=1, users=USERS,
                                           user_overrides=_OVERRIDES))
    finally:
        launcher.stop_all()


def send_split(conn: RawConn, data: bytes, at: int | None) -> None:
    """data in one write, or in two with a pause between, so that the pooler reads them apart."""
    if at is None:
        conn.send(data)
        return
    conn.send(data[:at])
    time.sleep(0.002)
    conn.send(data[at:])


def login_with(conn: RawConn, user: str, database: str, rest: bytes, at: int | None,
               params: dict[str, str] | None = None) -> int:
    """Log in, sending `rest` in the same write as the last login message (split at `at` of that
    write); returns the length of that write. Raises AssertionError on an ErrorResponse."""
    startup = startup_packet({"user": user, "database": database, **(params or {})})
    if PASSWORDS[user] == "":
        send_split(conn, startup + rest, at)
        return len(startup) + len(rest)
    conn.send(startup)
    scram = ScramClient(PASSWORDS[user])
    while True:
        kind, body = conn.recv_message()
        if kind == b"E":
            raise AssertionError(parse_error_fields(body))
        assert kind == b"R", kind
        code = struct.unpack("!i", body[:4])[0]
        if code == 5:  # md5: the password is the last login message
            inner = hashlib.md5((PASSWORDS[user] + user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
            last = message(b"p", b"md5" + outer.encode() + b"\0")
            send_split(conn, last + rest, at)
            return len(last) + len(rest)
        if code == 10:
            conn.send(scram.initial())
        elif code == 11:  # the SCRAM final message is the last
            last = scram.final(body[4:])
            send_split(conn, last + rest, at)
            return len(last) + len(rest)
        else:
            raise AssertionError(f"unexpected authentication request {code}")


def replies(conn: RawConn, count: int) -> list[str]:
    """Read the login reply, then `count` simple queries' answers: their single values (or errors)."""
    seen: list[str] = []
    ready = 0
    while ready < count + 1:
        kind, body = conn.recv_message()
        if kind == b"Z":
            ready += 1
        elif kind == b"D":
            length = struct.unpack("!i", body[2:6])[0]
            seen.append(body[6:6 + length].decode())
        elif kind == b"E":
            seen.append("ERROR " + parse_error_fields(body)["M"])
    return seen


def _conn(pooler) -> RawConn:
    conn = RawConn.for_pooler(pooler)
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


@pytest.mark.parametrize("db", ["tx", "sess"])
@pytest.mark.parametrize("user", USERS)
def test_queries_in_the_same_write_as_the_last_login_message(pooler, user, db):
    with _conn(pooler) as conn:
        size = login_with(conn, user, db, QUERIES, None)
        assert replies(conn, 2) == ["1", "2"]
    for at in range(1, size):
        with _conn(pooler) as conn:
            login_with(conn, user, db, QUERIES, at)
            assert replies(conn, 2) == ["1", "2"], f"split at {at} of {size}"


@pytest.mark.parametrize("user", USERS)
def test_queries_while_the_session_waits_for_a_server(pooler, user):
    """Session mode, pool of one: the second client's login waits for the server the first holds;
    what it sends meanwhile (with its last login message, and later) runs once it gets it."""
    with _conn(pooler) as first:
        login_with(first, user, "sess", b"", None)
        replies(first, 0)
        with _conn(pooler) as second:
            login_with(second, user, "sess", query_message("SELECT 'a'"), None)
            time.sleep(0.2)
            second.send(query_message("SELECT 'b'"))
            time.sleep(0.2)
            first.send(TERMINATE)
            assert replies(second, 2) == ["a", "b"]


def test_queries_while_postgres_judges_the_startup_settings(pooler):
    """New startup settings are judged on a server before the login reply: the queries sent with
    the startup packet wait for that, and then see the settings."""
    params = {"options": f"-c search_path=judged_{os.getpid()}_{time.monotonic_ns()}"}
    rest = query_message("SHOW search_path") + query_message("SELECT 2")
    for db in ("tx", "sess"):
        with _conn(pooler) as conn:
            login_with(conn, "trust_user", db, rest, None, params)
            assert replies(conn, 2) == [params["options"][len("-c search_path="):], "2"]
        params = {"options": params["options"] + "_s"}


@pytest.mark.parametrize("db", ["tx", "sess"])
@pytest.mark.parametrize("user", USERS)
def test_query_and_terminate_with_the_last_login_message(pg, pooler, user, db):
    """A client that logs in, runs one statement and leaves, all in one write: the statement runs."""
    pg.psql("CREATE TABLE IF NOT EXISTS t_login_input(tag text)", db="testdb")
    tag = f"{user}-{db}-{time.monotonic_ns()}"
    rest = query_message(f"INSERT INTO t_login_input VALUES ('{tag}')") + TERMINATE
    with _conn(pooler) as conn:
        login_with(conn, user, db, rest, None)
        conn.read_all(timeout=5)
    deadline = time.monotonic() + 10
    while pg.psql(f"SELECT count(*) FROM t_login_input WHERE tag = '{tag}'", db="testdb") != "1":
        assert time.monotonic() < deadline, "the INSERT sent with the last login message never ran"
        time.sleep(0.05)
