"""max_memory_usage and streaming: what the pooler holds for messages in flight is bounded; a client
whose message would take it over the bound gets 53200 and goes, and nobody else notices."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
import urllib.request

import asyncpg
import psycopg
import pytest
from helpers import Pooler, PoolerLauncher, RawConn, message, parse_error_fields, pool_config, wait_until

from pgdoorman.devcluster import Cluster, free_port

ADMIN = {"admin_password": "console_pw"}


def _mem(p: Pooler) -> dict[str, int]:
    with psycopg.connect(p.dsn("pgdoorman", "admin", "console_pw"), autocommit=True) as admin:
        return {row[0]: row[2] for row in admin.execute("SHOW MEM").fetchall()}


def _parse(name: bytes, sql: str) -> bytes:
    return message(b"P", name + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_message_over_the_limit_ends_only_its_client(start_pooler: PoolerLauncher, workers: int) -> None:
    # a named Parse is read whole (its text is the statement's key): 3 MB cannot fit in 2 MB
    metrics_port = free_port("127.0.0.1")
    p = start_pooler(pool_config("tx", pool_size=2), {"workers": workers, "max_memory_usage": "2MB", **ADMIN},
                     prometheus={"enabled": True, "port": metrics_port})
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as other:
        with RawConn.for_pooler(p) as raw:
            raw.startup("trust_user", "tx")
            big = _parse(b"big", "SELECT '" + "x" * (3 << 20) + "'")
            try:
                raw.send(big)
            except OSError:
                pass  # it may be gone before the last byte
            kind, body = raw.recv_message()
            assert kind == b"E"
            fields = parse_error_fields(body)
            assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "53200", "out of memory")
            assert "max_memory_usage" in fields["D"]
        assert other.execute("SELECT 42").fetchone() == (42,)  # the other client never noticed
    assert "max_memory_usage" in p.log()
    assert wait_until(lambda: _mem(p)["messages_in_flight"] == 0)
    mem = _mem(p)
    assert mem["messages_refused_for_memory"] == 1
    assert mem["messages_in_flight_peak"] <= (2 << 20)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    def total(name: str) -> float:
        return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + "{"))

    assert total("pgdoorman_memory_refused_clients_total") == 1
    assert total("pgdoorman_memory_limit_bytes") == 2 << 20  # each worker's share, together the limit


def test_large_binds_stream_instead_of_counting(start_pooler: PoolerLauncher) -> None:
    """Parameters of 2 MB each from 10 clients at once, under a 1 MB limit: streamed to the server
    as they arrive, never held whole, so nobody is refused."""
    p = start_pooler(pool_config("tx", pool_size=10), {"workers": 1, "max_memory_usage": "1MB", **ADMIN})

    async def one(i: int) -> int:
        conn = await asyncpg.connect(host=p.host, port=p.port, user="trust_user", database="tx", ssl=False)
        try:
            return int(await conn.fetchval("SELECT length($1::bytea)", bytes([i]) * (2 << 20)))
        finally:
            await conn.close()

    async def all_of_them() -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(10))))

    assert asyncio.run(all_of_them()) == [2 << 20] * 10
    mem = _mem(p)
    assert mem["messages_refused_for_memory"] == 0
    assert mem["messages_in_flight_peak"] <= (1 << 20)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slow_reader_pauses_its_server(start_pooler: PoolerLauncher, workers: int) -> None:
    """A 64 MB result read slowly: the pooler holds about a socket buffer of it, not the result."""
    p = start_pooler(pool_config("tx", pool_size=2), {"workers": workers, **ADMIN})
    with RawConn.for_pooler(p) as raw:
        raw.startup("trust_user", "tx")
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        raw.send(message(b"Q", b"SELECT repeat('x', 1048576) FROM generate_series(1, 64)\0"))
        time.sleep(1.0)  # it reads nothing meanwhile: the server must have been paused
        held = _mem(p)["messages_in_flight"]
        got = 0
        while True:
            kind, body = raw.recv_message()
            if kind == b"D":
                got += 1
            if kind == b"Z":
                break
        assert got == 64
    print("held while paused:", held, _mem(p))
    assert held < (4 << 20), held  # a write buffer's worth, not 64 MB
    assert _mem(p)["messages_in_flight_peak"] < (4 << 20)
    assert wait_until(lambda: _mem(p)["messages_in_flight"] == 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_slow_server_pauses_its_copy(pg: Cluster, start_pooler: PoolerLauncher, workers: int) -> None:
    """COPY FROM STDIN into a backend that is stopped (SIGSTOP): the pooler stops reading the
    client once the server's socket is full, instead of keeping what the client sends."""
    p = start_pooler(pool_config("tx", pool_size=2), {"workers": workers, **ADMIN})
    with RawConn.for_pooler(p, timeout=60) as raw:
        raw.startup("trust_user", "tx")
        rows, _, _ = raw.query("SELECT pg_backend_pid()")
        pid = int(rows[0][0] or 0)
        raw.query("CREATE TEMP TABLE slow_copy(t text)")  # (pins it to its backend, the one stopped)
        raw.send(message(b"Q", b"COPY slow_copy FROM STDIN\0"))
        assert raw.recv_message()[0] == b"G"
        os.kill(pid, signal.SIGSTOP)
        sent, chunk = 0, message(b"d", (b"z" * 1023 + b"\n") * 64)
        raw.sock.setblocking(False)
        try:
            deadline, rest = time.monotonic() + 3, memoryview(b"")
            while time.monotonic() < deadline and sent < (64 << 20):
                if not rest:
                    rest = memoryview(chunk)  # whole CopyData messages: a partial send continues
                try:
                    n = raw.sock.send(rest)
                except BlockingIOError:
                    time.sleep(0.01)  # the pooler stopped reading: our send buffer is full
                    continue
                sent, rest = sent + n, rest[n:]
            held = _mem(p)["messages_in_flight"]
        finally:
            raw.sock.setblocking(True)
            os.kill(pid, signal.SIGCONT)
        print(f"sent {sent >> 20} MiB while the server was stopped; the pooler held {held} bytes")
        assert sent < (64 << 20)  # it was paused: socket buffers fill, then nothing more is taken
        assert held < (4 << 20)
