"""Several worker processes behind the acceptor: routing, pool shares, limits, cancel, crash, stop."""

from __future__ import annotations

import os
import re
import signal
import threading

import psycopg
import pytest
from helpers import pconnect, pool_config, wait_for_active_query, wait_until
from psycopg import errors as pgerr


def _servers(pg, app: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"))


def _worker_pids(pooler) -> dict[int, int]:
    """worker index -> pid of its latest start, from the acceptor's log."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", pooler.log())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _cancel_running_query(pg, conn: psycopg.Connection, sleep: str) -> None:
    """Run `sleep` (a long pg_sleep) on conn in a thread, cancel it once PostgreSQL runs it, and
    check that exactly that query was cancelled."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            conn.execute(sleep)
        except BaseException as e:  # noqa: BLE001 - checked below
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    wait_for_active_query(pg, sleep)
    conn.cancel_safe(timeout=10)
    t.join(10)
    assert not t.is_alive(), "the cancel did not reach the query"
    assert isinstance(box.get("error"), pgerr.QueryCanceled), box


def _start(start_pooler, pool_size: int, app: str, workers: int = 2, **general):
    return start_pooler(pool_config("tx", pool_size=pool_size, users=("trust_user",), application_name=app),
                        {"workers": workers, **general})


def test_clients_spread_over_workers_and_the_pool_limit_holds(pg, start_pooler):
    app = "workers-spread"
    pooler = _start(start_pooler, 3, app)
    assert wait_until(lambda: len(_worker_pids(pooler)) == 2), pooler.log()
    conns = [pconnect(pooler, autocommit=False) for _ in range(6)]
    try:
        # The pooler-issued BackendKeyData pid says which worker holds the client (pid mod workers).
        workers = [c.info.backend_pid % 2 for c in conns]
        assert sorted(workers) == [0, 0, 0, 1, 1, 1], workers
        # Every client busy at once: the workers open their shares, 2 + 1, and no more.
        errors: list[BaseException] = []

        def work(conn: psycopg.Connection) -> None:
            try:
                for _ in range(10):
                    conn.execute("SELECT pg_sleep(0.05)")
                    conn.commit()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert _servers(pg, app) == 3
    finally:
        for c in conns:
            c.close()


def test_a_pool_smaller_than_workers_lives_in_one_worker(pg, start_pooler):
    app = "workers-pool-one"
    pooler = _start(start_pooler, 1, app)
    conns = [pconnect(pooler) for _ in range(4)]
    try:
        # All on the one worker that has the pool's only server; none waits forever elsewhere.
        assert len({c.info.backend_pid % 2 for c in conns}) == 1
        pids = {c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in conns}
        assert len(pids) == 1
        assert _servers(pg, app) == 1
    finally:
        for c in conns:
            c.close()


def test_cancel_reaches_the_right_worker(pg, start_pooler):
    pooler = _start(start_pooler, 4, "workers-cancel")
    a, b = pconnect(pooler), pconnect(pooler)
    try:
        assert {a.info.backend_pid % 2, b.info.backend_pid % 2} == {0, 1}
        for conn in (a, b):
            _cancel_running_query(pg, conn, f"SELECT pg_sleep(30) /* cancel {conn.info.backend_pid} */")
            assert conn.execute("SELECT 7").fetchone() == (7,)
    finally:
        a.close()
        b.close()


def test_max_client_conn_counts_every_worker(start_pooler):
    pooler = _start(start_pooler, 2, "workers-max", max_client_conn=3)
    conns = [pconnect(pooler) for _ in range(3)]
    try:
        assert len({c.info.backend_pid % 2 for c in conns}) == 2
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            pconnect(pooler)
        conns.pop().close()

        def one_more() -> bool:
            try:
                conns.append(pconnect(pooler))
            except psycopg.OperationalError:
                return False
            return True

        assert wait_until(one_more), "a closed client's place was not given back"
        assert conns[-1].execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()


def test_a_dead_worker_is_restarted_and_the_others_go_on(start_pooler):
    pooler = _start(start_pooler, 4, "workers-crash")
    assert wait_until(lambda: len(_worker_pids(pooler)) == 2), pooler.log()
    a, b = pconnect(pooler), pconnect(pooler)
    try:
        victim = a.info.backend_pid % 2
        assert b.info.backend_pid % 2 != victim
        old_pid = _worker_pids(pooler)[victim]
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(psycopg.OperationalError):
            a.execute("SELECT 1")
        assert b.execute("SELECT 2").fetchone() == (2,)  # the other worker's client is untouched
        assert wait_until(lambda: _worker_pids(pooler).get(victim, old_pid) != old_pid), pooler.log()
        assert f"worker {victim} (pid {old_pid}) exited with code -9; restarting it" in pooler.log()
        # New clients reach both workers again.
        fresh = [pconnect(pooler) for _ in range(4)]
        try:
            assert {c.info.backend_pid % 2 for c in fresh} == {0, 1}
            assert all(c.execute("SELECT 3").fetchone() == (3,) for c in fresh)
        finally:
            for c in fresh:
                c.close()
    finally:
        a.close()
        b.close()


def test_sigquit_stops_every_worker_at_once(start_pooler):
    pooler = _start(start_pooler, 2, "workers-stop")
    assert wait_until(lambda: len(_worker_pids(pooler)) == 2), pooler.log()
    pids = list(_worker_pids(pooler).values())
    conn = pconnect(pooler)
    pooler.proc.send_signal(signal.SIGQUIT)  # immediate (SIGTERM waits for clients: test_admin.py)
    assert pooler.proc.wait(timeout=15) == 0
    assert not any(_alive(p) for p in pids)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()


def test_workers_exit_when_the_acceptor_is_killed(start_pooler):
    pooler = _start(start_pooler, 2, "workers-orphan")
    assert wait_until(lambda: len(_worker_pids(pooler)) == 2), pooler.log()
    pids = list(_worker_pids(pooler).values())
    pooler.proc.kill()
    pooler.proc.wait(timeout=5)
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=15), "orphaned workers"
    assert "the acceptor process is gone: stopping" in pooler.log()


def test_a_waiting_client_moves_to_a_worker_with_a_free_server(pg, start_pooler):
    """pool_size 2 over 2 workers is one server each. While X holds its worker's server in a
    transaction, Y (same worker) would wait for it; instead it moves to the other worker's free
    server, keeping its session: parameters, prepared statements and cancel key."""
    app = "workers-move"
    pooler = _start(start_pooler, 2, app, query_wait_timeout="20s")
    x = pconnect(pooler, autocommit=False)
    others = [pconnect(pooler) for _ in range(3)]
    try:
        same = [c for c in others if c.info.backend_pid % 2 == x.info.backend_pid % 2]
        y = same[0]
        y.execute("SET application_name = 'mover'")  # a tracked parameter travels with the client
        y.execute("SELECT %s::int + 1", (1,), prepare=True)  # a prepared statement too
        for c in others:
            if c is not y:
                c.close()
        x.execute("SELECT 1")  # X's transaction holds its worker's only server
        assert y.execute("SELECT pg_sleep(0.5), 2").fetchone()[1] == 2  # served by the other worker
        assert "tx/trust_user: 1 waiting client moved to worker" in pooler.log()
        assert y.execute("SHOW application_name").fetchone() == ("mover",)
        assert y.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
        x.rollback()
        # The cancel key it got from its first worker still cancels its query on the second.
        x.execute("SELECT 1")  # hold X's server again, so Y stays where it is
        _cancel_running_query(pg, y, "SELECT pg_sleep(30) /* moved cancel */")
        x.rollback()
        assert _servers(pg, app) + _servers(pg, "mover") == 2  # one server per worker, no more
    finally:
        x.close()
        for c in others:
            c.close()


def test_balancing_plan():
    """The acceptor's decision from LOAD reports:
    (clients, waiters, oldest wait s, free servers, mean wait s) -> (count, from, to)."""
    from pgdoorman.acceptor import Acceptor, Worker

    a, b = Worker(0), Worker(1)
    plan = Acceptor._plan
    # Free servers elsewhere: move as many waiters as they can take.
    assert plan({a: (10, 6, 0.5, 0, 0.4), b: (0, 0, 0.0, 4, 0.0)}) == (4, a, b)
    assert plan({a: (10, 2, 0.5, 0, 0.4), b: (0, 0, 0.0, 4, 0.0)}) == (2, a, b)
    assert plan({a: (0, 0, 0.0, 4, 0.0), b: (10, 2, 0.5, 0, 0.4)}) == (2, b, a)
    # ... but not for a wait shorter than FREE_SERVER_WAIT, and not to a worker whose clients wait.
    assert plan({a: (10, 6, 0.001, 0, 0.001), b: (0, 0, 0.0, 4, 0.0)}) == (0, None, None)
    # Both busy, mean waits 20 ms vs 10 ms with 250 clients each: rates 12.5k/s and 25k/s, so 1/3 of
    # the clients belong on a; move half the way (41), capped at a tenth of a's clients (25).
    assert plan({a: (250, 240, 0.030, 0, 0.020), b: (250, 240, 0.015, 0, 0.010)}) == (25, a, b)
    assert plan({a: (100, 90, 0.030, 0, 0.020), b: (300, 290, 0.015, 0, 0.010)}) == (10, a, b)
    # Mean waits within 10 % (+0.5 ms) of each other: leave them.
    assert plan({a: (250, 240, 0.015, 0, 0.0114), b: (250, 240, 0.015, 0, 0.010)}) == (0, None, None)
    assert plan({a: (250, 240, 0.015, 0, 0.012)}) == (0, None, None)
    assert plan({a: (250, 0, 0.0, 0, 0.0), b: (250, 0, 0.0, 0, 0.0)}) == (0, None, None)
