"""Issue 9: a client's session settings follow it in transaction mode, and never reach another client.

Every test runs on a one-server pool, so the second client is lent the very server the first one
changed. What each client sees is compared with what PostgreSQL gives a client of its own.
"""

from __future__ import annotations

import pytest
from helpers import pconnect, pool_config

DEFAULT_PATH = '"$user", public'


def _show(conn, name: str) -> str:
    return conn.execute(f"SHOW {name}").fetchone()[0]


def _custom(conn, name: str) -> str | None:
    return conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0]


@pytest.fixture
def one_server(start_pooler):
    def make(mode: str = "transaction", **overrides):
        return start_pooler(pool_config("tx", mode, pool_size=1, users=("trust_user",), **overrides))
    return make


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_set_lasts_for_the_session_and_stays_its_own(one_server, mode):
    p = one_server(mode)
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("SET search_path = pg_catalog, public")
        a.execute("SET myapp.tenant = '42'")
        a.execute("SET work_mem = '7MB'")
        # B gets the server A changed: PostgreSQL's defaults, as on a connection of its own.
        assert _show(b, "search_path") == DEFAULT_PATH
        assert _custom(b, "myapp.tenant") in (None, "")
        assert _show(b, "work_mem") == "4MB"
        # A's settings last beyond the transaction that made them, as directly.
        assert _show(a, "search_path") == "pg_catalog, public"
        assert _custom(a, "myapp.tenant") == "42"
        assert _show(a, "work_mem") == "7MB"
        b.execute("SET work_mem = '9MB'")
        assert _show(a, "work_mem") == "7MB"
        assert _show(b, "work_mem") == "9MB"
        a.execute("RESET work_mem")
        assert _show(a, "work_mem") == "4MB"
        assert _custom(a, "myapp.tenant") == "42"
        a.execute("RESET ALL")
        assert _show(a, "search_path") == DEFAULT_PATH
        assert _custom(a, "myapp.tenant") in (None, "")
        assert _show(b, "work_mem") == "9MB"


def test_rolled_back_and_local_sets_leave_nothing(one_server):
    p = one_server()
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("BEGIN")
        a.execute("SET work_mem = '7MB'")
        assert _show(a, "work_mem") == "7MB"
        a.execute("ROLLBACK")  # the SET is undone with its transaction, as directly
        assert _show(a, "work_mem") == "4MB"
        a.execute("BEGIN")
        a.execute("SET LOCAL statement_timeout = '3s'")
        a.execute("COMMIT")
        assert _show(a, "statement_timeout") == "0"
        a.execute("BEGIN")
        a.execute("SET search_path = pg_catalog")
        a.execute("COMMIT")
        assert _show(b, "search_path") == DEFAULT_PATH
        assert _show(a, "search_path") == "pg_catalog"


def test_set_inside_a_do_block_and_in_extended_protocol(one_server):
    p = one_server()
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("DO $$ BEGIN SET search_path = pg_catalog; END $$")
        assert _show(b, "search_path") == DEFAULT_PATH
        assert _show(a, "search_path") == "pg_catalog"
        # Through Parse/Bind/Execute (a parameter forces the extended protocol).
        a.execute("SET myapp.x = 'ext'", prepare=True)
        assert _custom(b, "myapp.x") in (None, "")
        assert _custom(a, "myapp.x") == "ext"


def test_set_role_follows_its_client(one_server, pg):
    pg.psql("DO $$ BEGIN CREATE ROLE pgd_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN END $$;"
            "GRANT pgd_reader TO trust_user", db="testdb")
    p = one_server()
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("SET ROLE pgd_reader")
        assert b.execute("SELECT current_user").fetchone() == ("trust_user",)
        assert a.execute("SELECT current_user").fetchone() == ("pgd_reader",)
        a.execute("RESET ROLE")
        assert a.execute("SELECT current_user").fetchone() == ("trust_user",)


@pytest.mark.parametrize(("name", "value", "show"), [
    ("role", "pgd_reader", "SELECT current_user"),
    ("search_path", "pg_catalog", "SHOW search_path"),
    ("default_transaction_read_only", "on", "SHOW default_transaction_read_only"),
])
def test_set_config_of_identity_and_safety_settings(one_server, pg, name, value, show):
    """set_config('role' | 'search_path' | 'default_transaction_read_only', ..., false): its client
    keeps it, the next client of that server never sees it."""
    pg.psql("DO $$ BEGIN CREATE ROLE pgd_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN END $$;"
            "GRANT pgd_reader TO trust_user", db="testdb")
    p = one_server()
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        before = b.execute(show).fetchone()[0]
        a.execute("SELECT set_config(%s, %s, false)", (name, value))
        assert b.execute(show).fetchone()[0] == before
        assert a.execute(show).fetchone()[0] == value
        assert b.execute(show).fetchone()[0] == before


@pytest.mark.parametrize("strict", [False, True])
def test_set_config_in_a_select(one_server, strict):
    """set_config(..., false) shows in no reply: the request's text names it (simple Query, or a
    Parse with the value as a parameter), and `strict` reads the settings back after every
    transaction anyway."""
    p = one_server(strict=strict)
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("SELECT set_config('search_path', 'pg_catalog', false)")
        assert _show(b, "search_path") == DEFAULT_PATH
        assert _show(a, "search_path") == "pg_catalog"
        a.execute("SELECT pg_catalog.SET_CONFIG('myapp.t', %s, false)", ("7",))
        assert _custom(b, "myapp.t") in (None, "")
        assert _custom(a, "myapp.t") == "7"


def test_strict_sees_a_set_inside_a_function(one_server, pg):
    """A function that sets things itself: with `strict`, PostgreSQL's settings are read back after
    every transaction. A custom placeholder setting set that way (myapp.f) is one pg_settings does
    not show: it never reaches another client, and its own client loses it (documented)."""
    pg.psql("CREATE OR REPLACE FUNCTION pgd_hidden_set() RETURNS int LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_catalog.set_config('search_path', 'pg_catalog', false);"
            " PERFORM pg_catalog.set_config('myapp.f', 'yes', false); RETURN 1; END $$",
            db="testdb")
    p = one_server(strict=True)
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("SELECT pgd_hidden_set()")
        assert _show(b, "search_path") == DEFAULT_PATH
        assert _custom(b, "myapp.f") in (None, "")
        assert _show(a, "search_path") == "pg_catalog"


def test_clients_alternating_on_one_server(one_server):
    p = one_server()
    with pconnect(p, autocommit=True) as a, pconnect(p, autocommit=True) as b:
        a.execute("SET myapp.who = 'a'")
        b.execute("SET myapp.who = 'b'")
        for _ in range(5):
            assert _custom(a, "myapp.who") == "a"
            assert _custom(b, "myapp.who") == "b"


# What frameworks send right after connecting (their adapters' connect hooks), then ordinary work.
CONNECT_SEQUENCES = {
    # Rails' PostgreSQLAdapter#configure_connection
    "rails": ["SET client_min_messages TO 'warning'", "SET standard_conforming_strings = on",
              "SET intervalstyle = iso_8601", "SET SESSION timezone TO 'UTC'",
              "SET search_path TO public, pg_catalog"],
    # Django's postgresql backend: time zone (when USE_TZ), then the role/schema options many
    # deployments add
    "django": ["SET TIME ZONE 'UTC'", "SELECT set_config('search_path', 'public, pg_catalog', false)"],
}
EXPECTED_AFTER = {
    "rails": {"client_min_messages": "warning", "IntervalStyle": "iso_8601", "TimeZone": "UTC",
              "search_path": "public, pg_catalog"},
    "django": {"TimeZone": "UTC", "search_path": "public, pg_catalog"},
}


@pytest.mark.parametrize("framework", sorted(CONNECT_SEQUENCES))
def test_framework_connect_sequences_last_and_stay_their_own(one_server, framework):
    p = one_server()
    with pconnect(p, autocommit=True) as other:
        defaults = {name: _show(other, name) for name in EXPECTED_AFTER[framework]}
        with pconnect(p, autocommit=True) as app:
            for sql in CONNECT_SEQUENCES[framework]:
                app.execute(sql)
            for _ in range(3):  # the other client takes the one server between the app's transactions
                assert {name: _show(other, name) for name in defaults} == defaults
                assert {name: _show(app, name) for name in defaults} == EXPECTED_AFTER[framework]
                with app.transaction():
                    app.execute("SELECT 1")


def test_jdbc_style_startup_options_last_and_stay_their_own(one_server):
    """pgJDBC's `options` connection property (and libpq's PGOPTIONS): startup settings."""
    p = one_server()
    with pconnect(p, autocommit=True) as other, \
            pconnect(p, autocommit=True, options="-c search_path=pg_catalog -c statement_timeout=5s") as app:
        for _ in range(3):
            assert _show(other, "search_path") == DEFAULT_PATH
            assert _show(app, "search_path") == "pg_catalog"
            assert _show(app, "statement_timeout") == "5s"
            assert _show(other, "statement_timeout") == "0"
