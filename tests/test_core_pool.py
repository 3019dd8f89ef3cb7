"""Pool life cycle: min_pool_size kept warm, idle servers retired, server_lifetime, unix sockets."""

from __future__ import annotations

import threading

import psycopg
from helpers import pconnect, pool_config, wait_until


def _servers(pg, app: str) -> int:
    """Server connections the pooler holds, counted by PostgreSQL itself."""
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"))


def test_min_pool_size_warm_and_idle_servers_retired(pg, start_pooler):
    app = "pool-warm-idle"
    pooler = start_pooler(pool_config("warm", pool_size=4, users=("trust_user",), min_pool_size=2,
                                      idle_timeout="1s", application_name=app))
    # min_pool_size servers appear without any client.
    assert wait_until(lambda: _servers(pg, app) == 2), _servers(pg, app)
    # Four clients inside transactions at once: the pool grows to pool_size.
    barrier = threading.Barrier(4)
    conns = [pconnect(pooler, "warm", autocommit=False) for _ in range(4)]
    try:
        def hold(conn: psycopg.Connection) -> None:
            conn.execute("SELECT 1")  # opens the transaction: the server is now held
            barrier.wait(timeout=20)
        threads = [threading.Thread(target=hold, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert _servers(pg, app) == 4
    finally:
        for c in conns:
            c.close()
    # Released and idle longer than idle_timeout: back down to min_pool_size, never below.
    assert wait_until(lambda: _servers(pg, app) == 2, timeout=20), _servers(pg, app)
    assert "server idle timeout" in pooler.log()


def test_server_lifetime_retires_released_servers(pg, start_pooler):
    pooler = start_pooler(pool_config("life", pool_size=1, users=("trust_user",), server_lifetime="1s"))
    with pconnect(pooler, "life") as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # A server is never retired while lent: a transaction longer than the lifetime keeps it.
        with conn.transaction():
            conn.execute("SELECT pg_sleep(1.2)")
            assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        assert wait_until(lambda: conn.execute("SELECT pg_backend_pid()").fetchone()[0] != first, timeout=20)
    assert "server lifetime reached" in pooler.log()


def test_unix_sockets_both_sides(pg, start_pooler, tmp_path):
    """Clients on the pooler's unix socket; the pooler on PostgreSQL's unix socket."""
    pools = pool_config("uds", pool_size=1, users=("trust_user",), server_host=pg.socket_dir)
    pooler = start_pooler(pools, {"unix_socket_dir": str(tmp_path)})
    dsn = f"host={tmp_path} port={pooler.port} dbname=uds user=trust_user"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        # PostgreSQL sees a unix-socket client: no client address.
        assert conn.execute("SELECT client_addr FROM pg_stat_activity WHERE pid = pg_backend_pid()"
                            ).fetchone() == (None,)


def test_client_idle_timeouts(pg, start_pooler):
    """client_idle_timeout ends idle sessions (57P05); idle_transaction_timeout ends clients idle
    inside a transaction (25P03) and their server is rolled back."""
    pooler = start_pooler(pool_config("idle", pool_size=1, users=("trust_user",)),
                          {"client_idle_timeout": "1s", "idle_transaction_timeout": "1s"})
    idle = pconnect(pooler, "idle")
    in_tx = pconnect(pooler, "idle", autocommit=False)
    in_tx.execute("INSERT INTO t_hygiene VALUES (4242, 'idle in transaction')")
    try:
        assert wait_until(lambda: "idle-session timeout" in pooler.log()
                          and "idle-in-transaction timeout" in pooler.log(), timeout=20), pooler.log()
        for conn, sqlstate in ((idle, "57P05"), (in_tx, "25P03")):
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                assert exc.sqlstate in (sqlstate, None), exc  # None: only the closed socket was seen
            else:
                raise AssertionError("the pooler did not close the idle client")
    finally:
        idle.close()
        in_tx.close()
    with pconnect(pooler, "idle") as fresh:
        assert fresh.execute("SELECT count(*) FROM t_hygiene WHERE id = 4242").fetchone() == (0,)
