"""Wires config, listeners, pools and cancel keys together; housekeeping; signals; shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from functools import partial

from pgdoorman import channel, ids
from pgdoorman.auth import auth_key
from pgdoorman.cancel import CancelRegistry
from pgdoorman.client import ACTIVE, ClientConn
from pgdoorman.config import Config, pool_keys, pool_share
from pgdoorman.listen import listening_sockets, serve_on
from pgdoorman.pool import Pool
from pgdoorman.protocol import codes

log = logging.getLogger("pgdoorman")
GC_THRESHOLD = 20000
TICK = 0.25  # housekeeping period, seconds: also the precision of query_wait_timeout
CLOSE_NOTE_BATCH = 64  # client closes told to the acceptor at once (or at the next tick)


class App:
    """One event loop's pooler: the whole pooler (one worker), or worker `worker` of `workers`, which
    then gets its clients from the acceptor process over a unix socket instead of listening."""

    def __init__(self, config: Config, worker: int = 0, workers: int = 1) -> None:
        self.config = config
        ids.configure(worker, workers)
        self.cancels = CancelRegistry(worker, workers)
        # Salts of mock and plain-password SCRAM exchanges (auth/mock.py): the same in every worker.
        self.auth_key = auth_key(secret for pool in config.pools.values() for user in pool.users.values()
                                 for secret in (user.password, user.server_password) if secret)
        self.clients: set[ClientConn] = set()
        self.pools: dict[tuple[str, str], Pool] = {}
        for index, (db, user) in enumerate(pool_keys(config)):
            pool_cfg = config.pools[db]
            user_cfg = pool_cfg.users[user]
            self.pools[(db, user)] = Pool(
                pool_cfg, user_cfg, config.general,
                pool_size=pool_share(user_cfg.pool_size, index, worker, workers),
                min_pool_size=pool_share(user_cfg.min_pool_size, index, worker, workers))
        self._pool_list = list(self.pools.values())  # by pool index, as the acceptor numbers them
        self._worker = worker
        self._workers = workers
        self._reported_load = False
        self._channel: socket.socket | None = None
        self._closed_unreported = 0  # client closes the acceptor has not been told of yet
        self._adopting: set[asyncio.Task[None]] = set()
        self._listeners: list[asyncio.AbstractServer] = []
        self._stopped = asyncio.Event()
        self._tick: asyncio.Task[None] | None = None

    # --- used by clients ---

    def pool_for(self, database: str, user: str) -> Pool | None:
        return self.pools.get((database, user))

    def client_connected(self, client: ClientConn) -> None:
        self.clients.add(client)

    def client_disconnected(self, client: ClientConn) -> None:
        if client in self.clients:
            self.clients.remove(client)
            if self._channel is not None:
                self._closed_unreported += 1
                if self._closed_unreported >= CLOSE_NOTE_BATCH:
                    self._report_closed()  # else on the next tick: one message, one wake-up
                # A key another worker issued: the client moved here ((0, 0): it never logged in).
                if client.cancel_key != (0, 0) and client.cancel_key[1] % self._workers != self._worker:
                    try:
                        channel.send(self._channel, channel.pack(channel.KEY_GONE, client.cancel_key))
                    except OSError:
                        pass  # the acceptor keeps a stale route for a key nobody uses

    def client_moved_out(self, client: ClientConn) -> None:
        """Passed on to another worker: no longer ours, but not gone (the acceptor counts it there)."""
        self.clients.discard(client)

    def over_client_limit(self) -> bool:
        return len(self.clients) > self.config.general.max_client_conn

    # --- life cycle ---

    async def start(self, channel_fd: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        if channel_fd is None:
            socks = listening_sockets(self.config.general)
            self._listeners = await serve_on(socks, lambda: ClientConn(self))
        else:
            self._channel = socket.socket(fileno=channel_fd)
            self._channel.setblocking(False)
            loop.add_reader(channel_fd, self._receive)
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

    # --- worker side of the channel to the acceptor (see pgdoorman/acceptor.py, channel.py) ---

    def _receive(self) -> None:
        assert self._channel is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fd = channel.receive(self._channel)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data, fd = b"", None
                log.error("acceptor channel failed: %s", exc)
            if not data:
                log.warning("the acceptor process is gone: stopping")
                loop.remove_reader(self._channel.fileno())
                self._stopped.set()
                return
            kind = data[0]
            if kind == channel.MOVE_CLIENTS:
                pool_index, count, to = channel.unpack(data)
                self._move_clients(pool_index, count, to)
            elif fd is not None:
                sock = socket.socket(fileno=fd)
                if kind == channel.MOVED_CLIENT:
                    self._adopt(sock, partial(ClientConn, self, moved=channel.unpack(data)))
                else:
                    self._adopt(sock, partial(ClientConn, self, data[1:], final=kind == channel.FINAL_CLIENT))

    def _adopt(self, sock: socket.socket, factory: Callable[[], ClientConn]) -> None:
        task = asyncio.get_running_loop().create_task(self._connect_socket(sock, factory))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _connect_socket(self, sock: socket.socket, factory: Callable[[], ClientConn]) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(factory, sock)
        except OSError as exc:  # the client went away during the hand-over
            log.info("client hand-over failed: %s", exc)
            sock.close()
            self._closed_unreported += 1  # told at the next tick, like every close

    def reroute(self, client: ClientConn, initial: bytes, database: str, user: str,
                cancel_key: tuple[int, int] | None) -> bool:
        """Give a client that belongs to another worker back to the acceptor (see acceptor.py)."""
        if self._channel is None:
            return False
        fd = client.detach_socket()
        try:
            message = channel.pack(channel.REROUTE, (initial, database, user, cancel_key))
            channel.send(self._channel, message, fd)
        except OSError as exc:  # detached already: the client is gone either way
            log.info("%s: cannot reroute: %s", client.id, exc)
        finally:
            os.close(fd)
        return True

    def _move_clients(self, pool_index: int, count: int, to: int) -> None:
        """Pass up to `count` of this pool's most recent waiters to worker `to`, which has servers
        free or shorter waits (the acceptor decides from our LOAD reports)."""
        assert self._channel is not None
        pool = self._pool_list[pool_index]
        moving = [c for c in reversed(pool.waiters) if isinstance(c, ClientConn) and c.movable()][:count]
        moved = 0
        for client in moving:
            fd, state = client.detach()
            state["to"] = to
            try:
                channel.send(self._channel, channel.pack(channel.MOVED_CLIENT, state), fd)
            except OSError as exc:  # channel full or gone: the client stays here after all
                log.info("%s: not moved to worker %d: %s", client.id, to, exc)
                self._adopt(socket.socket(fileno=fd), partial(ClientConn, self, moved=state))
                continue
            os.close(fd)
            moved += 1
            log.debug("%s: %s moved to worker %d", client.id, client.peer, to)
        if moved:
            log.info("%s: %d waiting client%s moved to worker %d", pool.name, moved,
                     "s" if moved > 1 else "", to)

    def _report_load(self) -> None:
        """Each tick, while any pool has clients (and once after), tell the acceptor how they wait."""
        if self._channel is None:
            return
        now = time.monotonic()
        loads = [(i, *pool.load(now)) for i, pool in enumerate(self._pool_list) if pool.clients]
        if loads or self._reported_load:
            try:
                channel.send(self._channel, channel.pack(channel.LOAD, loads))
            except OSError:
                return
        self._reported_load = bool(loads)

    def _report_closed(self) -> None:
        """Tell the acceptor how many of its clients have gone (it balances and counts by that)."""
        if not self._closed_unreported or self._channel is None:
            return
        count = min(self._closed_unreported, channel.MAX_MESSAGE)
        try:
            channel.send(self._channel, bytes((channel.CLIENTS_GONE,)) * count)
        except (BlockingIOError, InterruptedError):
            return  # retried on the next close or housekeeping tick
        except OSError:
            self._closed_unreported = 0
            return
        self._closed_unreported -= count

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
                self._report_closed()
                self._report_load()
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


async def serve(config: Config, worker: int = 0, workers: int = 1, channel_fd: int | None = None) -> None:
    app = App(config, worker, workers)
    await app.start(channel_fd)
    await app.run_until_stopped()
