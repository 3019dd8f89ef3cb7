"""Client caps over the whole pooler, max_db_connections, and the failed-login delay."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from helpers import PASSWORDS, PoolerLauncher, RawConn, pool_config, startup_packet

from pgdoorman.devcluster import Cluster
from pgdoorman.limits import ClientCaps, FailureDelay


def _wait_until(check, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def _try(dsn: str) -> psycopg.Connection | None:
    try:
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError:
        return None


@pytest.mark.parametrize("workers", [1, 2])
def test_max_user_client_connections_over_every_worker(start_pooler: PoolerLauncher, workers: int) -> None:
    p = start_pooler(pool_config("tx", pool_size=2) | pool_config("sess", pool_size=2),
                     {"workers": workers, "max_user_client_connections": 3})
    conns = [psycopg.connect(p.dsn(db, "md5_user"), autocommit=True) for db in ("tx", "tx", "sess")]
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(p.dsn("tx", "md5_user"))
        assert 'too many connections for role "md5_user" (max_user_client_connections = 3)' in str(info.value)
        # another user is not affected
        with psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True) as other:
            assert other.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()
        extra = None

        def one_more() -> bool:
            nonlocal extra
            extra = _try(p.dsn("tx", "md5_user"))
            return extra is not None

        assert _wait_until(one_more), "the closed client's place was not given back"
        assert extra is not None
        conns.append(extra)
    finally:
        for c in conns:
            c.close()


def test_max_db_client_connections_and_sqlstate(start_pooler: PoolerLauncher) -> None:
    p = start_pooler(pool_config("tx", pool_size=2), {"workers": 2, "max_db_client_connections": 2})
    a = psycopg.connect(p.dsn("tx", "md5_user"), autocommit=True)
    b = psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True)
    try:
        raw = RawConn.for_pooler(p)
        raw.send(startup_packet({"user": "trust_user", "database": "tx"}))
        kind, body = raw.recv_message()
        while kind == b"R":  # trust: AuthenticationOk first, then the refusal
            kind, body = raw.recv_message()
        assert kind == b"E"
        assert b"C53300\0" in body
        assert b'too many connections for database "tx" (max_db_client_connections = 2)' in body
    finally:
        a.close()
        b.close()


def test_clients_still_logging_in_do_not_count(start_pooler: PoolerLauncher) -> None:
    """Strangers who know a user name but not its password cannot take its places."""
    p = start_pooler(pool_config("tx", pool_size=1), {"max_user_client_connections": 1})
    stuck = []
    for _ in range(3):  # each stops at the password request
        raw = RawConn.for_pooler(p)
        raw.send(startup_packet({"user": "md5_user", "database": "tx"}))
        assert raw.recv_message()[0] == b"R"
        stuck.append(raw)
    with psycopg.connect(p.dsn("tx", "md5_user"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_max_db_connections_shared_by_the_databases_users(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(pool_config("tx", pool_size=3, application_name="dbcap"),
                     {"workers": 1, "max_db_connections": 1, "query_wait_timeout": "1s"})

    def backends() -> int:
        return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbcap'"))

    a = psycopg.connect(p.dsn("tx", "md5_user"), autocommit=True)
    b = psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True)
    try:
        assert a.execute("SELECT 1").fetchone() == (1,)
        # b's pool has room (pool_size 3) but the database has not: md5_user's idle server makes way
        assert b.execute("SELECT 2").fetchone() == (2,)
        assert backends() <= 1
        # while a holds the only server in a transaction, b waits, then gets 53300 naming the cap
        a.execute("BEGIN")
        a.execute("SELECT 3")
        with pytest.raises(psycopg.errors.TooManyConnections, match="max_db_connections = 1"):
            b.execute("SELECT 4")
        a.execute("COMMIT")
        assert backends() <= 1
    finally:
        a.close()
        b.close()
    with psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True) as c:
        assert c.execute("SELECT 5").fetchone() == (5,)


def test_failed_logins_wait_longer_each_time(start_pooler: PoolerLauncher) -> None:
    p = start_pooler(pool_config("tx", pool_size=1),
                     {"auth_failure_delay": "300ms", "auth_failure_delay_max": "1200ms"})
    waits = []
    for _ in range(4):
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn("tx", "md5_user", "wrong"))
        waits.append(time.monotonic() - started)
    # at least 0.3, 0.6, 1.2 and (capped) 1.2 seconds
    for wait, least in zip(waits, (0.3, 0.6, 1.2, 1.2), strict=True):
        assert wait >= least, waits

    # a failing client waiting out its delay slows nobody else down
    p2 = start_pooler(pool_config("tx", pool_size=1), {"auth_failure_delay": "3s"})
    with pytest.raises(psycopg.OperationalError):
        # the next failure from 127.0.0.1 waits 5 s (the default cap)
        psycopg.connect(p2.dsn("tx", "md5_user", "wrong"))
    failing = threading.Thread(target=lambda: _try(p2.dsn("tx", "md5_user", "wrong")))
    failing.start()
    time.sleep(0.2)
    with psycopg.connect(p2.dsn("tx", "md5_user", PASSWORDS["md5_user"]), autocommit=True) as good:
        assert good.execute("SELECT 1").fetchone() == (1,)
    assert failing.is_alive(), "the failed login was answered before the good one"
    failing.join()


def test_caps_unit() -> None:
    caps = ClientCaps()
    assert caps.admit("u", "d", 2, 0) is None
    assert caps.admit("u", "e", 2, 0) is None
    refusal = caps.admit("u", "d", 2, 0)
    assert refusal is not None and refusal[0] == "53300"
    caps.leave("u", "d")
    assert caps.admit("u", "d", 2, 1) is None
    assert caps.admit("v", "d", 0, 1) is not None  # d has 1 already
    worker = ClientCaps()
    worker.admit("u", "d", 0, 0)
    caps.add(worker, -1)
    assert caps.users["u"] == 1


def test_delay_unit() -> None:
    delay = FailureDelay()
    assert [delay.failed("a", 0.1, 1.0, now=t) for t in (0, 1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert delay.failed("b", 0.1, 1.0, now=5) == 0.1  # one address does not slow another
    assert delay.failed("a", 0.1, 1.0, now=100) == 0.1  # a quiet minute forgets
    delay.failed("a", 0.1, 1.0, now=101)
    delay.succeeded("a")
    assert delay.failed("a", 0.1, 1.0, now=102) == 0.1
    assert delay.failed("c", 0.0, 1.0, now=1) == 0.0
