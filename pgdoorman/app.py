"""Wires config, listeners, pools and cancel keys together; housekeeping; signals; shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time

from pgdoorman.cancel import CancelRegistry
from pgdoorman.client import ACTIVE, ClientConn
from pgdoorman.config import Config
from pgdoorman.pool import Pool
from pgdoorman.protocol import codes

log = logging.getLogger("pgdoorman")
GC_THRESHOLD = 20000
TICK = 0.25  # housekeeping period, seconds: also the precision of query_wait_timeout


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cancels = CancelRegistry()
        self.clients: set[ClientConn] = set()
        self.pools: dict[tuple[str, str], Pool] = {
            (db, user): Pool(pool_cfg, user_cfg, config.general)
            for db, pool_cfg in config.pools.items()
            for user, user_cfg in pool_cfg.users.items()
        }
        self._listeners: list[asyncio.AbstractServer] = []
        self._stopped = asyncio.Event()
        self._tick: asyncio.Task[None] | None = None

    # --- used by clients ---

    def pool_for(self, database: str, user: str) -> Pool | None:
        return self.pools.get((database, user))

    def client_connected(self, client: ClientConn) -> None:
        self.clients.add(client)

    def client_disconnected(self, client: ClientConn) -> None:
        self.clients.discard(client)

    def over_client_limit(self) -> bool:
        return len(self.clients) > self.config.general.max_client_conn

    # --- life cycle ---

    async def start(self) -> None:
        g = self.config.general
        loop = asyncio.get_running_loop()
        for host in g.host:
            server = await loop.create_server(lambda: ClientConn(self), host, g.port,
                                              reuse_address=True, backlog=4096)
            self._listeners.append(server)
            log.info("listening on %s:%d", host, g.port)
        if g.unix_socket_dir:
            path = os.path.join(g.unix_socket_dir, f".s.PGSQL.{g.port}")
            if os.path.exists(path):
                os.unlink(path)
            server = await loop.create_unix_server(lambda: ClientConn(self), path, backlog=4096)
            os.chmod(path, 0o777)
            self._listeners.append(server)
            log.info("listening on unix socket %s", path)
        if g.tcp_keepalive:
            for listener in self._listeners:
                for sock in getattr(listener, "sockets", ()):
                    if sock.family != socket.AF_UNIX:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for pool in self.pools.values():
            pool.maintain()  # opens min_pool_size servers
        self._tick = loop.create_task(self._housekeeping())
        # Start-up objects never become garbage; and the relay allocates a bytes object per read,
        # which with the default threshold (700) would run a young-generation collection every
        # few hundred transactions.
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 20)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)

    async def run_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.stop("pooler shutting down")

    async def stop(self, reason: str) -> None:
        log.info("shutting down: %s", reason)
        for listener in self._listeners:
            listener.close()
        if self._tick is not None:
            self._tick.cancel()
        for client in list(self.clients):
            client.fatal(codes.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        for pool in self.pools.values():
            pool.close_all(reason)
        await asyncio.sleep(0)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                for pool in self.pools.values():
                    pool.maintain()
                self._expire_clients()
            except Exception:  # housekeeping must never die
                log.exception("housekeeping failed")

    def _expire_clients(self) -> None:
        g = self.config.general
        if not (g.client_idle_timeout or g.idle_transaction_timeout):
            return
        now = time.monotonic()
        for client in list(self.clients):
            if client.state != ACTIVE:
                continue
            if client.activity != client.seen_activity:
                client.seen_activity = client.activity
                client.last_active = now
            idle = now - client.last_active
            if client.server is not None and client.server.pending:
                continue  # a query is running: not idle
            if client.in_transaction:
                if g.idle_transaction_timeout and idle > g.idle_transaction_timeout:
                    client.fatal(codes.IDLE_IN_TRANSACTION_TIMEOUT,
                                 "terminating connection due to idle-in-transaction timeout")
            elif g.client_idle_timeout and idle > g.client_idle_timeout:
                client.fatal(codes.IDLE_SESSION_TIMEOUT, "terminating connection due to idle-session timeout")


async def serve(config: Config) -> None:
    app = App(config)
    await app.start()
    await app.run_until_stopped()
