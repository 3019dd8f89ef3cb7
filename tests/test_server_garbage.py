"""A server that sends garbage or a message nobody asked for loses that server only: it is closed
and logged, its client gets 08006, and nothing is lent dirty. The server is a real PostgreSQL
behind a forwarder that injects bytes into its replies (tests/netfaults.py)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from helpers import Pooler, PoolerLauncher, message, pool_config, wait_until
from netfaults import Forwarder

from pgdoorman.devcluster import Cluster

GARBAGE = {
    "unknown kind": message(b"Y", b"junk"),
    "length below 4": b"D\0\0\0\x02",
    "impossible length": b"D\xff\xff\xff\xff" + b"x" * 16,
    "a backend message of the frontend's": message(b"Q", b"SELECT 1\0"),
}


@pytest.fixture
def forwarder(pg: Cluster) -> Iterator[Forwarder]:
    fwd = Forwarder((pg.host, pg.port))
    try:
        yield fwd
    finally:
        fwd.close()


@pytest.fixture
def garbage_pooler(start_pooler: PoolerLauncher, forwarder: Forwarder) -> Pooler:
    return start_pooler(pool_config("tx", pool_size=1, server_port=forwarder.port),
                        {"workers": 1, "query_wait_timeout": "10s"})


@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_costs_that_server_only(garbage_pooler: Pooler, forwarder: Forwarder, garbage: str) -> None:
    p = garbage_pooler
    victim = psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True)
    assert victim.execute("SELECT 1").fetchone() == (1,)
    forwarder.inject(GARBAGE[garbage])
    with pytest.raises(psycopg.OperationalError, match="server connection lost"):
        victim.execute("SELECT 'victim'").fetchall()
    victim.close()
    assert wait_until(lambda: "closing because" in p.log() and ("malformed" in p.log()
                      or "unexpected" in p.log() or "invalid" in p.log()))
    # the one-server pool serves the next client from a fresh server, with its own rows only
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as other:
        for i in range(5):
            assert other.execute("SELECT %s::int, 'mine'", (i,)).fetchall() == [(i, "mine")]


def test_rows_after_ready_never_reach_the_next_client(garbage_pooler: Pooler, forwarder: Forwarder) -> None:
    """Rows arriving while the server is idle in the pool: it is closed, not lent with them."""
    p = garbage_pooler
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as first:
        assert first.execute("SELECT 1").fetchone() == (1,)
    forwarder.send_now(message(b"T", b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0")
                       + message(b"D", b"\0\x01\0\0\0\x05stray"))
    assert wait_until(lambda: "that no request was owed" in p.log())
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as second:
        for i in range(5):  # a fresh server: only its own rows
            assert second.execute("SELECT %s::int", (i,)).fetchall() == [(i,)]
