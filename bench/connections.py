"""Many idle connections held against pgdoorman: how many workers it takes, RSS per connection, and
whether a normal client is still answered.

    python -m bench.connections                         # 50,000 connections, 10,000 of them logged in
    python -m bench.connections --clients 10000 --logged-in 2000

It starts its own PostgreSQL (pgdoorman.devcluster) and pooler. A process may hold at most its hard
RLIMIT_NOFILE of descriptors (20,000 on the 2-core machine), so the pooler gets enough workers for its
share of the clients to fit, and the clients are spread over several client processes. Each loopback
source address (127.0.0.1, 127.0.0.2, ...) has about 28,000 ephemeral ports towards one server port,
so the clients use several.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection

from bench import procstats
from pgdoorman.config import render_config
from pgdoorman.devcluster import Cluster, Role, free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = DATABASE = "bench"
PROTOCOL_V3 = 196608
SPARE_FDS = 300  # per process: listeners, servers, loop, logs, and slack
PORTS_PER_SOURCE = 20000  # of the ~28,000 ephemeral ports, leaving room for TIME_WAIT and others
CONNECT_BATCH = 500  # connections in flight per client process (the listen backlog is 4096)
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # pick the port at connect()


def hard_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def startup_message() -> bytes:
    body = struct.pack("!I", PROTOCOL_V3)
    for key, value in (("user", USER), ("database", DATABASE), ("application_name", "bench-connections")):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


# --- client processes ---

async def _open(host: str, port: int, source: str, login: bool, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            if login:
                await loop.sock_sendall(sock, startup_message())
                buf = b""
                while True:  # trust: AuthenticationOk ... ReadyForQuery
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        raise ConnectionError("closed during login")
                    buf += chunk
                    while len(buf) >= 5:
                        length = struct.unpack("!I", buf[1:5])[0]
                        if len(buf) < 1 + length:
                            break
                        kind, buf = buf[:1], buf[1 + length:]
                        if kind == b"E":
                            raise ConnectionError("ErrorResponse during login")
                        if kind == b"Z":
                            return sock
        return sock
    except BaseException:
        sock.close()
        raise


async def _hold(host: str, port: int, phases: list[list[tuple[str, bool]]], pipe: Connection) -> None:
    """Open each phase's connections, report, and wait for the word to go on (the last: to close)."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    for jobs in phases:
        errors: Counter[str] = Counter()
        opened = 0
        for at in range(0, len(jobs), CONNECT_BATCH):
            batch = jobs[at:at + CONNECT_BATCH]
            results = await asyncio.gather(*(_open(host, port, src, login, 60) for src, login in batch),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, socket.socket):
                    held.append(result)
                    opened += 1
                else:
                    errors[f"{type(result).__name__}: {result}"[:120]] += 1
        pipe.send((opened, dict(errors)))
        await loop.run_in_executor(None, pipe.recv)
    for sock in held:
        sock.close()
    pipe.send("closed")


def client_process(host: str, port: int, phases: list[list[tuple[str, bool]]], pipe: Connection) -> None:
    hard_nofile()
    asyncio.run(_hold(host, port, phases, pipe))


# --- the pooler ---

def start_pooler(workdir: str, server: Cluster, clients: int, workers: int) -> tuple[subprocess.Popen[bytes],
                                                                                          int, str]:
    port = free_port("127.0.0.1")
    config = render_config({
        "general": {
            "host": "127.0.0.1", "port": port, "unix_socket_dir": "", "workers": workers,
            "max_client_conn": clients + 100, "client_login_timeout": 0,  # the idle ones never log in
            "log_client_connections": False, "log_client_disconnections": False, "log_level": "info",
        },
        "pools": {DATABASE: {"server_host": server.host, "server_port": server.port,
                             "server_database": DATABASE, "pool_mode": "transaction",
                             "users": [{"username": USER, "password": "", "pool_size": 20}]}},
    })
    path = os.path.join(workdir, "connections.toml")
    with open(path, "w") as f:
        f.write(config)
    log_path = os.path.join(workdir, "pgdoorman.log")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pgdoorman", "-c", path], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"pgdoorman did not start: {open(log_path).read()[-2000:]}")
        workers_up = len(procstats.tree(proc.pid)) - 1 >= (workers if workers > 1 else 0)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if workers_up:
                    break
        except OSError:
            pass
        time.sleep(0.1)
    time.sleep(1.0)  # the workers import and connect their min servers
    return proc, port, log_path


def sockets_of(pid: int) -> int:
    try:
        return sum(1 for fd in os.listdir(f"/proc/{pid}/fd")
                   if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
    except OSError:
        return 0


def normal_client(port: int, application_name: str = "") -> str:
    import psycopg

    t0 = time.monotonic()
    try:
        dsn = (f"host=127.0.0.1 port={port} dbname={DATABASE} user={USER} sslmode=disable connect_timeout=10"
               f" application_name='{application_name}'")
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            value = conn.execute("SELECT 42").fetchone()
        return f"answered {value} in {(time.monotonic() - t0) * 1000:.0f} ms (connect + login + query)"
    except Exception as exc:  # noqa: BLE001 - the answer to "is it still answered" is the report
        return f"NOT answered: {type(exc).__name__}: {exc}"


def warm_up(port: int, count: int) -> None:
    import psycopg

    dsn = (f"host=127.0.0.1 port={port} dbname={DATABASE} user={USER} sslmode=disable connect_timeout=10"
           " application_name='bench-connections'")
    conns = [psycopg.connect(dsn, autocommit=True, prepare_threshold=None) for _ in range(count)]
    for conn in conns:
        conn.execute("SELECT 1")
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=50_000, help="connections held (default 50,000)")
    p.add_argument("--logged-in", type=int, default=10_000, help="of which logged in (default 10,000)")
    p.add_argument("--workers", type=int, default=0, help="pooler workers (default: as many as needed)")
    args = p.parse_args(argv)
    limit = hard_nofile()
    per_process = limit - SPARE_FDS
    # The acceptor gives each new client to the worker with the fewest: they share alike.
    workers = args.workers or max(1, math.ceil(args.clients / per_process))
    sources = [f"127.0.0.{i + 1}" for i in range(math.ceil(args.clients / PORTS_PER_SOURCE))]
    procs = max(1, math.ceil(args.clients / per_process))
    idle = args.clients - args.logged_in
    phases = [[(sources[i % len(sources)], False) for i in range(idle)],
              [(sources[i % len(sources)], True) for i in range(idle, args.clients)]]
    print(f"{args.clients} connections ({args.logged_in} logged in), hard RLIMIT_NOFILE {limit}: "
          f"{workers} pooler worker{'s' if workers > 1 else ''}, {procs} client processes, sources "
          f"{', '.join(sources)}", flush=True)

    server = Cluster(roles=[Role(USER, None, "trust")], databases=[DATABASE],
                     settings={"max_connections": "200"})
    server.start()
    workdir = tempfile.mkdtemp(prefix="pgdoorman-bench-connections-")
    pooler, port, log_path = start_pooler(workdir, server, args.clients, workers)
    children: list[tuple[multiprocessing.context.ForkProcess, Connection]] = []
    try:
        pids = procstats.tree(pooler.pid)
        rss_before = procstats.rss_bytes(pids)
        sockets_before = {pid: sockets_of(pid) for pid in pids}
        # One login first: a burst of logins that all wait for the pool's first server recurses
        # (Pool.release -> ClientConn.assign -> Pool.release ...: RecursionError past ~300 waiters).
        warm_up(port, 2 * workers)  # held at once: the acceptor gives them to every worker
        context = multiprocessing.get_context("fork")
        for i in range(procs):
            ours, theirs = context.Pipe()
            share = [jobs[i::procs] for jobs in phases]
            child = context.Process(target=client_process, args=("127.0.0.1", port, share, theirs))
            child.start()
            children.append((child, ours))
        held, rss = 0, rss_before
        for what in ("idle, not logged in", "logged in and idle"):
            t0 = time.monotonic()
            errors: Counter[str] = Counter()
            opened = 0
            for _child, pipe in children:
                n, errs = pipe.recv()
                opened += n
                errors.update(errs)
            took = time.monotonic() - t0
            time.sleep(2.0)  # the last hand-overs and logins settle
            pids = procstats.tree(pooler.pid)
            rss, rss_phase = procstats.rss_bytes(pids), rss
            held += opened
            print(f"{opened} connections {what} opened in {took:.1f}s (failed: {dict(errors) or 0}): "
                  f"{(rss - rss_phase) / max(opened, 1) / 1024:.1f} KiB of pooler RSS each")
            if what.startswith("idle"):
                for _child, pipe in children:
                    pipe.send("go on")
        print(f"held {held} connections; pooler RSS {rss_before / 2**20:.0f} MiB -> {rss / 2**20:.0f} MiB: "
              f"{(rss - rss_before) / max(held, 1) / 1024:.1f} KiB per connection")
        for pid in pids:
            role = "acceptor" if pid == pooler.pid and len(pids) > 1 else "worker"
            print(f"  {role} pid {pid}: {sockets_of(pid) - sockets_before.get(pid, 0)} client sockets, "
                  f"RSS {procstats.rss_bytes([pid]) / 2**20:.0f} MiB")
        print(f"a normal client: {normal_client(port)}", flush=True)
        for _child, pipe in children:
            pipe.send("close")
        for _child, pipe in children:
            pipe.recv()
        problems = [line for line in open(log_path) if " ERROR " in line or "Traceback" in line]
        first = f", first: {problems[0].strip()}" if problems else ""
        print(f"pooler log: {len(problems)} error lines{first}")
    finally:
        for child, _pipe in children:
            child.join(10)
            if child.is_alive():
                child.kill()
        for pid in reversed(procstats.tree(pooler.pid)):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        try:
            pooler.wait(15)
        except subprocess.TimeoutExpired:
            pooler.kill()
        server.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
