"""Issue 9: session state that cannot move pins its client to its server, and never leaks.

A temporary table, a WITH HOLD cursor, a session advisory lock, an SQL prepared statement whose
PREPARE the pooler cannot tell (a U&"..." name; others move, test_sql_prepare.py) and a LOAD each
keep the client on its server while they last (frontend/pins.py; LISTEN moves to the pool's
listener, test_listen.py). On a pool of one server, a second client then waits; once the state is
gone it gets the server, clean.
"""

from __future__ import annotations

import psycopg
import pytest
from helpers import pconnect, pool_config

# (create, use, end): the state, a later transaction that needs it, what ends it
STATES = {
    "temp-table": ("CREATE TEMP TABLE pin_t AS SELECT 7 AS a", "SELECT a FROM pin_t", "DROP TABLE pin_t"),
    "temp-select-into": ("SELECT 7 AS a INTO TEMPORARY pin_t", "SELECT a FROM pin_t", "DISCARD TEMP"),
    "hold-cursor": ("DECLARE pin_c CURSOR WITH HOLD FOR SELECT 7 FROM generate_series(1, 10)",
                    "FETCH 1 FROM pin_c", "CLOSE pin_c"),
    "advisory-lock": ("SELECT pg_advisory_lock(4242)",
                      "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
                      " AND pid = pg_backend_pid()", "SELECT pg_advisory_unlock(4242)"),
    "lock-in-function": ("SELECT count(*) FROM (SELECT pg_catalog.PG_ADVISORY_LOCK(77)) l",
                         "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 77"
                         " AND pid = pg_backend_pid()", "SELECT pg_advisory_unlock_all()"),
    "sql-prepare-unicode-name": ('PREPARE U&"pin\\0070" AS SELECT 7', "EXECUTE pinp", "DEALLOCATE pinp"),
}

# What another client must never see of it, on whatever server it gets.
LEFTOVERS = ("SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),"
             " (SELECT count(*) FROM pg_cursors), (SELECT count(*) FROM pg_listening_channels()),"
             " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),"
             " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())")


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


@pytest.fixture
def make_pooler(start_pooler):
    def make(pool_size: int = 2, **overrides):
        overrides.setdefault("query_wait_timeout", "1s")
        return start_pooler(pool_config("tx", "transaction", pool_size=pool_size, users=("trust_user",),
                                        **overrides))
    return make


@pytest.mark.parametrize("state", sorted(STATES))
def test_state_pins_its_client_and_no_one_else_sees_it(make_pooler, state):
    create, use, end = STATES[state]
    p = make_pooler(pool_size=2)
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute(create)
        pid = _pid(a)
        for _ in range(5):  # b and c keep taking servers; a keeps its own and its state
            assert _pid(b) != pid and _pid(c) != pid
            assert b.execute(LEFTOVERS).fetchone() == (0, 0, 0, 0, 0)
            assert a.execute(use).fetchone()[0] in (1, 7)
            assert _pid(a) == pid
        a.execute(end)
        a.execute("SELECT 1")
        for x in (a, b, c):
            assert x.execute(LEFTOVERS).fetchone() == (0, 0, 0, 0, 0)


@pytest.mark.parametrize("state", sorted(STATES))
def test_a_pinned_server_is_not_lent_until_the_state_is_gone(make_pooler, state):
    """One server, pinned: another client waits (here until query_wait_timeout); once the state
    is gone, the server is lent again, clean."""
    create, _, end = STATES[state]
    p = make_pooler(pool_size=1)
    with pconnect(p) as a:
        a.execute(create)
        with pconnect(p) as b, pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            b.execute("SELECT 1")
        a.execute(end)
        with pconnect(p) as b:
            assert b.execute(LEFTOVERS).fetchone() == (0, 0, 0, 0, 0)
            assert a.execute("SELECT 1").fetchone() == (1,)


def test_leaving_while_pinned_resets_the_server(make_pooler):
    p = make_pooler(pool_size=1)
    for state in sorted(STATES):
        with pconnect(p) as a:
            a.execute(STATES[state][0])
        with pconnect(p) as b:
            assert b.execute(LEFTOVERS).fetchone() == (0, 0, 0, 0, 0), state


def test_pin_policy_refuse(make_pooler):
    p = make_pooler(pool_size=1, pin_policy="refuse")
    with pconnect(p) as a:
        a.execute("CREATE TEMP TABLE pin_t (a int)")  # answered: the check comes after it
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="temporary table"):
            a.execute("SELECT 1")
    with pconnect(p) as b:
        assert b.execute(LEFTOVERS).fetchone() == (0, 0, 0, 0, 0)


def test_statement_mode_refuses_state_that_would_need_a_pin(start_pooler):
    p = start_pooler(pool_config("tx", "statement", pool_size=1, users=("trust_user",)))
    with pconnect(p) as a:
        a.execute("SELECT pg_advisory_lock(99)")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="advisory lock"):
            a.execute("SELECT 1")
    with pconnect(p) as b:
        assert b.execute(LEFTOVERS).fetchone() == (0, 0, 0, 0, 0)


def test_load_pins_and_the_backend_is_never_lent_again(make_pooler):
    p = make_pooler(pool_size=1)
    with pconnect(p) as a:
        a.execute("LOAD 'auto_explain'")
        pid = _pid(a)
        a.execute("SELECT 1")
        assert _pid(a) == pid
    with pconnect(p) as b:
        assert _pid(b) != pid  # that backend was closed when its client left
        with pytest.raises(psycopg.errors.UndefinedObject):
            b.execute("SHOW auto_explain.log_min_duration")  # not loaded here
