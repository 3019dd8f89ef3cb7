"""Issue 10: graceful shutdown with PgBouncer 1.23+ semantics (SIGTERM = SHUTDOWN WAIT_FOR_CLIENTS,
SIGINT = SHUTDOWN WAIT_FOR_SERVERS, SIGQUIT = immediate, a second SIGTERM/SIGINT is immediate,
shutdown_timeout bounds the wait), with one process and with two workers; and sd_notify."""

from __future__ import annotations

import signal
import socket
import time

import psycopg
import pytest
from helpers import NotifyListener, pconnect, pool_config, wait_until
from test_admin import ADMIN_PASSWORD, aconnect


@pytest.fixture
def pooler_for(start_pooler):
    def make(workers: int, **general):
        gen = {"admin_password": ADMIN_PASSWORD, "workers": workers, **general}
        return start_pooler(pool_config("tx", "transaction", pool_size=2, query_wait_timeout="10s"), gen)
    return make


def _refused(p) -> bool:
    try:
        with socket.create_connection((p.host, p.port), timeout=1):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_waits_for_clients(pooler_for, workers):
    p = pooler_for(workers)
    client = pconnect(p)
    client.execute("SELECT 1")
    p.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: _refused(p)), "still accepting connections"
    time.sleep(0.5)
    assert p.alive(), "exited while a client was still connected"
    assert client.execute("SELECT 2").fetchone() == (2,)  # the client goes on being served
    client.close()
    assert p.proc.wait(timeout=10) == 0
    assert "shutting down (wait_for_clients)" in p.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigint_lets_a_transaction_finish(pooler_for, workers):
    p = pooler_for(workers)
    idle = pconnect(p)
    idle.execute("SELECT 1")
    busy = pconnect(p)
    busy.execute("BEGIN")
    busy.execute("CREATE TEMP TABLE t_shutdown (a int)")
    p.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert p.alive(), "exited in the middle of a transaction"
    busy.execute("INSERT INTO t_shutdown VALUES (1)")
    assert busy.execute("SELECT count(*) FROM t_shutdown").fetchone() == (1,)
    busy.execute("COMMIT")  # once no server is lent, the pooler stops
    assert p.proc.wait(timeout=10) == 0
    with pytest.raises(psycopg.OperationalError):  # the idle client is told, and cut off
        idle.execute("SELECT 1")
    idle.close()
    busy.close()


def test_shutdown_timeout_cuts_off_with_57p01(pooler_for):
    p = pooler_for(2, shutdown_timeout="1s")
    client = pconnect(p)
    client.execute("SELECT 1")
    started = time.monotonic()
    with aconnect(p) as admin:
        admin.execute("SHUTDOWN WAIT_FOR_CLIENTS")
    assert p.proc.wait(timeout=15) == 0
    assert time.monotonic() - started >= 0.9
    time.sleep(0.5)
    with pytest.raises(psycopg.OperationalError, match="terminating connection due to administrator command"):
        client.execute("SELECT 1")
    client.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_shutdown_immediate_and_second_signal(pooler_for, workers):
    p = pooler_for(workers)
    client = pconnect(p)
    client.execute("BEGIN")
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert p.alive()
    p.proc.send_signal(signal.SIGTERM)  # the second one does not wait
    assert p.proc.wait(timeout=10) == 0
    client.close()
    q = pooler_for(workers)
    with pconnect(q) as c, aconnect(q) as admin:
        c.execute("SELECT 1")
        admin.execute("SHUTDOWN")
        assert q.proc.wait(timeout=10) == 0
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")


def test_shutdown_wait_for_servers_command(pooler_for):
    p = pooler_for(2)
    busy = pconnect(p)
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    with aconnect(p) as admin:
        admin.execute("SHUTDOWN WAIT_FOR_SERVERS")
    time.sleep(0.5)
    assert p.alive()
    assert wait_until(lambda: _refused(p))
    busy.execute("COMMIT")
    assert p.proc.wait(timeout=10) == 0
    busy.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sd_notify(start_pooler, tmp_path, monkeypatch, workers):
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    p = start_pooler(pool_config("tx", "transaction", pool_size=1), {"workers": workers})
    ready = notify.until("READY=1")
    assert f"MAINPID={p.proc.pid}" in ready and "STATUS=" in ready, notify.messages
    p.proc.send_signal(signal.SIGHUP)
    assert "MONOTONIC_USEC=" in notify.until("RELOADING=1")
    assert "STATUS=" in notify.until("READY=1")
    p.proc.send_signal(signal.SIGTERM)
    notify.until("STOPPING=1")
    assert p.proc.wait(timeout=10) == 0
    notify.close()
