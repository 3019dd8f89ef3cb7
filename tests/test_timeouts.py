"""query_timeout, transaction_timeout, and a frozen network noticed by tcp_user_timeout and
keepalive (tests/netfaults.py: iptables drops every packet of one forwarder's port)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import psycopg
import pytest
from helpers import PoolerLauncher, pool_config, wait_until
from netfaults import Forwarder

from pgdoorman.devcluster import Cluster


def test_query_timeout_ends_the_client_and_its_query(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(pool_config("tx", pool_size=2), {"query_timeout": "1s"})
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as other:
        conn = psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True)
        with pytest.raises(psycopg.OperationalError, match="canceling statement due to query_timeout"):
            conn.execute("SELECT pg_sleep(30), 'query_timeout_probe'")
        conn.close()
        assert other.execute("SELECT 7").fetchone() == (7,)
    # its server was closed, so the backend's query ended too
    assert wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                      "'%query_timeout_probe%' AND pid <> pg_backend_pid()") == "0")


def test_transaction_timeout(start_pooler: PoolerLauncher) -> None:
    p = start_pooler(pool_config("tx", pool_size=2), {"transaction_timeout": "1s"})
    conn = psycopg.connect(p.dsn("tx", "trust_user"))
    conn.execute("SELECT 1")  # psycopg opens a transaction: it is now in one, on its server
    time.sleep(2)
    with pytest.raises(psycopg.Error, match="terminating connection due to transaction timeout"):
        conn.execute("SELECT 2")
    conn.close()
    assert "terminating connection due to transaction timeout" in p.log()
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as fresh:  # short ones are fine
        assert fresh.execute("SELECT 3").fetchone() == (3,)


# --- a frozen network between the pooler and PostgreSQL ---

@pytest.fixture
def forwarder(pg: Cluster) -> Iterator[Forwarder]:
    if shutil.which("iptables") is None:
        pytest.fail("iptables is needed (scripts/test.sh installs it)")
    fwd = Forwarder((pg.host, pg.port))
    try:
        yield fwd
    finally:
        fwd.close()


def test_tcp_user_timeout_notices_a_frozen_network(start_pooler: PoolerLauncher,
                                                   forwarder: Forwarder) -> None:
    p = start_pooler(pool_config("tx", pool_size=1, server_port=forwarder.port),
                     {"workers": 1, "tcp_user_timeout": "1s"})
    conn = psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    forwarder.freeze()
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError, match="server connection lost|terminating connection"):
        conn.execute("SELECT 2")  # unacknowledged: the kernel gives up after tcp_user_timeout
    waited = time.monotonic() - t0
    print(f"frozen network noticed by tcp_user_timeout = 1s after {waited:.1f} s")
    assert waited < 15  # a bound, not a measurement: without the option this hangs for many minutes
    conn.close()


def test_keepalive_notices_a_frozen_idle_server(start_pooler: PoolerLauncher, forwarder: Forwarder) -> None:
    p = start_pooler(pool_config("tx", pool_size=1, server_port=forwarder.port),
                     {"workers": 1, "tcp_keepidle": "1s", "tcp_keepintvl": "1s", "tcp_keepcnt": 2,
                      "server_check_delay": 0})
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    forwarder.freeze()
    t0 = time.monotonic()
    assert wait_until(lambda: "closing because: server connection lost" in p.log(), timeout=20)
    print(f"frozen idle server noticed by keepalive (1s + 2 x 1s) after {time.monotonic() - t0:.1f} s")
