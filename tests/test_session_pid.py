"""Session mode tells the client its real backend pid (issue 8, case 12).

BackendKeyData carries the pid of the server the session holds (so `conn.info.backend_pid`,
`pg_backend_pid()` and NotificationResponse pids agree, and pg_terminate_backend() works on it),
with a secret key of the pooler's own: cancel requests are routed by that key (≡ worker mod
workers), whatever the pid, with one worker or several, in session and transaction mode.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from helpers import pconnect, pool_config, wait_for_active_query
from psycopg import errors as pgerr

USER = "trust_user"


@pytest.fixture(params=[1, 2], ids=["workers=1", "workers=2"])
def pooler(request, start_pooler):
    return start_pooler(pool_config("sess", "session", pool_size=8, users=(USER,))
                        | pool_config("tx", pool_size=4, users=(USER,)), {"workers": request.param})


def test_backend_pid_is_the_real_one(pooler):
    conns = [pconnect(pooler, "sess") for _ in range(6)]
    try:
        for conn in conns:
            assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    finally:
        for conn in conns:
            conn.close()


def test_notification_pids_agree(pooler):
    with pconnect(pooler, "sess") as listener, pconnect(pooler, "sess") as notifier:
        listener.execute("LISTEN pid_check")
        notifier.execute("NOTIFY pid_check, 'from the other'")
        listener.execute("NOTIFY pid_check, 'from myself'")
        got = {n.payload: n.pid for n in listener.notifies(timeout=5, stop_after=2)}
        assert got == {"from the other": notifier.info.backend_pid, "from myself": listener.info.backend_pid}


def test_pg_terminate_backend_of_the_reported_pid(pg, pooler):
    conn = pconnect(pooler, "sess")
    pid = conn.info.backend_pid
    assert pg.psql(f"SELECT pg_terminate_backend({pid})") == "t"
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pconnect(pooler, "sess") as other:  # the pool goes on
        assert other.execute("SELECT 1").fetchone() == (1,)


def _cancel(pg, conn: psycopg.Connection, sql: str) -> None:
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            conn.execute(sql)
        except BaseException as e:  # noqa: BLE001 - checked below
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    wait_for_active_query(pg, sql)
    conn.cancel_safe(timeout=10)
    thread.join(10)
    assert not thread.is_alive(), "the cancel did not reach the query"
    assert isinstance(box.get("error"), pgerr.QueryCanceled), box


@pytest.mark.parametrize("db", ["sess", "tx"])
def test_cancel_is_routed_by_the_key(pg, pooler, db):
    """Several clients, so that with two workers their (real) pids have both parities."""
    conns = [pconnect(pooler, db) for _ in range(4)]
    try:
        for i, conn in enumerate(conns):
            _cancel(pg, conn, f"SELECT pg_sleep(30) /* {db} {i} {conn.info.backend_pid} */")
            assert conn.execute("SELECT 7").fetchone() == (7,)
    finally:
        for conn in conns:
            conn.close()
