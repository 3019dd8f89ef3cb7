"""The faults of the soak run. Each `inject` returns once the fault has cleared (PostgreSQL back,
network forwarding again, worker killed...), with a short note for the report; a fault that does
not clear by itself (the black hole) has a `release`, used once the recovery bound has passed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from helpers import Pooler

from pgdoorman.devcluster import Cluster, wait_for_port

from .load import LONG, NET_FREEZE_S, PG_FREEZE_S
from .proxy import Proxy

USERS = ("trust_user", "md5_user")
@dataclass
class Env:
    pg: Cluster
    proxy: Proxy
    pooler: Pooler


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[Env], Awaitable[str]]
    release: Callable[[Env], Awaitable[str]] | None = None
    xfail_reason: str | None = None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _pg_ctl(pg: Cluster, *args: str) -> None:
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    log = os.path.join(os.path.dirname(pg.datadir), "postgres.log")
    subprocess.run([*as_postgres, pg.tool("pg_ctl"), "-D", pg.datadir, "-w", "-t", "60", *args, "-l", log],
                   check=True, capture_output=True)


def postmaster_pid(pg: Cluster) -> int:
    with open(os.path.join(pg.datadir, "postmaster.pid")) as f:
        return int(f.readline())


def _restart(mode: str) -> Callable[[Env], Awaitable[str]]:
    async def inject(env: Env) -> str:
        old = postmaster_pid(env.pg)
        await asyncio.to_thread(_pg_ctl, env.pg, "-m", mode, "restart")
        await asyncio.to_thread(wait_for_port, env.pg.host, env.pg.port)
        return f"postmaster {old} -> {postmaster_pid(env.pg)}"

    return inject


async def terminate_backends(env: Env) -> str:
    """pg_terminate_backend of a few random backends of the pools' users, five times over ~2 s."""
    users = ", ".join(f"'{u}'" for u in USERS)
    sql = ("SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity"
           f" WHERE usename IN ({users}) ORDER BY random() LIMIT 2) s")
    killed = 0
    for _ in range(10 if LONG else 5):
        killed += int(await asyncio.to_thread(env.pg.psql, sql))
        await asyncio.sleep(0.4)
    return f"{killed} backends terminated"


async def network_cut(env: Env) -> str:
    n = env.proxy.cut()
    await asyncio.sleep(0.3)
    return f"{n + env.proxy.cut()} connections cut"


async def network_freeze(env: Env) -> str:
    n = env.proxy.freeze()
    try:
        await asyncio.sleep(NET_FREEZE_S)
    finally:
        env.proxy.resume()
    return f"{n} connections (and new ones) held {NET_FREEZE_S:g}s"


async def network_blackhole(env: Env) -> str:
    # Clears at once for new connections: a pooler that gives up its silent servers recovers.
    return f"{env.proxy.freeze(existing=True)} connections silenced; new ones pass"


async def blackhole_release(env: Env) -> str:
    # What the kernel would do after ~15 minutes of retransmissions: the dead links close.
    return f"{env.proxy.cut()} silenced connections closed"


async def kill_worker(env: Env) -> str:
    workers = children(env.pooler.proc.pid)
    assert workers, "no worker processes under the acceptor"
    victim = random.choice(workers)
    os.kill(victim, signal.SIGKILL)
    return f"worker pid {victim} of {workers} SIGKILLed"


async def sigstop_postgres(env: Env) -> str:
    """SIGSTOP the postmaster (no new backends), then all its children; SIGCONT in reverse order."""
    pm = postmaster_pid(env.pg)
    os.kill(pm, signal.SIGSTOP)
    stopped = children(pm)
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(PG_FREEZE_S)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        os.kill(pm, signal.SIGCONT)
    return f"postmaster and {len(stopped)} children stopped {PG_FREEZE_S:g}s"


PLAN: tuple[Fault, ...] = (
    Fault("restart_fast", _restart("fast")),
    Fault("restart_immediate", _restart("immediate")),
    Fault("terminate_backends", terminate_backends),
    Fault("network_cut", network_cut),
    Fault("network_freeze", network_freeze),
    Fault("worker_sigkill", kill_worker),
    Fault("postgres_sigstop", sigstop_postgres),
    # Last: whatever it leaves behind is the least likely to blur the other faults' figures.
    Fault("network_blackhole", network_blackhole, blackhole_release),
)
