"""Issue 13: zero-downtime upgrade. SIGUSR2, the console's UPGRADE, or `pgdoorman upgrade` start the
program on disk, pass it the listening sockets, and hand every client over at its next idle point,
with its settings, prepared statements, cancel key, and in session mode its server. Here the
checkout upgrades to itself, with one process and with two workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from helpers import REPO_ROOT, NotifyListener, pconnect, pool_config, wait_until
from test_admin import ADMIN_PASSWORD, aconnect

from pgdoorman.devcluster import free_port

WORKERS = [1, 2]


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # (a zombie child of the test counts as gone: reap it)
    with contextlib.suppress(ChildProcessError):
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


class Upgradable:
    """A pooler started by the tests' launcher, followed through its upgrades by its pidfile."""

    def __init__(self, pooler, pidfile: Path) -> None:
        self.p = pooler
        self.pidfile = pidfile
        assert wait_until(lambda: _pid(pidfile) is not None), "no pidfile"
        self.pid = _pid(pidfile)
        assert self.pid == pooler.proc.pid

    def upgrade(self, how: str = "signal") -> int:
        """Upgrade; returns the new pid once it serves (the old one may still be handing over)."""
        old = self.pid
        assert old is not None
        if how == "signal":
            os.kill(old, signal.SIGUSR2)
        elif how == "console":
            with aconnect(self.p) as admin:
                notices: list[str] = []
                admin.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
                admin.execute("UPGRADE")
                assert any("serves" in n for n in notices), notices
        else:
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
            command = [sys.executable, "-m", "pgdoorman", "upgrade", "-c", str(self.p.config_path)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == 0, done.stdout + done.stderr
        assert wait_until(lambda: _pid(self.pidfile) not in (None, old), timeout=60), (
            "no new process:\n" + self.p.log())
        self.pid = _pid(self.pidfile)
        assert self.pid != old
        return old

    def wait_gone(self, pid: int, timeout: float = 30) -> None:
        assert wait_until(lambda: not _alive(pid), timeout=timeout), (
            f"old process {pid} still running:\n{self.p.log()}")

    def stop(self) -> None:
        pid = _pid(self.pidfile)
        for candidate in {pid, self.p.proc.pid} - {None}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(candidate, signal.SIGQUIT)  # type: ignore[arg-type]
        if pid is not None:
            wait_until(lambda: not _alive(pid), timeout=10)


@pytest.fixture
def upgradable(start_pooler, tmp_path):
    made: list[Upgradable] = []

    def make(workers: int, pools=None, **general) -> Upgradable:
        pidfile = tmp_path / f"pgdoorman-{len(made)}.pid"
        gen = {"admin_password": ADMIN_PASSWORD, "workers": workers, "pidfile": str(pidfile),
               "shutdown_timeout": "20s", **general}
        pools = pools or (pool_config("tx", "transaction", pool_size=2, query_wait_timeout="20s")
                          | pool_config("sess", "session", pool_size=2))
        up = Upgradable(start_pooler(pools, gen), pidfile)
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_session_keeps_its_settings_statements_and_cancel(upgradable, workers):
    up = upgradable(workers)
    conn = pconnect(up.p, autocommit=True)
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    conn.execute("SET application_name = 'before-upgrade'")
    conn.execute("SET statement_timeout = '123s'")
    assert conn.execute("SELECT %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    conn.execute("PREPARE sqlplan AS SELECT 40 + $1")
    key = conn.pgconn.backend_pid
    old = up.upgrade()
    assert conn.execute("SELECT 1").fetchone() == (1,)  # its next transaction moves it
    up.wait_gone(old)
    assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
    assert conn.execute("SHOW application_name").fetchone() == ("before-upgrade",)
    assert conn.execute("SHOW statement_timeout").fetchone() == ("123s",)
    assert conn.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
    assert conn.execute("EXECUTE sqlplan(2)").fetchone() == (42,)
    assert conn.pgconn.backend_pid == key  # the same cancel key (its pid part)
    # A cancel now goes to the new process, which forwards it to this client's server.
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(20)")
    timer.join()
    assert time.monotonic() - started < 10
    assert conn.execute("SELECT 2").fetchone() == (2,)
    # and a second upgrade, from the new process, works the same way; a console session on the old
    # process is the one thing that ends, with a FATAL that says why
    console = aconnect(up.p)
    console.execute("SHOW VERSION")
    older = up.upgrade("console" if workers == 1 else "command")
    assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
    up.wait_gone(older)
    assert conn.execute("SELECT %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    with pytest.raises(psycopg.OperationalError, match="upgraded: connect again"):
        console.execute("SHOW VERSION")
    console.close()
    conn.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_transaction_commits_on_the_old_process_then_moves(upgradable, workers):
    up = upgradable(workers)
    setup = pconnect(up.p, autocommit=True)
    setup.execute("DROP TABLE IF EXISTS upgrade_tx")
    setup.execute("CREATE TABLE upgrade_tx (n int)")
    conn = pconnect(up.p, autocommit=False)
    conn.execute("INSERT INTO upgrade_tx VALUES (1)")  # a transaction is open
    old = up.upgrade()
    time.sleep(0.5)
    assert _alive(old), "the old process left while a transaction was open"
    conn.execute("INSERT INTO upgrade_tx VALUES (2)")
    conn.commit()
    up.wait_gone(old)
    assert conn.execute("SELECT count(*) FROM upgrade_tx").fetchone() == (2,)
    conn.commit()
    assert setup.execute("SELECT count(*) FROM upgrade_tx").fetchone() == (2,)
    setup.execute("DROP TABLE upgrade_tx")
    conn.close()
    setup.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_cancel_reaches_a_query_still_on_the_old_process(upgradable, workers):
    up = upgradable(workers)
    conn = pconnect(up.p, autocommit=False)
    conn.execute("SELECT 1")  # a transaction is open: it stays on the old process until it ends
    errors: list[BaseException] = []

    def sleep() -> None:
        try:
            conn.execute("SELECT pg_sleep(30)")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    runner = threading.Thread(target=sleep)
    runner.start()
    time.sleep(0.3)
    old = up.upgrade()
    assert _alive(old)
    conn.cancel()  # reaches the new process, which passes it back to the old one
    runner.join(timeout=10)
    assert not runner.is_alive(), "the cancel did not reach the query"
    assert errors and isinstance(errors[0], psycopg.errors.QueryCanceled), errors
    conn.rollback()
    assert conn.execute("SELECT 3").fetchone() == (3,)
    conn.commit()
    up.wait_gone(old)
    assert conn.execute("SELECT 4").fetchone() == (4,)
    conn.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_session_client_keeps_its_server_and_temp_table(upgradable, workers):
    up = upgradable(workers)
    conn = pconnect(up.p, dbname="sess", autocommit=True)
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()
    conn.execute("CREATE TEMP TABLE upgrade_temp AS SELECT 7 AS n")
    conn.execute("PREPARE own AS SELECT n FROM upgrade_temp")
    conn.execute("LISTEN sess_channel")  # the backend listens: it moves with its server
    old = up.upgrade()
    up.wait_gone(old)
    assert conn.execute("SELECT pg_backend_pid()").fetchone() == backend
    assert conn.execute("SELECT n FROM upgrade_temp").fetchone() == (7,)
    assert conn.execute("EXECUTE own").fetchone() == (7,)
    with pconnect(up.p) as other:
        other.execute("NOTIFY sess_channel, 'after'")
    heard = list(conn.notifies(timeout=5, stop_after=1))
    assert [n.payload for n in heard] == ["after"]
    conn.close()
    # The pool goes on: new session clients get a clean server, the one that moved (the pool has no
    # other), whatever their startup settings (found by the upgrade bench: a login with
    # application_name was probed for ever on a pool whose only server had been handed over).
    time.sleep(0.5)  # its reset done: the next login gets that server, and the pool connects no other
    for extra in ({}, {"application_name": "someone"}, {"options": "-c TimeZone=Asia/Tokyo"}):
        other = pconnect(up.p, dbname="sess", autocommit=True, connect_timeout=5, **extra)
        leftover = other.execute("SELECT count(*) FROM pg_class WHERE relname = 'upgrade_temp'").fetchone()
        assert leftover == (0,)
        other.close()
        time.sleep(0.3)


@pytest.mark.parametrize("workers", WORKERS)
def test_a_broken_config_on_disk_aborts_the_upgrade(upgradable, workers):
    up = upgradable(workers)
    conn = pconnect(up.p, autocommit=True)
    conn.execute("SET TimeZone = 'UTC'")
    good = up.p.config_path.read_text()
    up.p.config_path.write_text(good + "\n[general]\nno_such_key = 1\n")
    with aconnect(up.p) as admin, pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as failed:
        admin.execute("UPGRADE")
    assert "check" in str(failed.value), failed.value
    os.kill(up.pid, signal.SIGUSR2)  # the signal: refused the same way, in the log
    assert wait_until(lambda: up.p.log().count("upgrade failed, serving on") >= 2, timeout=60), up.p.log()
    assert _pid(up.pidfile) == up.pid and _alive(up.pid)
    assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
    fresh = pconnect(up.p)
    assert fresh.execute("SELECT 5").fetchone() == (5,)
    fresh.close()
    up.p.config_path.write_text(good)
    old = up.upgrade()
    up.wait_gone(old)
    assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
    conn.close()


def test_listening_never_stops(upgradable):
    """Connections opened in a loop throughout an upgrade all log in and answer."""
    up = upgradable(1)
    stop = threading.Event()
    failures: list[str] = []
    count = [0]

    def connect_loop() -> None:
        while not stop.is_set():
            try:
                with pconnect(up.p, autocommit=True) as c:
                    c.execute("SELECT 1")
                count[0] += 1
            except psycopg.Error as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=connect_loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    old = up.upgrade()
    up.wait_gone(old)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert count[0] > 20


@pytest.mark.parametrize("workers", WORKERS)
def test_pgbench_through_two_upgrades_loses_nothing(pg, upgradable, workers, tmp_path):
    """32 clients over 2 servers, so most are waiting at any moment: waiting clients move with
    their request, the others between transactions. pgbench aborts a client on any error."""
    from test_core_pgbench import processed_and_failed

    up = upgradable(workers)
    script = tmp_path / "tx.sql"
    script.write_text("\\set n random(1, 1000)\nBEGIN;\nSELECT :n;\nSELECT :n + 1;\nEND;\n")
    env = dict(os.environ, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    argv = [pg.tool("pgbench"), "-h", up.p.host, "-p", str(up.p.port), "-U", "trust_user", "-n",
            "-c", "32", "-j", "2", "-T", "7", "-M", "prepared", "-f", str(script), "tx"]
    bench = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        time.sleep(1.5)
        first = up.upgrade()
        up.wait_gone(first)
        second = up.upgrade()
        up.wait_gone(second)
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 0, out
    processed, failed = processed_and_failed(out)
    assert failed == 0 and processed > 100, out
    assert "aborted" not in out, out
    assert "closing because" not in "".join(
        line for line in up.p.log().splitlines(keepends=True) if "error" in line), up.p.log()


def test_tls_and_listen_clients_drain_then_get_58006(upgradable, tmp_path):
    """A TLS session lives in the old process, and a LISTEN would miss notifications while it
    moved: those clients stay on the old process, served as before, until shutdown_timeout."""
    from tlscerts import CertAuthority

    ca = CertAuthority(tmp_path / "ca")
    server = ca.issue("server", "localhost", server=True)
    up = upgradable(1, tls_mode="prefer", tls_certificate=str(server.cert),
                    tls_private_key=str(server.key), shutdown_timeout="3s")
    secure = psycopg.connect(up.p.dsn(sslmode="require"), autocommit=True)
    assert secure.pgconn.ssl_in_use
    listening = pconnect(up.p)
    listening.execute("LISTEN upgrade_channel")
    plain = pconnect(up.p)
    plain.execute("SELECT 1")
    old = up.upgrade()
    assert plain.execute("SELECT 2").fetchone() == (2,)
    assert secure.execute("SELECT 3").fetchone() == (3,)  # still served by the old process
    plain.execute("NOTIFY upgrade_channel, 'still here'")
    assert wait_until(lambda: bool(list(listening.notifies(timeout=0.2, stop_after=1))), timeout=5)
    up.wait_gone(old, timeout=20)
    for conn in (secure, listening):
        with pytest.raises(psycopg.OperationalError) as cut:
            conn.execute("SELECT 4")
        assert "handed over" in str(cut.value) or conn.closed, cut.value
    assert "58006" in up.p.log()
    assert plain.execute("SELECT 5").fetchone() == (5,)
    fresh = psycopg.connect(up.p.dsn(sslmode="require"), autocommit=True)  # the new process does TLS
    assert fresh.execute("SELECT 6").fetchone() == (6,)
    for conn in (fresh, plain, secure, listening):
        conn.close()


def test_restart_only_keys_change_by_upgrade(upgradable):
    """workers and the port need a restart: an upgrade is one that keeps every client."""
    up = upgradable(1)
    conn = pconnect(up.p)
    conn.execute("SET TimeZone = 'Europe/Paris'")
    new_port = free_port(up.p.host)
    text = up.p.config_path.read_text()
    text = text.replace(f"port = {up.p.port}", f"port = {new_port}").replace("workers = 1", "workers = 2")
    up.p.config_path.write_text(text)
    old = up.upgrade()
    up.wait_gone(old)
    assert conn.execute("SHOW TimeZone").fetchone() == ("Europe/Paris",)  # moved, its socket too
    with psycopg.connect(up.p.dsn(), port=new_port, autocommit=True) as c:
        assert c.execute("SELECT 7").fetchone() == (7,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(up.p.dsn(), connect_timeout=2)  # the old port is no longer listened on
    admin_dsn = f"host={up.p.host} port={new_port} dbname=pgdoorman user=admin password={ADMIN_PASSWORD}"
    admin = psycopg.connect(admin_dsn, autocommit=True, cursor_factory=psycopg.ClientCursor)
    assert len(admin.execute("SHOW WORKERS").fetchall()) == 2
    admin.close()
    conn.close()


def test_sd_notify_follows_the_new_process(upgradable, tmp_path, monkeypatch):
    notify = NotifyListener(str(tmp_path / "notify.sock"), timeout=20)
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    up = upgradable(2)
    notify.until("READY=1")
    old = up.upgrade()
    told = notify.until("MAINPID=")
    assert f"MAINPID={up.pid}" in told, notify.messages
    up.wait_gone(old)
    assert not any("STOPPING=1" in message for message in notify.drain()), notify.messages
    notify.close()


@pytest.mark.parametrize("workers", [2])  # (the state that moves is the same with one process)
def test_pass_through_and_auth_query_users_move(pg, upgradable, workers):
    """Their secrets are not in the config: the SCRAM keys a pass-through client proved, and the
    secret auth_query found, move with them, so the new process logs in to servers for them."""
    from test_auth_query import _pool as lookup_pool
    from test_passthrough import _pools as passthrough_pools
    from test_passthrough import _verifier

    pools = passthrough_pools(pg, _verifier(pg, "scram_user")) | lookup_pool(pg)
    up = upgradable(workers, pools=pools)
    through = psycopg.connect(up.p.dsn("tx", "scram_user"), autocommit=True)
    looked_up = psycopg.connect(up.p.dsn("aq", "md5_user"), autocommit=True)
    for conn in (through, looked_up):
        conn.execute("SET application_name = 'moved'")
    old = up.upgrade()
    for conn in (through, looked_up):
        conn.execute("SELECT 1")
    up.wait_gone(old)
    # new servers: the ones of the old process are gone, and these clients are the only proof
    assert through.execute("SELECT current_user, current_setting('application_name')").fetchone() == (
        "scram_user", "moved")
    assert looked_up.execute("SELECT current_user, current_setting('application_name')").fetchone() == (
        "md5_user", "moved")
    through.close()
    looked_up.close()


def test_clients_see_only_their_own_state_through_upgrades(pg, upgradable):
    """An attacker's view: 24 asyncpg clients (prepared statements, transactions) over 3 servers and
    4 session clients, each checking in every transaction that it sees its own setting, its own
    rows and its own temp table, while the pooler (two workers) is upgraded twice."""
    import asyncio

    import asyncpg

    up = upgradable(2, pools=pool_config("tx", "transaction", pool_size=3, query_wait_timeout="30s")
                    | pool_config("sess", "session", pool_size=4))
    pg.psql("DROP TABLE IF EXISTS upgrade_rows; CREATE TABLE upgrade_rows (client int, n int); "
            "GRANT ALL ON upgrade_rows TO PUBLIC", db="testdb")
    stop = asyncio.Event()
    done: dict[str, int] = {}

    async def tx_client(i: int) -> None:
        conn = await asyncpg.connect(up.p.url("tx"))
        await conn.execute(f"SET myapp.client = '{i}'")
        check = await conn.prepare("SELECT $1::int AS n, current_setting('myapp.client') AS me")
        n = 0
        while not stop.is_set():
            n += 1
            async with conn.transaction():
                await conn.execute("INSERT INTO upgrade_rows VALUES ($1, $2)", i, n)
                row = await check.fetchrow(n)
                assert (row["n"], row["me"]) == (n, str(i)), (i, n, row)
                mine = await conn.fetchval("SELECT count(*) FROM upgrade_rows WHERE client = $1", i)
                assert mine == n, (i, n, mine)
        done[f"tx{i}"] = n
        await conn.close()

    async def session_client(i: int) -> None:
        conn = await asyncpg.connect(up.p.url("sess"))
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.execute(f"CREATE TEMP TABLE mine AS SELECT {i} AS me")
        n = 0
        while not stop.is_set():
            n += 1
            assert await conn.fetchval("SELECT me FROM mine") == i
            assert await conn.fetchval("SELECT pg_backend_pid()") == backend
            await asyncio.sleep(0.01)
        done[f"s{i}"] = n
        await conn.close()

    async def run() -> None:
        tasks = [asyncio.create_task(tx_client(i)) for i in range(24)]
        tasks += [asyncio.create_task(session_client(i)) for i in range(4)]
        await asyncio.sleep(1.0)
        for _ in range(2):
            old = await asyncio.to_thread(up.upgrade)
            await asyncio.to_thread(up.wait_gone, old)
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert len(done) == 28 and min(done.values()) > 3, done
    assert "error" not in "".join(line for line in up.p.log().splitlines() if " ERROR " in line)


def test_a_copy_in_progress_finishes_on_the_old_process(upgradable):
    up = upgradable(1)
    conn = pconnect(up.p)
    conn.execute("DROP TABLE IF EXISTS upgrade_copy")
    conn.execute("CREATE TABLE upgrade_copy (n int)")
    with conn.cursor() as cur, cur.copy("COPY upgrade_copy FROM STDIN") as copy:
        for n in range(1000):
            copy.write_row((n,))
        old = up.upgrade()
        time.sleep(0.3)
        assert _alive(old)
        for n in range(1000, 2000):
            copy.write_row((n,))
    up.wait_gone(old)
    assert conn.execute("SELECT count(*), sum(n) FROM upgrade_copy").fetchone() == (2000, sum(range(2000)))
    conn.execute("DROP TABLE upgrade_copy")
    conn.close()


@pytest.mark.parametrize("workers", WORKERS)
def test_a_successor_dying_mid_hand_over_leaves_the_old_pooler_serving(upgradable, workers):
    """Until the old process has handed over everyone, it keeps its listening sockets (and is still
    systemd's main process): if the new one dies, it takes back the clients not yet sent, accepts
    again, rewrites the pidfile, and can be upgraded again later."""
    up = upgradable(workers)
    busy = pconnect(up.p, autocommit=False)
    busy.execute("SELECT 1")  # in a transaction: stays on the old process
    old = up.upgrade()
    new = up.pid
    assert new is not None
    os.kill(new, signal.SIGKILL)
    assert wait_until(lambda: "died during the hand-over" in up.p.log(), timeout=20), up.p.log()
    assert wait_until(lambda: _pid(up.pidfile) == old, timeout=10), up.p.log()
    up.pid = old
    busy.commit()
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.commit()
    with pconnect(up.p) as fresh:  # accepted by the old process again
        assert fresh.execute("SELECT 3").fetchone() == (3,)
    assert _alive(old)
    again = up.upgrade()
    assert again == old
    assert busy.execute("SELECT 4").fetchone() == (4,)
    busy.commit()
    up.wait_gone(old)
    assert busy.execute("SELECT 5").fetchone() == (5,)
    busy.close()


def test_a_pinned_client_moves_with_its_server_and_statements(upgradable):
    """A transaction-mode client with a temp table is pinned to its server, so the server moves with
    it, still holding what the old process prepared there; its statements, old and new, work on it
    (the new process's statement names also carry its generation: prepared.set_generation)."""
    up = upgradable(1)
    other = pconnect(up.p)  # the old process's first names go to another client's statements
    for k in range(3):
        other.execute(f"SELECT %s::int + {k}", (1,), prepare=True)
    other.close()
    conn = pconnect(up.p)
    conn.execute("CREATE TEMP TABLE pinned_here AS SELECT 1 AS n")
    backend = conn.execute("SELECT pg_backend_pid()", prepare=True).fetchone()
    assert conn.execute("SELECT n FROM pinned_here WHERE n = %s", (1,), prepare=True).fetchone() == (1,)
    old = up.upgrade()
    conn.execute("SELECT 1")
    up.wait_gone(old)
    assert conn.execute("SELECT pg_backend_pid()", prepare=True).fetchone() == backend
    for k in range(4):  # new names in the new process: PGDOORMAN_1_3 etc., never the old ones
        assert conn.execute(f"SELECT %s::text || '{k}'", ("new",), prepare=True).fetchone() == (f"new{k}",)
    assert conn.execute("SELECT n + %s FROM pinned_here", (1,), prepare=True).fetchone() == (2,)
    assert conn.execute("SELECT n FROM pinned_here WHERE n = %s", (1,), prepare=True).fetchone() == (1,)
    conn.execute("DROP TABLE pinned_here")  # unpinned: its server can go back to the pool now
    assert conn.execute("SELECT 3").fetchone() == (3,)
    conn.close()


def _poolers_of(config: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(config).encode() in cmdline and b"pgdoorman" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_pgdoorman_upgrade_over_the_console_socket(start_pooler, tmp_path):
    """Without a pidfile, `pgdoorman upgrade` asks the console over the unix socket, where the OS
    user the pooler runs as logs in by its peer credentials."""
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    p = start_pooler(pool_config("tx", "transaction", pool_size=2), {"unix_socket_dir": str(sockets)})
    conn = pconnect(p)
    conn.execute("SET TimeZone = 'Asia/Kolkata'")
    old = p.proc.pid
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    try:
        done = subprocess.run([sys.executable, "-m", "pgdoorman", "upgrade", "-c", str(p.config_path)],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stdout + done.stderr + p.log()
        assert "serves" in done.stdout
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Kolkata",)
        assert p.proc.wait(timeout=30) == 0  # the old process has handed over and exited
        assert [pid for pid in _poolers_of(p.config_path) if pid != old]
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Kolkata",)
    finally:
        conn.close()
        for pid in _poolers_of(p.config_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)
