"""Startup parameters (issue 8, case 8): every one is honoured or refused, never dropped.

Differential: the same startup packet goes to PostgreSQL directly and through the pooler; the
client must get the same FATAL (SQLSTATE, message, detail, hint), or the same ParameterStatus
values and the same SHOW results, on every server it is lent (transaction mode, one server shared
with a client of other settings) and in session mode.
"""

from __future__ import annotations

import struct

import asyncpg
import psycopg
import pytest
from helpers import (
    PoolerLauncher,
    RawConn,
    aconnect,
    parse_error_fields,
    pconnect,
    pool_config,
    startup_packet,
)

USER = "trust_user"
# Values the pooler reports itself or that differ by connection, not by startup settings.
_UNCOMPARED = {"application_name"}


def login(host: str, port: int, params: dict[str, str], database: str = "testdb"):
    """A raw login: (ParameterStatus values, None) or (None, the FATAL's fields), and the conn."""
    conn = RawConn(host, port)
    conn.send(startup_packet({"user": USER, "database": database, **params}))
    reported: dict[str, str] = {}
    while True:
        kind, body = conn.recv_message()
        if kind == b"E":
            conn.close()
            return None, parse_error_fields(body), None
        if kind == b"S":
            name, value = body[:-1].split(b"\0", 1)
            reported[name.decode()] = value.decode()
        elif kind == b"R":
            assert struct.unpack("!I", body[:4])[0] == 0, "trust_user must not be asked for a password"
        elif kind == b"Z":
            return reported, None, conn


def fatal_of(fields: dict[str, str]) -> dict[str, str | None]:
    return {"S": fields.get("S"), "C": fields.get("C"), "M": fields.get("M"), "D": fields.get("D"),
            "H": fields.get("H")}


def show(conn: RawConn, name: str) -> str | None:
    rows, errors, _ = conn.query(f"SHOW {name}")
    return f"ERROR {errors[0]['C']}" if errors else rows[0][0]


@pytest.fixture(scope="module")
def tx_and_session(pg, tmp_path_factory):
    """One pooler for the module: tx (one server, so every client shares it, test after test) and
    sess (session mode)."""
    launcher = PoolerLauncher(tmp_path_factory.mktemp("startup"), pg)
    try:
        pooler = launcher.start(pool_config("tx", pool_size=1, users=(USER,))
                                | pool_config("sess", "session", pool_size=2, users=(USER,)))
        yield pooler
        assert "settings reset and replayed" not in pooler.log()  # no replay ever failed
    finally:
        launcher.stop_all()


REFUSED_LIKE_POSTGRES = [
    {"TimeZone": "Mars/Olympus"},
    {"timezone": "Mars/Olympus"},
    {"foo": "1"},
    {"DateStyle": "foo"},
    {"client_encoding": "no-such-encoding"},
    {"shared_buffers": "1MB"},
    {"my-app.x": "1"},
    {"work_mem": "1kB"},
    {"options": "-c TimeZone=Mars/Olympus"},
    {"options": "-c statement_timeout=soon"},
    {"options": "-c foo"},
    {"options": "--foo"},
    {"options": "-c"},
    {"options": "-x"},
    {"options": "junk"},
    {"options": "-- -c a=b"},
    {"options": "-c search_path=a\\ b"},  # the escaped space makes it one invalid list
    {"options": "-c TimeZone=UTC", "search_path": "x", "foo": "1"},
    {"options": "-c lock_timeout=1s -c foo.bar.=1"},
    {"replication": "bogus"},
]


@pytest.mark.parametrize("params", REFUSED_LIKE_POSTGRES, ids=lambda p: repr(p)[:60])
@pytest.mark.parametrize("db", ["tx", "sess"])
def test_refused_as_postgres_refuses(pg, tx_and_session, params, db):
    _, direct, _ = login(pg.host, pg.port, params)
    assert direct is not None, "PostgreSQL accepted it: not a refusal case"
    _, pooled, _ = login(tx_and_session.host, tx_and_session.port, params, db)
    assert pooled is not None, "the pooler accepted what PostgreSQL refuses"
    assert fatal_of(pooled) == fatal_of(direct)


HONOURED = [
    ({"options": "-c search_path=a,b"}, ["search_path"]),
    ({"options": "-csearch_path="}, ["search_path"]),  # libpq's documented "secure search_path"
    ({"options": "-c statement_timeout=5s --lock-timeout=3s"}, ["statement_timeout", "lock_timeout"]),
    ({"options": "-c default_transaction_read_only=on"}, ["default_transaction_read_only"]),
    ({"options": "-c work_mem=7MB\\ "}, ["work_mem"]),
    ({"client_encoding": "utf-8"}, ["client_encoding"]),
    ({"DateStyle": "German"}, ["DateStyle"]),
    ({"DateStyle": "iso"}, ["DateStyle"]),
    ({"TimeZone": "utc", "IntervalStyle": "iso_8601"}, ["TimeZone", "IntervalStyle"]),
    ({"extra_float_digits": "2", "TimeZone": "Europe/Berlin"}, ["extra_float_digits", "TimeZone"]),
    ({"standard_conforming_strings": "off"}, ["standard_conforming_strings"]),
    ({"options": "-c myapp.flag=yes"}, ["myapp.flag"]),
    ({"options": "-c search_path=from_options", "search_path": "from_packet"}, ["search_path"]),
    ({"application_name": "caf\u00e9", "options": "-c geqo=off"}, ["application_name", "geqo"]),
]


def _direct(pg, params: dict[str, str], names: list[str]) -> tuple[dict[str, str], dict[str, str | None]]:
    reported, error, conn = login(pg.host, pg.port, params)
    assert error is None and conn is not None, error
    with conn:
        return reported, {name: show(conn, name) for name in names}


@pytest.mark.parametrize(("params", "names"), HONOURED, ids=lambda p: repr(p)[:60])
def test_honoured_in_transaction_mode_on_a_shared_server(pg, tx_and_session, params, names):
    want_reported, want_shown = _direct(pg, params, names)
    p = tx_and_session
    # What a client without settings sees (a custom placeholder, once SET on a server, stays
    # known there, and the pooler names its own application_name).
    plain = [name for name in names if "." not in name and name not in _UNCOMPARED]
    defaults = _direct(pg, {}, plain)[1]
    reported, error, conn = login(p.host, p.port, params, "tx")
    assert error is None and conn is not None, error
    # A victim without settings on the same (only) server, between the client's transactions.
    _, error, victim = login(p.host, p.port, {}, "tx")
    assert error is None and victim is not None, error
    with conn, victim:
        for name, value in want_reported.items():
            if name not in _UNCOMPARED or name in params:
                assert reported.get(name) == value, name
        for _ in range(3):
            assert {name: show(conn, name) for name in names} == want_shown
            assert {name: show(victim, name) for name in plain} == defaults
    # A second client with the same settings (its login reply cached) gets them too.
    reported2, error, again = login(p.host, p.port, params, "tx")
    assert error is None and again is not None, error
    with again:
        assert reported2 == reported
        assert {name: show(again, name) for name in names} == want_shown


@pytest.mark.parametrize(("params", "names"), HONOURED, ids=lambda p: repr(p)[:60])
def test_honoured_in_session_mode(pg, tx_and_session, params, names):
    want_reported, want_shown = _direct(pg, params, names)
    plain = [name for name in names if "." not in name and name not in _UNCOMPARED]
    defaults = _direct(pg, {}, plain)[1]
    p = tx_and_session
    for _ in range(2):  # the first login judges the settings, the second finds them cached
        reported, error, conn = login(p.host, p.port, params, "sess")
        assert error is None and conn is not None, error
        with conn:
            for name, value in want_reported.items():
                if name not in _UNCOMPARED or name in params:
                    assert reported.get(name) == value, name
            assert {name: show(conn, name) for name in names} == want_shown
        # The next session on that server starts from the defaults.
        _, error, after = login(p.host, p.port, {}, "sess")
        assert error is None and after is not None
        with after:
            assert {name: show(after, name) for name in plain} == defaults


def test_psycopg_options_and_utf8_name(tx_and_session):
    with pconnect(tx_and_session, "tx", USER, options="-c statement_timeout=1234 -c search_path=x,public",
                  client_encoding="utf-8") as conn:
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        for _ in range(2):
            assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
            assert conn.execute("SHOW search_path").fetchone() == ("x,public",)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(3)")


async def test_asyncpg_server_settings(tx_and_session):
    settings = {"search_path": "x, public", "statement_timeout": "4321", "TimeZone": "Asia/Tokyo"}
    conn = await aconnect(tx_and_session, "tx", USER, server_settings=settings)
    try:
        assert conn.get_settings().TimeZone == "Asia/Tokyo"
        assert conn.get_settings().client_encoding == "UTF8"
        assert await conn.fetchval("SHOW search_path") == "x, public"
        assert await conn.fetchval("SHOW statement_timeout") == "4321ms"
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidParameterValueError, match='invalid value for parameter "TimeZone"'):
        await aconnect(tx_and_session, "tx", USER, server_settings={"TimeZone": "Mars/Olympus"})
    with pytest.raises(asyncpg.UndefinedObjectError, match='unrecognized configuration parameter "foo"'):
        await aconnect(tx_and_session, "tx", USER, server_settings={"foo": "1"})


@pytest.mark.parametrize("value", ["database", "true", "on", "1", "yes"])
def test_replication_is_refused(tx_and_session, value):
    _, error, _ = login(tx_and_session.host, tx_and_session.port, {"replication": value}, "tx")
    assert error is not None
    assert (error["S"], error["C"]) == ("FATAL", "0A000")
    assert "replication connections are not supported" in error["M"]


@pytest.mark.parametrize("value", ["false", "off", "0", "no", "f"])
def test_replication_false_is_an_ordinary_connection(tx_and_session, value):
    _, error, conn = login(tx_and_session.host, tx_and_session.port, {"replication": value}, "tx")
    assert error is None and conn is not None, error
    with conn:
        assert show(conn, "search_path") == '"$user", public'


@pytest.mark.parametrize(("options", "switch"), [("-F", "-F"), ("-c a.b=1 -B 10", "-B"), ("-e", "-e")])
def test_other_switches_are_refused_by_name(tx_and_session, options, switch):
    _, error, _ = login(tx_and_session.host, tx_and_session.port, {"options": options}, "tx")
    assert error is not None
    assert (error["S"], error["C"]) == ("FATAL", "0A000")
    assert f'"{switch}"' in error["M"]


@pytest.mark.parametrize("params", [{"role": "trust_user"}, {"options": "-c session_authorization=x"},
                                    {"ignore_system_indexes": "on"}])
def test_settings_that_cannot_be_replayed_are_refused(tx_and_session, params):
    """role / session_authorization survive RESET ALL, and PGC_BACKEND settings cannot be SET:
    refused, never silently dropped."""
    _, error, _ = login(tx_and_session.host, tx_and_session.port, params, "tx")
    assert error is not None
    assert error["S"] == "FATAL"
    assert error["C"] in ("0A000", "55P02"), error


def test_failed_probe_leaves_the_server_as_it_was(tx_and_session):
    """A probe that fails is one rolled-back transaction: the server keeps (and the pooler still
    knows) the settings another client left on it."""
    p = tx_and_session
    _, error, a = login(p.host, p.port, {"search_path": "kept"}, "tx")
    assert error is None and a is not None
    with a:
        assert show(a, "search_path") == "kept"
        _, error, _ = login(p.host, p.port, {"search_path": "other", "TimeZone": "Mars/Olympus"}, "tx")
        assert error is not None and error["C"] == "22023"
        assert show(a, "search_path") == "kept"
        _, error, b = login(p.host, p.port, {"search_path": "kept"}, "tx")
        assert error is None and b is not None
        with b:
            assert show(b, "search_path") == "kept"


def test_reset_by_the_pooler_is_followed_by_a_replay(tx_and_session):
    """A client's SET lasts for its session (transaction mode: it follows the client); the other
    client with the same startup settings keeps its own values, and a DISCARD ALL goes back to the
    startup settings, as PostgreSQL's RESET does."""
    p = tx_and_session
    params = {"options": "-c search_path=mine -c statement_timeout=2500"}
    _, error, a = login(p.host, p.port, params, "tx")
    assert error is None and a is not None
    _, error, b = login(p.host, p.port, params, "tx")
    assert error is None and b is not None
    with a, b:
        a.query("SET work_mem = '7MB'")
        for conn in (a, b, a):
            assert show(conn, "search_path") == "mine"
            assert show(conn, "statement_timeout") == "2500ms"
            assert show(conn, "work_mem") == ("7MB" if conn is a else "4MB")
        a.query("DISCARD ALL")  # the client's own: the server's settings are gone
        assert show(b, "search_path") == "mine"
        assert show(a, "search_path") == "mine"


def test_known_settings_log_in_without_a_server(tx_and_session):
    """Only the first login with a new set of settings needs a server (to have PostgreSQL judge
    them): the next ones log in while the pool's only server is busy."""
    p = tx_and_session
    params = {"options": "-c search_path=busy"}
    _, error, first = login(p.host, p.port, params, "tx")
    assert error is None and first is not None
    with first:
        first.query("BEGIN")  # holds the only server
        _, error, second = login(p.host, p.port, params, "tx")
        assert error is None and second is not None
        second.close()
        first.query("COMMIT")
