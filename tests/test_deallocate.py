"""SQL DEALLOCATE of protocol-level prepared statements in transaction mode (issue 8, case 9).

A client that Parses a named statement and later runs SQL `DEALLOCATE name` (psycopg 3 over a libpq
older than 17 evicts its cache this way) must get what PostgreSQL gives it on its own connection:
the statement gone, no 26000 error, no aborted transaction. And no client's DEALLOCATE, of the
pooler's own server-side names or ALL, may break another client's statement on the same server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pool_config
from rawproto import (
    DB,
    SYNC,
    TERMINATE,
    USER,
    Q,
    bind,
    describe,
    direct,
    errors_of,
    execute,
    normalise,
    parse,
    read_replies,
    rows_of,
    via,
)

SCRIPT = Path(__file__).with_name("psycopg_evict.py")


@pytest.fixture
def one_server(start_pooler):
    def make(workers: int = 1, mode: str = "transaction"):
        return start_pooler(pool_config(DB, mode, pool_size=1, users=[USER]), {"workers": workers})

    return make


# --------------------------------------------------------------------------------------------
# psycopg 3 (pure Python, system libpq 15): cache evictions by DEALLOCATE


def _run_psycopg(dsn: str) -> dict:
    env = dict(os.environ, PSYCOPG_IMPL="python")
    proc = subprocess.run([sys.executable, str(SCRIPT), dsn], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, f"psycopg (python impl) failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("workers", [1, 2])
def test_psycopg_python_impl_cache_evictions(pg, one_server, workers):
    info = _run_psycopg(f"host={pg.host} port={pg.port} dbname=testdb user={USER} sslmode=disable")
    assert info["impl"] == "python" and info["libpq"] < 170000, info
    assert info["prepared_on_server"] <= 3, f"psycopg did not evict with DEALLOCATE: {info}"
    p = one_server(workers)
    _run_psycopg(p.dsn(DB, USER))


# --------------------------------------------------------------------------------------------
# raw: DEALLOCATE of one's own protocol-level statement, compared with PostgreSQL


DEALLOCATES = ["DEALLOCATE s1", "DEALLOCATE PREPARE s1", 'deallocate "s1"', "DEALLOCATE ALL"]


def _own_deallocate(conn, sql: str, in_tx: bool) -> list:
    msgs = []
    conn.send(parse("SELECT $1::int * 2", "s1") + parse("SELECT 'other'", "s2") + SYNC)
    msgs += read_replies(conn, what="Parse s1, s2")
    conn.send(bind(["21"], "s1") + execute() + SYNC)
    msgs += read_replies(conn, what="s1 before")
    if in_tx:
        conn.send(Q("BEGIN"))
        msgs += read_replies(conn, what="BEGIN")
    conn.send(Q(sql))
    msgs += read_replies(conn, what=sql)
    conn.send(Q("SELECT 'same transaction'"))  # not aborted by the DEALLOCATE
    msgs += read_replies(conn, what="query after DEALLOCATE")
    conn.send(bind(["1"], "s1") + execute() + SYNC)  # gone: 26000, as directly
    msgs += read_replies(conn, what="s1 after DEALLOCATE")
    if in_tx:
        conn.send(Q("ROLLBACK"))
        msgs += read_replies(conn, what="ROLLBACK")
    conn.send(bind([], "s2") + execute() + SYNC)  # still there unless ALL
    msgs += read_replies(conn, what="s2")
    conn.send(parse("SELECT $1::int * 3", "s1") + bind(["5"], "s1") + execute() + SYNC)  # name free again
    msgs += read_replies(conn, what="s1 re-prepared")
    conn.send(TERMINATE)
    conn.close()
    return msgs


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("in_tx", [False, True], ids=["autocommit", "in-transaction"])
@pytest.mark.parametrize("sql", DEALLOCATES)
def test_sql_deallocate_of_own_protocol_statement(pg, one_server, workers, in_tx, sql):
    expected = _own_deallocate(direct(pg), sql, in_tx)
    assert [e["C"] for e in errors_of(expected)] == (["26000", "26000"] if sql.endswith("ALL") else ["26000"])
    p = one_server(workers)
    got = _own_deallocate(via(p), sql, in_tx)
    assert normalise(got) == normalise(expected)


# --------------------------------------------------------------------------------------------
# another client's DEALLOCATE on the same server


def _hostile(conn, sql: str) -> list:
    conn.send(Q(sql))
    return read_replies(conn, what=sql)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("attack", ["pooler-names", "pooler-names-in-tx", "all", "all-in-tx"])
def test_other_clients_deallocate_does_not_break_my_statement(pg, one_server, workers, attack):
    p = one_server(workers)
    a = via(p)
    a.send(parse("SELECT $1::int * 3 AS tripled", "mine") + SYNC)
    assert not errors_of(read_replies(a, what="Parse mine"))
    a.send(bind(["7"], "mine") + execute() + SYNC)
    assert rows_of(read_replies(a)) == [["21"]]

    b = via(p)
    ref = direct(pg)
    if attack.startswith("pooler-names"):
        # the pooler's server-side names: PGDOORMAN_<n>, counted from 1 in each process
        sqls = [f'DEALLOCATE "PGDOORMAN_{n}"' for n in range(1, 21)]
        sqls += [f"DEALLOCATE pgdoorman_{n}" for n in range(1, 4)]
    else:
        sqls = ["DEALLOCATE ALL"]
    for sql in sqls:
        if attack.endswith("in-tx"):
            sql = f"BEGIN; SELECT 1; {sql}; SELECT 2"
        # B has prepared nothing: it must get exactly what it would get on its own connection
        assert normalise(_hostile(b, sql)) == normalise(_hostile(ref, sql)), sql
        if attack.endswith("in-tx"):
            assert normalise(_hostile(b, "ROLLBACK")) == normalise(_hostile(ref, "ROLLBACK"))
    ref.close()
    b.send(TERMINATE)
    b.close()

    for i in range(3):
        a.send(bind([str(i)], "mine") + execute() + SYNC)
        msgs = read_replies(a, what=f"mine after {attack}")
        assert not errors_of(msgs), f"another client's DEALLOCATE broke my statement: {errors_of(msgs)}"
        assert rows_of(msgs) == [[str(3 * i)]]
    a.send(describe(b"S", "mine") + SYNC)
    msgs = read_replies(a, what="Describe mine")
    assert not errors_of(msgs) and [t for t, _ in msgs] == [b"t", b"T", b"Z"], normalise(msgs)
    a.send(TERMINATE)
    a.close()
