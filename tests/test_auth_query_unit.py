"""auth_query's pure parts (auth/lookup.py) and its config, plus the quoting checked by PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgdoorman.auth.lookup import (
    FAILED,
    FORGET_INTERVAL,
    FOUND,
    UNKNOWN_USER,
    Answer,
    LookupCache,
    lookup_sql,
    quote_literal,
    secret_of,
)
from pgdoorman.config import ConfigError, parse_config
from pgdoorman.devcluster import Cluster

VERIFIER = ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0$" + "A" * 43 + "=:" + "B" * 43 + "=")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40))
def test_quoted_name_reads_back_as_itself(pg: Cluster, name: str) -> None:
    """PostgreSQL is the judge: the literal the lookup splices in is the name, whatever it holds."""
    with psycopg.connect(host=pg.host, port=pg.port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        for scs in ("on", "off"):  # E'' strings read the same either way
            conn.execute(f"SET standard_conforming_strings = {scs}")
            assert conn.execute(f"SELECT {quote_literal(name)}").fetchone() == (name,)


def test_lookup_sql_replaces_every_placeholder() -> None:
    assert lookup_sql("SELECT $1, $1", "o'k") == "SELECT 'o''k', 'o''k'"
    assert lookup_sql("SELECT $1", "a\\b") == "SELECT E'a\\\\b'"
    with pytest.raises(ValueError, match="NUL"):
        lookup_sql("SELECT $1", "a\0b")


def test_secret_of_rows() -> None:
    assert secret_of([], "u") is None
    assert secret_of([["u", None]], "u") is None  # NULL (or expired): nobody, never trust
    assert secret_of([["u", ""]], "u") is None
    md5 = "md5" + "A" * 32
    secret = secret_of([["u", md5]], "u")
    assert secret is not None and secret.kind == "md5" and secret.md5 == md5.lower()
    secret = secret_of([[VERIFIER]], "u")  # one column: the password alone
    assert secret is not None and secret.kind == "scram"
    secret = secret_of([["plain text"]], "u")
    assert secret is not None and secret.kind == "plain"
    for rows, why in (([["u", "a"], ["u", "b"]], "2 rows"), ([["u", "x", "y"]], "3 columns"),
                      ([["u", "jwt-pkey-fpath:/etc/key.pem"]], "JWT"),
                      ([["u", "SCRAM-SHA-256$bad"]], "SCRAM")):
        with pytest.raises(ValueError, match=why):
            secret_of(rows, "u")


def test_cache_ttls_and_coalescing() -> None:
    clock = Clock()
    cache = LookupCache(ttl=10, negative_ttl=2, clock=clock)
    told: list[str] = []
    assert cache.get("a") is None
    assert cache.wait("a", lambda ans: told.append(ans.kind)) is True  # the first starts the lookup
    assert cache.wait("a", lambda ans: told.append(ans.kind)) is False  # the second waits for it
    cache.answer("a", Answer(FOUND, text="pw"))
    assert told == [FOUND, FOUND] and cache.lookups == 1
    clock.now += 9.9
    assert cache.get("a") is not None
    clock.now += 0.1
    assert cache.get("a") is None  # expired
    cache.wait("b", told.append)
    cache.answer("b", Answer(UNKNOWN_USER))
    clock.now += 1.9
    assert cache.get("b") is not None and cache.get("b").kind == UNKNOWN_USER  # type: ignore[union-attr]
    clock.now += 0.1
    assert cache.get("b") is None
    cache.wait("c", told.append)
    cache.answer("c", Answer(FAILED, why="down"))
    assert cache.get("c") is None  # a failure is never cached


def test_zero_ttls_cache_nothing() -> None:
    cache = LookupCache(ttl=0, negative_ttl=0)
    for kind in (FOUND, UNKNOWN_USER):
        cache.wait("a", lambda _ans: None)
        cache.answer("a", Answer(kind))
        assert cache.get("a") is None


def test_forget_at_most_once_per_interval() -> None:
    clock = Clock()
    cache = LookupCache(ttl=3600, negative_ttl=30, clock=clock)
    cache.wait("a", lambda _ans: None)
    cache.answer("a", Answer(FOUND, text="pw"))
    cache.forget("a")  # just looked up: a wrong password now is no reason to ask again
    assert cache.get("a") is not None
    clock.now += FORGET_INTERVAL
    cache.forget("a")
    assert cache.get("a") is None


def test_fail_waiting_tells_everyone() -> None:
    cache = LookupCache(ttl=10, negative_ttl=10)
    told: list[Answer] = []
    cache.wait("a", told.append)
    cache.wait("b", told.append)
    cache.fail_waiting("shutting down")
    assert [(a.kind, a.why) for a in told] == [(FAILED, "shutting down")] * 2


def _cfg(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, "pgdoorman.toml")


def test_config_pgdoorman_form() -> None:
    c = _cfg('[pools.app]\nserver_database = "appdb"\n[pools.app.auth_query]\nuser = "lookup"\n'
             'password = "pw"\ncache_ttl = "1m"\nnegative_cache_ttl = 0\npool_size = 5\n'
             'lookup_pool_size = 2\nserver_user = "app_owner"\nserver_password = "owner_pw"\n')
    aq = c.pools["app"].auth_query
    assert aq is not None
    assert (aq.user, aq.password, aq.database, aq.cache_ttl, aq.negative_cache_ttl) == (
        "lookup", "pw", "appdb", 60.0, 0.0)
    assert (aq.pool_size, aq.lookup_pool_size, aq.server_user, aq.server_password) == (
        5, 2, "app_owner", "owner_pw")
    assert "$1" in aq.query and "pg_authid" in aq.query
    assert "owner_pw" not in repr(aq) and "'pw'" not in repr(aq)


def test_config_pgbouncer_form() -> None:
    c = _cfg('[general]\nauth_user = "lookup"\nauth_dbname = "postgres"\n'
             '[pools.a.users.0]\nusername = "lookup"\npassword = "md5' + "0" * 32 + '"\n'
             '[pools.b]\nauth_query = "SELECT usename, passwd FROM pg_shadow WHERE usename = $1"\n')
    a, b = c.pools["a"].auth_query, c.pools["b"].auth_query
    assert a is not None and b is not None
    assert (a.user, a.password, a.database) == ("lookup", "md5" + "0" * 32, "postgres")
    assert b.query.startswith("SELECT usename") and b.password == a.password  # from pool a's entry


@pytest.mark.parametrize(("text", "error"), [
    ('[general]\nauth_user = "nobody"\n[pools.a]\n',
     "pgdoorman.toml:2: general.auth_user: 'nobody' has no entry in any pool's users"),
    ('[pools.a]\nauth_query = "SELECT passwd FROM t WHERE u = $1"\n',
     "pgdoorman.toml:2: pools.a.auth_query: needs auth_user"),
    ('[pools.a.auth_query]\nuser = "x"\nquery = "SELECT 1"\n',
     "pgdoorman.toml:3: pools.a.auth_query.query: must contain $1"),
    ('[pools.a.auth_query]\nquery = "SELECT $1"\n',
     "pgdoorman.toml:1: pools.a.auth_query.user: missing required key"),
    ('[pools.a.auth_query]\nuser = "x"\ncache_tl = 5\n',
     "pgdoorman.toml:3: pools.a.auth_query.cache_tl: unknown key (did you mean 'cache_ttl'?)"),
    ('[pools.a.auth_query]\nuser = "x"\nserver_password = "p"\n',
     "pgdoorman.toml:3: pools.a.auth_query.server_password: needs server_user"),
    (f'[pools.a.auth_query]\nuser = "x"\npassword = "{VERIFIER}"\n',
     "pgdoorman.toml:3: pools.a.auth_query.password: a SCRAM verifier cannot log in"),
    ('[pools.a]\nauth_user = "x"\n[pools.a.auth_query]\nuser = "x"\n',
     "pgdoorman.toml:2: pools.a.auth_user: give auth_user/auth_dbname with an auth_query string"),
    (f'[general]\nauth_user = "lookup"\n[pools.a.users.0]\nusername = "lookup"\npassword = "{VERIFIER}"\n',
     "pgdoorman.toml:2: general.auth_user: 'lookup' needs a plain-text or md5 password"),
    ('[pools.a.auth_query]\nuser = "x"\nlookup_pool_size = 0\n',
     "pgdoorman.toml:3: pools.a.auth_query.lookup_pool_size: must be at least 1, got 0"),
])
def test_config_errors_name_file_line_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(text)
    assert str(info.value).startswith(error)
