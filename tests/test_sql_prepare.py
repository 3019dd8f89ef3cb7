"""Issue 9: SQL prepared statements (`PREPARE name AS ...`) follow their client in transaction mode.

One client on a pool of 2, with other clients holding servers so that it keeps changing servers:
its statements are there wherever it goes, nobody else ever sees them, DEALLOCATE ends them, and
two clients may use one name for different queries (frontend/sqlprepare.py). A differential test
runs one random script of PREPARE/EXECUTE/DEALLOCATE directly and through the pooler.
"""

from __future__ import annotations

import random
import time

import psycopg
import pytest
from helpers import pconnect, pool_config
from rawproto import SYNC, bind, errors_of, execute, parse, read_replies, rows_of, via

from pgdoorman.frontend.sqlprepare import (
    prepare_name,
    prepare_text,
    read_prepared,
    replay_prepared,
    split_statements,
)

MINE = "SELECT count(*) FROM pg_prepared_statements WHERE from_sql"


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


@pytest.fixture
def make_pooler(start_pooler):
    def make(mode: str = "transaction", pool_size: int = 2, workers: int = 1, **overrides):
        # One worker: its pool has both servers, so Mover moves the client between them (with
        # two, clients also move between the workers' pools, which the first test covers).
        overrides.setdefault("query_wait_timeout", "2s")
        return start_pooler(pool_config("tx", mode, pool_size=pool_size, users=("trust_user",), **overrides),
                            {"workers": workers})
    return make


class Mover:
    """Makes `client` run its next transaction on a server other than the one it last used, by
    holding both servers of the pool with two other clients and letting go of the other one."""

    def __init__(self, client, b, c) -> None:
        self.client, self.b, self.c = client, b, c
        self.last = _pid(client)
        self.pids = {self.last}

    def run(self, sql: str, params=None):
        b, c = self.b, self.c
        b.execute("BEGIN")
        c.execute("BEGIN")
        pid_b = _pid(b)
        _pid(c)
        # Neither holder may see the client's statements on the server it was lent.
        assert b.execute(MINE).fetchone()[0] == 0 and c.execute(MINE).fetchone()[0] == 0
        free, keep = (b, c) if pid_b != self.last else (c, b)
        free.execute("COMMIT")
        try:
            cur = self.client.execute(sql, params)
            result = cur.fetchall() if cur.description else cur.statusmessage
            now = _pid(self.client)
        finally:
            keep.execute("COMMIT")
        assert now != self.last, "the client did not change servers"
        self.last = now
        self.pids.add(now)
        return result


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_follows_its_client_to_other_servers(make_pooler, workers):
    p = make_pooler(workers=workers)
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute("PREPARE add_one(int) AS SELECT $1 + 1")
        a.execute("PREPARE greet AS SELECT 'hello'::text")
        move = Mover(a, b, c)
        for i in range(10 if workers == 1 else 3):  # (a move between workers waits for balancing)
            assert move.run(f"EXECUTE add_one({i})") == [(i + 1,)]
            assert move.run("EXECUTE greet") == [("hello",)]
            # The others never get it, whichever server they are lent.
            for other in (b, c):
                with pytest.raises(psycopg.errors.InvalidSqlStatementName, match='"add_one" does not exist'):
                    other.execute("EXECUTE add_one(1)")
        assert len(move.pids) == 2
        names = [r[0] for r in a.execute("SELECT name FROM pg_prepared_statements WHERE from_sql"
                                         " ORDER BY name").fetchall()]
        assert names == ["add_one", "greet"]
        assert b.execute(MINE).fetchone()[0] == 0


def test_deallocate_name_and_all(make_pooler):
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute("PREPARE one AS SELECT 1")
        a.execute("PREPARE two AS SELECT 2")
        move = Mover(a, b, c)
        move.run("DEALLOCATE one")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            move.run("EXECUTE one")
        assert move.run("EXECUTE two") == [(2,)]
        move.run("PREPARE one AS SELECT 11")  # the name is free again, on every server
        assert move.run("EXECUTE one") == [(11,)]
        move.run("DEALLOCATE ALL")
        for name in ("one", "two"):
            with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                move.run(f"EXECUTE {name}")
        assert move.run(MINE) == [(0,)]
        move.run("PREPARE two AS SELECT 22")  # DEALLOCATE PREPARE spelling too
        move.run("DEALLOCATE PREPARE two")
        assert move.run(MINE) == [(0,)]


def test_two_clients_one_name(make_pooler):
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute("PREPARE q AS SELECT 'a'::text")
        b.execute("PREPARE q AS SELECT 'b'::text, 2")
        for _ in range(10):  # a and b alternate on the two servers (c holds one at times)
            assert a.execute("EXECUTE q").fetchall() == [("a",)]
            assert b.execute("EXECUTE q").fetchall() == [("b", 2)]
            with c.transaction():
                assert a.execute("EXECUTE q").fetchall() == [("a",)]
                assert b.execute("EXECUTE q").fetchall() == [("b", 2)]  # b waited for a's server
                assert c.execute(MINE).fetchone()[0] == 0


def test_prepare_in_a_multi_statement_query_and_a_rolled_back_transaction(make_pooler):
    """pg_prepared_statements shows the whole query string a PREPARE came in: its PREPARE is what
    moves. A PREPARE outlives the transaction it ran in, as directly."""
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute("SELECT 'x;y'; PREPARE multi(int) AS SELECT $1 * 2 /* ; */; SELECT $$;$$")
        a.execute("BEGIN")
        a.execute('PREPARE "Quoted Name" AS SELECT E\'it\\\'s\'')
        a.execute("ROLLBACK")
        move = Mover(a, b, c)
        for i in range(3):
            assert move.run(f"EXECUTE multi({i})") == [(i * 2,)]
            assert move.run('EXECUTE "Quoted Name"') == [("it's",)]


def test_replayed_after_the_settings_it_depends_on(make_pooler, pg):
    pg.psql("DROP SCHEMA IF EXISTS sp_one CASCADE; DROP SCHEMA IF EXISTS sp_two CASCADE;"
            " CREATE SCHEMA sp_one; CREATE SCHEMA sp_two;"
            " CREATE TABLE sp_one.t AS SELECT 1 AS v; CREATE TABLE sp_two.t AS SELECT 2 AS v;"
            " GRANT USAGE ON SCHEMA sp_one, sp_two TO PUBLIC;"
            " GRANT SELECT ON ALL TABLES IN SCHEMA sp_one, sp_two TO PUBLIC", db="testdb")
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute("SET search_path = sp_two")
        a.execute("PREPARE which AS SELECT v FROM t")
        move = Mover(a, b, c)
        for _ in range(4):
            assert move.run("EXECUTE which") == [(2,)]


def test_replay_that_fails_loses_only_that_statement(make_pooler, pg):
    """The statement's table is dropped: on a server it was not prepared on, its replay fails and
    the client lacks it there (documented: directly the EXECUTE fails with 42P01 instead)."""
    pg.psql("DROP TABLE IF EXISTS sp_gone; CREATE TABLE sp_gone AS SELECT 5 AS v;"
            " GRANT ALL ON sp_gone TO PUBLIC", db="testdb")
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        a.execute("PREPARE gone AS SELECT v FROM sp_gone")
        a.execute("PREPARE kept AS SELECT 6")
        move = Mover(a, b, c)
        assert move.run("EXECUTE gone") == [(5,)]
        pg.psql("DROP TABLE sp_gone", db="testdb")
        with pytest.raises((psycopg.errors.InvalidSqlStatementName, psycopg.errors.UndefinedTable)):
            move.run("EXECUTE gone")
        for _ in range(3):
            assert move.run("EXECUTE kept") == [(6,)]
            with pytest.raises((psycopg.errors.InvalidSqlStatementName, psycopg.errors.UndefinedTable)):
                move.run("EXECUTE gone")
            assert b.execute(MINE).fetchone()[0] == 0


def test_statement_mode(make_pooler):
    p = make_pooler(mode="statement")
    with pconnect(p) as a, pconnect(p) as b:
        a.execute("PREPARE s(text) AS SELECT upper($1)")
        for word in ("x", "yz", "abc"):
            assert a.execute(f"EXECUTE s('{word}')").fetchall() == [(word.upper(),)]
            assert b.execute(MINE).fetchone()[0] == 0


def test_extended_protocol_prepare_and_execute(make_pooler):
    """PREPARE and EXECUTE sent as Parse/Bind/Execute/Sync; the client keeps changing servers."""
    p = make_pooler()
    a = via(p, "tx")
    try:
        a.send(parse("PREPARE ext(int) AS SELECT 40 + $1") + bind() + execute() + SYNC)
        assert not errors_of(read_replies(a))
        with pconnect(p) as b:
            pids = set()
            for i in range(6):
                holding = i % 2 == 0
                if holding:  # b holds a server: a runs on the other
                    b.execute("BEGIN")
                    b.execute("SELECT 1")
                a.send(parse("EXECUTE ext(2)") + bind() + execute()
                       + parse("SELECT pg_backend_pid()") + bind() + execute() + SYNC)
                msgs = read_replies(a)
                assert not errors_of(msgs), errors_of(msgs)
                rows = rows_of(msgs)
                assert rows[0] == ["42"]
                pids.add(rows[1][0])
                if holding:
                    assert b.execute(MINE).fetchone()[0] == 0
                    b.execute("COMMIT")
            assert len(pids) == 2
    finally:
        a.close()


def test_held_across_a_server_lost(make_pooler, pg):
    """The server it prepared on is terminated: the next one gets the statement replayed."""
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b:
        a.execute("PREPARE survive AS SELECT 'still here'::text")
        pid = _pid(a)
        with psycopg.connect(pg.dsn(dbname="testdb"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))  # waits for its exit
        # Its FATAL reached the pooler before the backend exited: the pooler closed that idle
        # server then, so the next transaction gets a new one, with the statement replayed.
        time.sleep(0.2)
        assert a.execute("EXECUTE survive").fetchall() == [("still here",)]
        assert _pid(a) != pid
        assert b.execute(MINE).fetchone()[0] == 0


# --- a differential script: directly and through the pooler, the client sees the same ----------

NAMES = ("p1", "p2", '"P3"')


def _script(seed: int, steps: int = 60) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(steps):
        name = rnd.choice(NAMES)
        kind = rnd.random()
        if kind < 0.3:
            out.append(f"PREPARE {name} AS SELECT {rnd.randint(0, 99)} AS v, '{name}'::text")
        elif kind < 0.4:
            out.append(f"BEGIN; PREPARE {name}(int) AS SELECT $1 + 1; ROLLBACK")
        elif kind < 0.75:
            out.append(f"EXECUTE {name}" if rnd.random() < 0.8 else f"EXECUTE {name}(3)")
        elif kind < 0.9:
            out.append(f"DEALLOCATE {name}")
        elif kind < 0.95:
            out.append("DEALLOCATE ALL")
        else:
            # (not `statement`: on a server it was replayed to it is the PREPARE alone, documented)
            out.append("SELECT name, parameter_types::text, result_types::text"
                       " FROM pg_prepared_statements WHERE from_sql ORDER BY name")
    return out


def _run_script(conn, script: list[str], between=None) -> list[object]:
    seen: list[object] = []
    for sql in script:
        try:
            cur = conn.execute(sql)
            seen.append(cur.fetchall() if cur.description else cur.statusmessage)
        except psycopg.Error as exc:
            seen.append(exc.sqlstate)
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
        if between is not None:
            between()
    return seen


@pytest.mark.parametrize("seed", range(4))
def test_random_script_matches_postgresql(make_pooler, pg, seed):
    script = _script(seed)
    with psycopg.connect(pg.dsn(user="trust_user", dbname="testdb"), autocommit=True) as direct:
        expected = _run_script(direct, script)
    p = make_pooler()
    with pconnect(p) as a, pconnect(p) as b, pconnect(p) as c:
        rnd = random.Random(seed)

        def interleave() -> None:
            # b or c takes a server now and then, with its own statement of a shared name
            other = rnd.choice((b, c))
            if rnd.random() < 0.5:
                other.execute("DEALLOCATE ALL")
                other.execute("PREPARE p1 AS SELECT 'other'::text")
            assert other.execute("SELECT count(*) FROM pg_prepared_statements WHERE from_sql"
                                 " AND name <> 'p1'").fetchone()[0] == 0

        got = _run_script(a, script, interleave)
    assert got == expected


# --- the text handling, unit by unit ----------------------------------------------------------

@pytest.mark.parametrize(("text", "statements"), [
    (b"select 1; select 2", [b"select 1", b"select 2"]),
    (b"  -- c;\n select ';'; /* a; /* nested; */ b; */ select 2;;", [b"select ';'", b"select 2"]),
    (b"select $$;$$; select $t$ $$; $t$", [b"select $$;$$", b"select $t$ $$; $t$"]),
    (b"select E'\\';'; select 'a''b;'", [b"select E'\\';'", b"select 'a''b;'"]),
    (b'select ";"";"; prepare q as select $1;', [b'select ";"";"', b"prepare q as select $1"]),
    (b"select a$b; select 1", [b"select a$b", b"select 1"]),
    (b"select 'unterminated;", [b"select 'unterminated;"]),
])
def test_split_statements(text, statements):
    assert split_statements(text) == statements


@pytest.mark.parametrize(("statement", "name"), [
    (b"PREPARE q AS SELECT 1", "q"),
    (b"prepare  MixedCase(int) as select $1", "mixedcase"),
    (b'PREPARE "Mixed ""Case""" AS SELECT 1', 'Mixed "Case"'),
    (b"PREPARE/* c */q2 AS SELECT 1", "q2"),
    (b'PREPARE U&"d\\0061t" AS SELECT 1', None),
    (b"PREPARED q", None),
    (b"SELECT 1", None),
    (b"EXECUTE q", None),
])
def test_prepare_name(statement, name):
    assert prepare_name(statement) == name


def test_prepare_text_and_replay():
    assert prepare_text("q", "select 1; PREPARE q(int) AS SELECT $1 -- x\n; select 2") == \
        "PREPARE q(int) AS SELECT $1 -- x\n"
    assert prepare_text("q", "PREPARE q AS SELECT 1; PREPARE q AS SELECT 2") is None  # which one?
    assert prepare_text("r", "PREPARE q AS SELECT 1") is None
    movable, stuck = read_prepared([[" prepared q", "PREPARE q AS SELECT 1"], ["search_path", "x"],
                                    [" prepared dat", 'PREPARE U&"d\\0061t" AS SELECT 1']])
    assert movable == (("q", "PREPARE q AS SELECT 1"),) and stuck == ["dat"]
    mine = (("a", "PREPARE a AS SELECT 1"), ("b", "PREPARE b AS SELECT 2"))
    theirs = (("b", "PREPARE b AS SELECT 3"), ("Z z", 'PREPARE "Z z" AS SELECT 4'))
    assert replay_prepared(mine, theirs) == [
        'DEALLOCATE "b"', 'DEALLOCATE "Z z"', "PREPARE a AS SELECT 1", "PREPARE b AS SELECT 2"]
    assert replay_prepared(mine, mine) == []
    assert replay_prepared((), theirs) == ['DEALLOCATE "b"', 'DEALLOCATE "Z z"']
