"""One worker's part of every console command: what it has (a snapshot of plain data the console
merges over all workers) and what it does (PAUSE, KILL, ...). The acceptor sends each request to
every worker (admin/fanout.py); with one process the console calls this directly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import TYPE_CHECKING, Any

from pgdoorman.client import ACTIVE, ClientConn
from pgdoorman.frontend.tls import describe
from pgdoorman.protocol import codes

if TYPE_CHECKING:
    from pgdoorman.app import App
    from pgdoorman.pool import Pool
    from pgdoorman.server import ServerConn

log = logging.getLogger("pgdoorman.admin")
POLL = 0.02  # PAUSE and WAIT_CLOSE look again this often until the servers are released / closed
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _addr(transport: Any, name: str) -> tuple[str, int]:
    try:
        addr = transport.get_extra_info(name)
    except Exception:  # a closing transport
        addr = None
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    return "unix", 0


def _endpoints(transport: Any) -> dict[str, Any]:
    addr, port = _addr(transport, "peername")
    local_addr, local_port = _addr(transport, "sockname")
    return {"addr": addr, "port": port, "local_addr": local_addr, "local_port": local_port}


def _wall(monotonic: float, now: float, wall_now: float) -> float:
    return wall_now - (now - monotonic) if monotonic else 0.0


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class WorkerControl:
    def __init__(self, app: App) -> None:
        self.app = app
        self.started = time.time()

    # --- requests ---

    async def handle(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        db = request.get("db")
        app = self.app
        if op == "snapshot":
            return self.snapshot(set(request.get("what", ())))
        if op == "pause":
            for pool in self._pools(db):
                pool.pause()
            app.paused_dbs.add(db or "")
            while any(pool.lent() for pool in self._pools(db)):
                await asyncio.sleep(POLL)
            return True
        if op == "resume":
            app.paused_dbs.discard(db or "")
            if not db:
                app.paused_dbs.clear()
            for pool in self._pools(db):
                if not app.is_paused(pool.cfg.name):
                    pool.resume()
            return True
        if op == "reconnect":
            for pool in self._pools(db):
                pool.reconnect()
            return True
        if op == "wait_close":
            while any(pool.old_servers() for pool in self._pools(db)):
                await asyncio.sleep(POLL)
            return True
        if op == "kill":
            return self.kill(db)
        if op == "kill_client":
            return self.kill_client(request["id"])
        if op == "disable":
            app.disabled_dbs.add(request["db"])
            return True
        if op == "enable":
            app.disabled_dbs.discard(db)
            return True
        if op == "reload":
            return app.reload_text(request["text"], request["path"])
        if op == "shutdown":
            app.begin_shutdown(request["mode"])
            return True
        if op == "servers":  # an upgrade: what the successor should open before it serves
            return app.server_counts()
        if op == "warm":
            await app.warm(request["servers"], request.get("workers", 1))
            return True
        raise ValueError(f"unknown request {op!r}")

    def _pools(self, db: str | None) -> list[Pool]:
        return [pool for pool in self.app.pools.values() if db is None or pool.cfg.name == db]

    def kill(self, db: str | None) -> int:
        """PgBouncer's KILL: drop the database's clients and servers; it stays paused until RESUME."""
        app = self.app
        app.paused_dbs.add(db or "")
        pools = self._pools(db)
        for pool in pools:
            pool.pause()
        killed = 0
        reason = (
            f'database "{db}" was killed from the admin console (KILL)'
            if db
            else ("all databases were killed from the admin console (KILL)")
        )
        for client in list(app.clients):
            if client.pool is not None and (db is None or client.pool.cfg.name == db):
                client.fatal(codes.ADMIN_SHUTDOWN, f"terminating connection: {reason}")
                killed += 1
        for pool in pools:
            for server in list(pool.servers):
                server.close("KILL from the admin console")
        return killed

    def kill_client(self, client_id: str) -> int:
        for client in list(self.app.clients):
            if client.id == client_id:
                client.fatal(
                    codes.ADMIN_SHUTDOWN,
                    "terminating connection: killed from the admin console (KILL_CLIENT)",
                )
                return 1
        return 0

    # --- snapshot ---

    def live_bytes(self) -> dict[Pool, tuple[int, int]]:
        """What the current clients' sockets carried so far, by pool (ClientConn.traffic)."""
        out: dict[Pool, tuple[int, int]] = {}
        for client in self.app.clients:
            if client.pool is not None:
                received, sent = client.traffic()
                have = out.get(client.pool, (0, 0))
                out[client.pool] = (have[0] + received, have[1] + sent)
        return out

    def snapshot(self, what: set[str]) -> dict[str, Any]:
        app = self.app
        now, wall = time.monotonic(), time.time()
        per_pool: dict[Pool, list[int]] = {pool: [0, 0, 0, 0] for pool in app.pools.values()}
        maxwait: dict[Pool, float] = {}
        clients_rows: list[dict[str, Any]] = []
        logging_in = 0
        for client in app.clients:
            pool = client.pool
            if client.state != ACTIVE:
                logging_in += 1
            if pool is None:
                continue
            counts = per_pool.setdefault(pool, [0, 0, 0, 0])
            received, sent = client.traffic()
            counts[2] += received
            counts[3] += sent
            if client.waiting:
                counts[1] += 1
                wait = now - client.wait_since
                if wait > maxwait.get(pool, 0.0):
                    maxwait[pool] = wait
            elif client.state == ACTIVE:
                counts[0] += 1
            if "clients" in what:
                clients_rows.append(self._client_row(client, now, wall))
        pools = []
        servers_rows: list[dict[str, Any]] = []
        for pool, counts in per_pool.items():
            pools.append(self._pool_entry(pool, counts, maxwait.get(pool, 0.0), now))
            if "servers" in what:
                servers_rows.extend(self._server_row(server, now, wall) for server in pool.servers)
        out: dict[str, Any] = {
            "worker": app.worker,
            "pid": os.getpid(),
            "started": self.started,
            "cpu": cpu_seconds(),
            "rss": rss_bytes(),
            "clients": len(app.clients),
            "logging_in": logging_in,
            "servers": sum(len(pool.servers) for pool in app.pools.values()),
            "pools": pools,
            "paused": sorted(app.paused_dbs),
            "disabled": sorted(app.disabled_dbs),
            "shutting_down": app.shutdown_mode,
            # max_memory_usage (limits.MemoryBudget): held now, its peak, this worker's share, refusals
            "memory": [app.memory.used, app.memory.peak, app.memory.limit, app.memory.refused],
        }
        if "clients" in what:
            out["client_rows"] = clients_rows
        if "servers" in what:
            out["server_rows"] = servers_rows
        if "prepared" in what:
            out["prepared"] = self._prepared()
        return out

    def _pool_entry(self, pool: Pool, counts: list[int], maxwait: float, now: float) -> dict[str, Any]:
        check_delay = pool.general.server_check_delay
        active = idle = used = tested = 0
        idle_set = set(pool.idle)
        for server in pool.servers:
            if server.client is not None:
                active += 1
            elif server in idle_set:
                if check_delay and now - server.last_used > check_delay:
                    used += 1
                else:
                    idle += 1
            else:
                tested += 1  # being reset or checked
        period = pool.period
        return {
            "database": pool.cfg.name,
            "user": pool.user,
            "mode": pool.mode,
            "pool_size": pool.pool_size,
            "min_pool_size": pool.min_pool_size,
            "cl_active": counts[0],
            "cl_waiting": counts[1],
            "cl_pinned": pool.pinned,
            "sv_active": active,
            "sv_idle": idle,
            "sv_used": used,
            "sv_tested": tested,
            "sv_login": pool.connecting,
            "maxwait": maxwait,
            "paused": pool.paused,
            "removed": pool.removed,
            "server_host": pool.cfg.server_host,
            "server_port": pool.cfg.server_port,
            "server_database": pool.server_database,
            "server_user": pool.server_user,
            "totals": pool.totals(live_bytes=(counts[2], counts[3])),
            "period": period.last,
            "period_seconds": period.seconds,
            "maxima": period.maxima,
            "prepared_stats": {
                "client_parses": pool.registry.stats.client_parses,
                "server_parses": pool.registry.stats.server_parses,
                "binds": pool.registry.stats.binds,
                "hits": pool.registry.stats.hits,
                "evictions": pool.registry.stats.evictions,
                "statements": len(pool.registry),
            },
            "listener": pool.listener.stats() if pool.listener is not None else None,
        }

    def _client_row(self, client: ClientConn, now: float, wall: float) -> dict[str, Any]:
        pool = client.pool
        assert pool is not None
        if client.state != ACTIVE:
            state = "login"
        elif client.waiting:
            state = "waiting"
        else:
            state = "active"
        server = client.server
        return {
            "id": client.id,
            "user": client.login_user,
            "database": pool.cfg.name,
            "state": state,
            **_endpoints(client.transport),
            "connect_time": _wall(client.connected_at, now, wall),
            "request_time": _wall(client.last_active, now, wall),
            "wait": now - client.wait_since if client.waiting else 0.0,
            "link": server.id if server is not None else "",
            "remote_pid": server.backend_pid if server is not None else 0,
            "application_name": client.params.get("application_name", ""),
            "tls": describe(client.tls),
            "prepared_statements": len(client.stmts),
            "in_transaction": client.in_transaction,
            "pinned": bool(client.pinned_by()),
            "worker": self.app.worker,
        }

    def _server_row(self, server: ServerConn, now: float, wall: float) -> dict[str, Any]:
        pool = server.pool
        if server.client is not None:
            state = "active"
        elif server in pool.idle:
            state = "idle"
        else:
            state = "tested"  # being reset or checked (server_check_query)
        client = server.client
        return {
            "id": server.id,
            "user": pool.server_user,
            "database": pool.cfg.name,
            "state": state,
            **_endpoints(server.transport),
            "connect_time": _wall(server.created, now, wall),
            "request_time": _wall(server.last_used, now, wall),
            "close_needed": server.generation != pool.generation,
            "link": getattr(client, "id", "") if client is not None else "",
            "remote_pid": server.backend_pid,
            "application_name": server.params.get("application_name", ""),
            "prepared_statements": len(server.statements),
            "worker": self.app.worker,
        }

    def _prepared(self) -> list[dict[str, Any]]:
        """Each pool's shared statements: the query, its server-side name, how many clients hold
        it and which servers have it prepared."""
        rows = []
        for pool in self.app.pools.values():
            holders: dict[int, list[str]] = {}
            for server in pool.servers:
                for stmt in server.statements.all():
                    holders.setdefault(id(stmt), []).append(server.id)
            users: dict[int, int] = {}
            for client in self.app.clients:
                if client.pool is pool:
                    for stmt in client.stmts.values():
                        users[id(stmt)] = users.get(id(stmt), 0) + 1
            for stmt in pool.registry.statements():
                query = stmt.key.split(b"\0", 1)[0].decode("utf-8", "replace")
                rows.append(
                    {
                        "database": pool.cfg.name,
                        "user": pool.user,
                        "query": query,
                        "server_name": stmt.server_name.decode(),
                        "clients": users.get(id(stmt), 0),
                        "servers": holders.get(id(stmt), []),
                        "uses": stmt.uses,
                        "confirmed": stmt.confirmed,
                    }
                )
        return rows
