"""Issue 9: currval()/lastval() never show another client's sequence values in transaction mode.

A client whose request calls nextval/setval, or gets an INSERT tag (a column default may call
nextval), marks its server; the next other client lent that server gets DISCARD SEQUENCES first
(pipelined), so it sees PostgreSQL's own 55000, as on a connection of its own.
"""

from __future__ import annotations

import psycopg
import pytest
from helpers import pconnect, pool_config


@pytest.fixture
def one_server(start_pooler, pg):
    pg.psql("DROP TABLE IF EXISTS pgd_serial; DROP SEQUENCE IF EXISTS pgd_seq;"
            " CREATE SEQUENCE pgd_seq; CREATE TABLE pgd_serial (id serial, v int);"
            " GRANT ALL ON SEQUENCE pgd_seq, pgd_serial_id_seq TO PUBLIC; GRANT ALL ON pgd_serial TO PUBLIC",
            db="testdb")
    return start_pooler(pool_config("tx", "transaction", pool_size=1, users=("trust_user",)))


def _error(conn, sql: str) -> tuple[str | None, str]:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql)
    return info.value.sqlstate, str(info.value).splitlines()[0]


def _direct_errors(pg, queries: list[str]) -> list[tuple[str | None, str]]:
    with psycopg.connect(pg.dsn(user="trust_user", dbname="testdb"), autocommit=True) as direct:
        return [_error(direct, sql) for sql in queries]


@pytest.mark.parametrize(("setter", "own"), [
    ("SELECT nextval('pgd_seq')", "SELECT lastval()"),
    ("SELECT pg_catalog.SETVAL('pgd_seq', 40)", "SELECT currval('pgd_seq')"),  # (not lastval)
    ("INSERT INTO pgd_serial (v) VALUES (1)", "SELECT lastval()"),
    ("INSERT INTO pgd_serial (v) VALUES (2) RETURNING id", "SELECT currval('pgd_serial_id_seq')"),
])
def test_another_clients_sequence_values_are_not_seen(one_server, pg, setter, own):
    readers = ["SELECT lastval()", "SELECT currval('pgd_seq')", "SELECT currval('pgd_serial_id_seq')"]
    expected = _direct_errors(pg, readers)
    with pconnect(one_server) as a, pconnect(one_server) as b:
        a.execute(setter)
        a.execute(own)  # its own, on the same server with nobody between: as directly
        for sql, want in zip(readers, expected, strict=True):
            assert _error(b, sql) == want
        a.execute(setter)
        with a.transaction():  # within one transaction it is always there
            a.execute(setter)
            assert a.execute(own).fetchone()[0] is not None


def test_a_clients_own_value_is_gone_after_another_client(one_server):
    """The documented difference: currval/lastval last for the transaction that set them (and
    beyond it only while no other client used the server)."""
    with pconnect(one_server) as a, pconnect(one_server) as b:
        value = a.execute("SELECT nextval('pgd_seq')").fetchone()[0]
        assert a.execute("SELECT currval('pgd_seq')").fetchone()[0] == value
        b.execute("SELECT 1")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            a.execute("SELECT currval('pgd_seq')")
