"""Issue 12, many connections: out of file descriptors, login storms, slow and stalled clients.

The pooler runs as a subprocess, as users run it; the low-limit ones through `prlimit --nofile=N:N`
(soft and hard: the pooler raises the soft limit to the hard one).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    REPO_ROOT,
    STARTUP_TIMEOUT,
    Pooler,
    ProtocolEOF,
    RawConn,
    parse_error_fields,
    pconnect,
    pool_config,
    query_message,
    render_toml,
    startup_packet,
    wait_until,
)

from pgdoorman.devcluster import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
TRUST = ("trust_user",)


@pytest.fixture(autouse=True, scope="module")
def _client_fds() -> None:
    """This test process holds thousands of sockets itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def launch(pg: Any, tmp_path: Path) -> Iterator[Any]:
    """launch(pools, general, nofile=None) -> Pooler, under RLIMIT_NOFILE = nofile when given."""
    started: list[Pooler] = []

    def start(pools: Mapping[str, Any], general: Mapping[str, Any], nofile: int | None = None) -> Pooler:
        host, port = "127.0.0.1", free_port("127.0.0.1")
        gen = {"host": host, "port": port, "unix_socket_dir": "", "auth_failure_delay": 0,
               "log_client_connections": False, "log_client_disconnections": False, **general}
        config_path = tmp_path / f"pgdoorman-{port}.toml"
        config_path.write_text(render_toml({"general": gen, "pools": dict(pools)}))
        log_path = tmp_path / f"pgdoorman-{port}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Pooler.stop
        argv = [sys.executable, "-m", "pgdoorman", "-c", str(config_path)]
        if nofile is not None:
            argv = [_prlimit(), f"--nofile={nofile}:{nofile}", *argv]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=str(REPO_ROOT), env=env)
        pooler = Pooler(host, port, config_path, log_path, proc, log_file)
        started.append(pooler)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "starting with" not in pooler.log() or not _listening(host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pgdoorman did not start:\n{pooler.log()}", pytrace=False)
            time.sleep(0.05)
        return pooler

    yield start
    for pooler in started:
        pooler.stop()


def _prlimit() -> str:
    path = shutil.which("prlimit")
    if path is None:
        pytest.skip("prlimit (util-linux) is not installed")
    return path


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _cpu(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def _rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total * 1024


def _try_login(pooler: Pooler, timeout: float = 5.0) -> RawConn | str:
    """A logged-in RawConn, or how the pooler refused: "error <SQLSTATE>" or "closed". A hang fails."""
    try:
        conn = RawConn(pooler.host, pooler.port, timeout)
    except OSError as exc:
        return f"connect {exc.__class__.__name__}"
    try:
        conn.startup("trust_user", "tx")
        return conn
    except AssertionError as exc:  # RawConn's way of saying ErrorResponse
        conn.close()
        text = str(exc)
        assert "53300" in text or "too many" in text or "out of" in text, text
        return "error " + ("53300" if "53300" in text else text[:80])
    except (ProtocolEOF, ConnectionResetError, BrokenPipeError):
        conn.close()
        return "closed"
    except TimeoutError:
        conn.close()
        pytest.fail(f"a client got no answer in {timeout}s: the pooler hangs it")


def _idle_cpu(pooler: Pooler, seconds: float = 2.0) -> float:
    """Cores the pooler's processes used over `seconds`, while clients keep knocking."""
    pids = _tree(pooler.proc.pid)
    before, t0 = _cpu(pids), time.monotonic()
    knocks: list[socket.socket] = []
    while time.monotonic() - t0 < seconds:
        try:  # connections left in the backlog are what makes a naive accept loop spin
            knocks.append(socket.create_connection((pooler.host, pooler.port), timeout=1))
        except OSError:
            pass
        time.sleep(0.1)
    used = (_cpu(pids) - before) / (time.monotonic() - t0)
    for s in knocks:
        s.close()
    return used


@pytest.mark.parametrize("workers", [1, 2])
def test_out_of_file_descriptors(launch, workers: int) -> None:
    pooler = launch(pool_config("tx", pool_size=4, users=TRUST), {"workers": workers}, nofile=80)
    assert "open files limit (RLIMIT_NOFILE) is 80 (the hard limit)" in pooler.log()
    # Servers first (each worker its share), so that held clients can run queries with no fd to spare.
    warm = [_try_login(pooler) for _ in range(4)]
    for c in warm:
        assert isinstance(c, RawConn), c
        c.send(query_message("BEGIN; SELECT 1"))
    for c in warm:
        c.read_until_ready()
    for c in warm:
        assert c.query("COMMIT")[2] == b"I"
    held: list[RawConn] = list(warm)
    refusals: Counter[str] = Counter()
    try:
        while refusals.total() < 20:
            assert len(held) < 200, "the limit of 80 open files does not hold"
            got = _try_login(pooler)
            if isinstance(got, RawConn):
                held.append(got)
            else:
                refusals[got] += 1
        print(f"workers={workers}: {len(held)} clients held, refused: {dict(refusals)}")
        assert len(held) > 20, f"only {len(held)} clients fit under 80 open files"
        used = _idle_cpu(pooler)
        print(f"workers={workers}: {used:.2f} cores while out of fds")
        assert used < 0.3, f"the pooler spins while out of descriptors: {used:.2f} cores"
        for i, c in enumerate(held):
            assert c.query(f"SELECT {i}")[0] == [[str(i)]], "a held client stopped working"
        assert pooler.alive()
        if workers == 1:  # (several workers: the acceptor's accept works; the worker loses the fd)
            assert "out of file descriptors (Too many open files)" in pooler.log()
            assert refusals["error 53300"] > 0, refusals
        for c in held[-10:]:
            c.close()
        del held[-10:]
        fresh: list[RawConn] = []

        def can_log_in() -> bool:
            got = _try_login(pooler)
            if isinstance(got, RawConn):
                fresh.append(got)
                return True
            return False

        assert wait_until(can_log_in, timeout=10, interval=0.2), "no new client after some left"
        assert fresh[0].query("SELECT 'again'")[0] == [["again"]]
        held += fresh
    finally:
        for c in held:
            c.close()


def test_acceptor_out_of_file_descriptors(launch) -> None:
    """With workers the acceptor holds clients over max_client_conn for a moment before refusing them:
    a burst of those takes its descriptors."""
    pooler = launch(pool_config("tx", pool_size=2, users=TRUST), {"workers": 2, "max_client_conn": 4},
                    nofile=48)
    held = [_try_login(pooler) for _ in range(4)]
    try:
        for i, c in enumerate(held):
            assert isinstance(c, RawConn), c
            assert c.query(f"SELECT {i}")[0] == [[str(i)]]
        burst = [socket.create_connection((pooler.host, pooler.port), timeout=5) for _ in range(150)]
        answers: Counter[str] = Counter()
        for s in burst:
            s.sendall(startup_packet({"user": "trust_user", "database": "tx"}))
        for s in burst:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                pytest.fail("a client of the burst got no answer in 5s")
            answers["53300" if data[:1] == b"E" and b"C53300" in data else repr(data[:20])] += 1
            s.close()
        print(f"burst over max_client_conn: {dict(answers)}")
        assert answers["53300"] == len(burst), answers
        assert wait_until(lambda: "out of file descriptors (Too many open files)" in pooler.log(), 3), \
            "the burst never ran the acceptor out of descriptors: raise it"
        used = _idle_cpu(pooler)
        assert used < 0.3, f"the pooler spins while out of descriptors: {used:.2f} cores"
        for i, c in enumerate(held):
            assert isinstance(c, RawConn)
            assert c.query(f"SELECT {i}")[0] == [[str(i)]]
    finally:
        for c in held:
            if isinstance(c, RawConn):
                c.close()


def test_nofile_raised_at_start(launch) -> None:
    pooler = launch(pool_config("tx", users=TRUST), {"workers": 2}, nofile=None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert wait_until(lambda: pooler.log().count("open files limit (RLIMIT_NOFILE)") == 3, 5), pooler.log()
    line = next(x for x in pooler.log().splitlines() if "open files limit" in x)
    assert f" {hard}" in line, line
    # The workers inherit the acceptor's raised limit
    with open(f"/proc/{pooler.proc.pid}/limits") as f:
        limits = next(x for x in f if x.startswith("Max open files")).split()
    assert limits[3] == limits[4] == str(hard), limits


def test_low_hard_limit_warns(launch) -> None:
    pooler = launch(pool_config("tx", users=TRUST), {"workers": 1, "max_client_conn": 1000}, nofile=200)
    assert "open files limit 200 is below the" in pooler.log()


# --- login storm ---

async def _storm_client(host: str, port: int, source: str, timeout: float) -> str:
    """Log in and run SELECT 1: "served", "refused" (ErrorResponse) or what went wrong."""
    async def run() -> str:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        reader, writer = await asyncio.open_connection(sock=await _connect(sock, host, port))
        try:
            writer.write(startup_packet({"user": "trust_user", "database": "tx"}))
            selected = False
            while True:
                kind, body = await _read_message(reader)
                if kind == b"E":
                    code = parse_error_fields(body).get("C")
                    return "refused" if code == "53300" else f"error {code}"
                if kind == b"Z":
                    if selected:
                        writer.write(b"X\0\0\0\4")
                        return "served"
                    writer.write(query_message("SELECT 1"))
                    selected = True
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(run(), timeout)
    except TimeoutError:
        return "hung"
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        return f"closed {exc.__class__.__name__}"


async def _connect(sock: socket.socket, host: str, port: int) -> socket.socket:
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    return sock


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], await reader.readexactly(length - 4)


@pytest.mark.parametrize("workers", [1, 2])
def test_login_storm(launch, workers: int) -> None:
    pooler = launch(pool_config("tx", pool_size=10, users=TRUST),
                    {"workers": workers, "max_client_conn": 10000, "query_wait_timeout": "60s"})
    count = 5000
    sources = [f"127.0.0.{2 + i % 4}" for i in range(count)]

    async def storm() -> Counter[str]:
        results = await asyncio.gather(*(_storm_client(pooler.host, pooler.port, s, 60) for s in sources))
        return Counter(results)

    t0 = time.monotonic()
    counts = asyncio.run(storm())
    print(f"workers={workers}: {count} logins at once in {time.monotonic() - t0:.1f}s: {dict(counts)}")
    assert counts["hung"] == 0, counts
    assert counts["served"] + counts["refused"] == count, counts
    assert counts["served"] >= count // 2, counts
    with pconnect(pooler) as c:
        assert c.execute("SELECT 'after'").fetchone() == ("after",)


# --- slow and stalled clients ---

def test_slowloris_is_dropped_at_login_timeout(launch) -> None:
    pooler = launch(pool_config("tx", pool_size=2, users=TRUST),
                    {"workers": 1, "client_login_timeout": "2s"})
    slow = socket.create_connection((pooler.host, pooler.port), timeout=10)
    packet = startup_packet({"user": "trust_user", "database": "tx"})
    dropped_after: list[float] = []

    def dribble() -> None:
        t0 = time.monotonic()
        try:
            for i in range(len(packet)):
                slow.sendall(packet[i:i + 1])
                slow.settimeout(1.0)
                try:
                    data = slow.recv(4096)
                except TimeoutError:
                    continue
                if not data or data[:1] == b"E":
                    break
        except OSError:
            pass
        dropped_after.append(time.monotonic() - t0)

    t = threading.Thread(target=dribble)
    t.start()
    served = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:
        with pconnect(pooler) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
            served += 1
    t.join(15)
    slow.close()
    assert not t.is_alive() and dropped_after, "the slow client was never dropped"
    assert 1.5 < dropped_after[0] < 5, f"dropped after {dropped_after[0]:.1f}s, login timeout 2s"
    assert served > 10, served


def test_client_that_stops_reading_blocks_nobody(launch) -> None:
    pooler = launch(pool_config("tx", pool_size=2, users=TRUST), {"workers": 1})
    stalled = RawConn(pooler.host, pooler.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.startup("trust_user", "tx")
    rss_before = _rss(_tree(pooler.proc.pid))
    # 200 MB of rows it never reads
    stalled.send(query_message("SELECT repeat('x', 1000000) FROM generate_series(1, 200)"))
    time.sleep(1.0)
    others = [pconnect(pooler) for _ in range(3)]
    try:
        t0 = time.monotonic()
        for i in range(100):
            c = others[i % 3]
            assert c.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        took = time.monotonic() - t0
        grown = _rss(_tree(pooler.proc.pid)) - rss_before
        print(f"100 queries beside a stalled reader in {took:.2f}s; pooler RSS +{grown >> 20} MB")
        assert took < 5, took
        assert grown < 64 << 20, f"the pooler buffers the stalled client's result: +{grown >> 20} MB"
    finally:
        for c in others:
            c.close()
        stalled.abort()
