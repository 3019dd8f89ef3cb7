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
            sleep = f"SELECT pg_sleep(30) /* worker cancel {conn.info.backend_pid} */"
            box: dict[str, BaseException] = {}

            def run(conn=conn, sleep=sleep, box=box) -> None:
                try:
                    conn.execute(sleep)
                except BaseException as e:  # noqa: BLE001
                    box["error"] = e

            t = threading.Thread(target=run)
            t.start()
            wait_for_active_query(pg, sleep)
            conn.cancel_safe(timeout=10)
            t.join(10)
            assert not t.is_alive(), "the cancel did not reach the query"
            assert isinstance(box.get("error"), pgerr.QueryCanceled), box
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


def test_sigterm_stops_every_worker(start_pooler):
    pooler = _start(start_pooler, 2, "workers-stop")
    assert wait_until(lambda: len(_worker_pids(pooler)) == 2), pooler.log()
    pids = list(_worker_pids(pooler).values())
    conn = pconnect(pooler)
    pooler.proc.send_signal(signal.SIGTERM)
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
