"""Wires config, listeners, pools and cancel keys together; housekeeping; signals; shutdown."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import signal
import socket
import ssl
import struct
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from pgdoorman import channel, ids, prepared, sdnotify
from pgdoorman.admin import coordinate
from pgdoorman.admin.console import AdminConn
from pgdoorman.admin.worker import WorkerControl
from pgdoorman.auth import auth_key
from pgdoorman.auth.jwt import JwtKeyCache
from pgdoorman.auth.lookup import Answer
from pgdoorman.backend.tls import ServerTls, server_tls
from pgdoorman.cancel import CancelRegistry
from pgdoorman.client import ACTIVE, SESSION, ClientConn, arrival_pool
from pgdoorman.config import (
    RESTART_KEYS,
    Config,
    ConfigError,
    UserConfig,
    parse_config,
    pool_keys,
    pool_share,
)
from pgdoorman.frontend.authquery import AuthLookup
from pgdoorman.frontend.tls import ClientTls, client_tls
from pgdoorman.limits import ClientCaps, FailureDelay, MemoryBudget, Refusal
from pgdoorman.listen import Listener, listening_sockets, serve_on
from pgdoorman.logs import set_log_level
from pgdoorman.pool import DbBudget, Pool
from pgdoorman.process.pidfile import write_pidfile
from pgdoorman.process.upgrade import Predecessor, Successor, UpgradeFailed, check_config, refusal
from pgdoorman.protocol import codes
from pgdoorman.server import ServerConn

if TYPE_CHECKING:
    from pgdoorman.metrics.http import MetricsServer

log = logging.getLogger("pgdoorman")
GC_THRESHOLD = 20000
_CLIENT_KINDS = frozenset((channel.NEW_CLIENT, channel.FINAL_CLIENT, channel.MOVED_CLIENT))
_TIMES = struct.Struct("dd")  # a server's accounting clock (metrics/account.py new_times)
TICK = 0.25  # housekeeping period, seconds: also the precision of query_wait_timeout
WARM_TIMEOUT = 5.0  # an upgrade's successor opening servers before READY (App.warm)
CLOSE_NOTE_BATCH = 64  # client closes told to the acceptor at once (or at the next tick)


class App:
    """One event loop's pooler: the whole pooler (one worker), or worker `worker` of `workers`, which
    then gets its clients from the acceptor process over a unix socket instead of listening."""

    def __init__(self, config: Config, worker: int = 0, workers: int = 1, generation: int = 0) -> None:
        self.config = config
        self.generation = generation  # upgrades that led to this process (process/upgrade.py)
        self.tls = ClientTls()  # set by apply_config
        self.server_tls = ServerTls()
        self.jwt_keys = JwtKeyCache()  # re-read when a key file changes; emptied on reload
        self.caps = ClientCaps()  # client caps with one process (with several: the acceptor's)
        self._admits: dict[int, Callable[[Refusal | None], None]] = {}
        self._admit_ids = itertools.count(1)
        self.failures = FailureDelay()
        self.memory = MemoryBudget()  # max_memory_usage: this worker's share (apply_config)
        ids.configure(worker, workers, generation)
        prepared.set_generation(generation)
        self.cancels = CancelRegistry(worker, workers, generation)
        # An upgrade (process/upgrade.py). Old side: handing_over once the successor serves, the
        # clients move at their next idle point, through _successor (one process) or the acceptor.
        self.handing_over = False
        self._successor: Successor | None = None
        self._to_hand_over: set[ClientConn] = set()
        self._hand_over_at = 0.0  # when the drain ends: shutdown_timeout after the start
        self.upgrade_argv: list[str] = []  # how to start the program on disk (cli.py)
        # New side: the old process, while it hands over (cancels for its clients go back to it)
        self.predecessor: Predecessor | None = None
        self.auth_key = b""
        self.clients: set[ClientConn] = set()
        self.consoles: weakref.WeakSet[AdminConn] = weakref.WeakSet()  # admin sessions, told at stop()
        self.pools: dict[tuple[str, str], Pool] = {}
        self.lookups: dict[str, AuthLookup] = {}  # auth_query by database
        self._budgets: dict[str, DbBudget] = {}
        self._pool_list: list[Pool] = []  # by pool index, as the acceptor numbers them
        self.worker = worker
        self.workers = workers
        self._reported_load = False
        self._channel: socket.socket | None = None
        self._outbox: channel.Outbox | None = None
        self._parts = channel.Assembler()
        self._asks: dict[int, asyncio.Future[list[Any]]] = {}  # console requests out to all workers
        self._ask_ids = itertools.count(1)
        self._closed_unreported = 0  # client closes the acceptor has not been told of yet
        self._fd_warned = 0.0
        self._adopting: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Listener] = []
        self._stopped = asyncio.Event()
        self._tick: asyncio.Task[None] | None = None
        self.control = WorkerControl(self)
        self.paused_dbs: set[str] = set()  # PAUSE/KILL: "" stands for every database
        self.disabled_dbs: set[str] = set()
        self.shutdown_mode = ""  # wait_for_clients, wait_for_servers or immediate once shutting down
        self._shutdown_deadline = 0.0
        self._period_at = time.monotonic()
        self._draining: list[Pool] = []  # taken out of the config by a reload, clients still there
        self._metrics: MetricsServer | None = None
        self.apply_config(config)

    def is_paused(self, database: str) -> bool:
        return "" in self.paused_dbs or database in self.paused_dbs

    def apply_config(self, config: Config) -> list[str]:
        """Take a (re)loaded config; returns the changed keys that need a restart."""
        old = self.config
        restart = [key for key in RESTART_KEYS if getattr(old.general, key) != getattr(config.general, key)]
        if old.prometheus != config.prometheus:
            restart.append("prometheus")
        self.config = config
        set_log_level(config.general.log_level)
        self.memory.limit = config.general.max_memory_usage // self.workers
        self.jwt_keys.clear()
        try:  # re-read on every reload: a renewed certificate serves the next connections
            self.tls = client_tls(config.general)
        except (OSError, ssl.SSLError) as exc:  # changed since the loader checked it
            log.error("TLS towards clients: cannot load %s: %s (keeping the previous certificate)",
                      config.general.tls_certificate, exc)
            if old is config:  # starting: nothing to keep
                raise
        try:
            self.server_tls = server_tls(config.general)
        except (OSError, ssl.SSLError) as exc:
            log.error("TLS towards servers: cannot load its files: %s (keeping the previous ones)", exc)
            if old is config:
                raise
        # Salts of mock and plain-password SCRAM exchanges (auth/mock.py): the same in every worker.
        self.auth_key = auth_key(secret for pool in config.pools.values() for user in pool.users.values()
                                 for secret in (user.password, user.server_password) if secret)
        worker, workers = self.worker, self.workers
        keys = pool_keys(config)
        pools: dict[tuple[str, str], Pool] = {}
        for index, (db, user) in enumerate(keys):
            pool_cfg = config.pools[db]
            user_cfg = pool_cfg.users[user]
            size = pool_share(user_cfg.pool_size, index, worker, workers)
            min_size = pool_share(user_cfg.min_pool_size, index, worker, workers)
            if size == 0 and self.tls.enabled:
                # A TLS client cannot be handed to another worker (its session is in this process):
                # every worker keeps a server of a pool smaller than the number of workers.
                size = 1
            pool = self.pools.get((db, user))
            if pool is not None and pool.looked_up:  # now in the config: its own pool from now on
                self._drain(pool, "its user is now in the config")
                pool = None
            if pool is None:
                pool = Pool(pool_cfg, user_cfg, config.general, pool_size=size, min_pool_size=min_size,
                            tls=self.server_tls)
                if self.is_paused(db):
                    pool.pause()
            else:
                pool.configure(pool_cfg, user_cfg, config.general, size, min_size, self.server_tls)
                pool.grow_for_waiters()  # a larger pool_size serves those waiting at once
            pools[(db, user)] = pool
        self._apply_lookups(old, config, pools)
        self._share_budgets(config, pools)
        for key, pool in self.pools.items():
            if key not in pools and not pool.removed:
                self._drain(pool, "no longer in the config")
        self.pools = pools
        self._pool_list = [pools[key] for key in keys]
        return restart

    def _drain(self, pool: Pool, why: str) -> None:
        log.info("%s: %s: takes no new clients, closes when its %d clients have gone", pool.name, why,
                 pool.clients)
        pool.removed = True
        self._draining.append(pool)

    def _apply_lookups(self, old: Config, config: Config, pools: dict[tuple[str, str], Pool]) -> None:
        """auth_query after a (re)load: a database whose lookup is unchanged keeps its lookup
        servers and its users' pools (the cache is emptied: RELOAD is how an operator makes the
        pooler read every secret again); any other change starts again."""
        lookups: dict[str, AuthLookup] = {}
        for db, pool_cfg in config.pools.items():
            if pool_cfg.auth_query is None:
                continue
            lookup = self.lookups.pop(db, None)
            if lookup is not None and lookup.same_as(pool_cfg):
                lookup.cache.clear()
                lookup.pool.configure(replace(lookup.pool.cfg, idle_timeout=pool_cfg.idle_timeout,
                                              query_wait_timeout=pool_cfg.query_wait_timeout),
                                      lookup.pool.user_cfg, config.general, tls=self.server_tls)
            else:
                if lookup is not None:
                    lookup.close("auth_query changed by a reload")
                lookup = AuthLookup(pool_cfg, config.general, self.server_tls)
            lookups[db] = lookup
        for lookup in self.lookups.values():
            lookup.close("auth_query removed by a reload")
        self.lookups = lookups
        for key, pool in self.pools.items():
            if not pool.looked_up or key in pools:
                continue
            db = key[0]
            if db in lookups and db in old.pools and old.pools[db].auth_query == lookups[db].config:
                pool_cfg = config.pools[db]
                pool.configure(pool_cfg, replace(pool.user_cfg, pool_mode=pool_cfg.pool_mode),
                               config.general, pool.pool_size, 0, self.server_tls)
                pools[key] = pool

    def looked_up_pool(self, database: str, user: str, answer: Answer) -> Pool:
        """The pool a user that auth_query found logs in to: its own (pass-through with the secret
        found), or with server_user the one every looked-up user of the database shares."""
        pool_cfg = self.config.pools[database]
        aq = pool_cfg.auth_query
        assert aq is not None
        if aq.server_user:
            name, password, server_password = aq.server_user, "", aq.server_password or None
        else:
            name, password, server_password = user, answer.text, None
        key = (database, name)
        pool = self.pools.get(key)
        if pool is not None and not pool.looked_up:
            return pool  # server_user is a configured user of the database: its pool
        # Every worker holds at least one server of it: the acceptor cannot route by a name the
        # config does not hold, so the user is served wherever it landed.
        size = max(1, pool_share(aq.pool_size, zlib.crc32(name.encode()), self.worker, self.workers))
        user_cfg = UserConfig(username=name, password=password, pool_size=size,
                              pool_mode=pool_cfg.pool_mode, server_username=name,
                              server_password=server_password)
        if pool is None:
            pool = Pool(pool_cfg, user_cfg, self.config.general, tls=self.server_tls)
            pool.looked_up = True
            if self.is_paused(database):
                pool.pause()
            budget = self._budgets.get(database)
            if budget is not None:
                pool.budget = budget
                budget.pools.append(pool)
            self.pools[key] = pool
            log.info("%s: pool made for a user auth_query found (%d servers)", pool.name, size)
        elif pool.user_cfg != user_cfg:  # the secret changed on the server: new logins use it
            pool.configure(pool_cfg, user_cfg, self.config.general, tls=self.server_tls)
        return pool

    def _share_budgets(self, config: Config, pools: dict[tuple[str, str], Pool]) -> None:
        """max_db_connections: one budget per database over its users' pools, this worker's share
        (at least one server, so every worker can serve the database)."""
        total = config.general.max_db_connections
        budgets: dict[str, DbBudget] = {}
        for index, db in enumerate(config.pools):
            share = max(1, pool_share(total, index, self.worker, self.workers)) if total else 0
            budgets[db] = DbBudget(db, share)
        for (db, _user), pool in pools.items():
            pool.budget = budgets[db]
            budgets[db].pools.append(pool)
        self._budgets = budgets

    def reload_text(self, text: str, path: str) -> dict[str, Any]:
        """A worker's part of RELOAD / SET: the acceptor checked the text already."""
        try:
            config = parse_config(text, path)
        except ConfigError as exc:  # cannot happen after the acceptor's check; kept serving
            return {"error": str(exc)}
        return {"restart": self.apply_config(config)}

    # --- used by clients ---

    def pool_for(self, database: str, user: str) -> Pool | None:
        return self.pools.get((database, user))

    def login_refusal(self, database: str) -> tuple[str, str] | None:
        """Why a new client of this database is refused (DISABLE, shutdown), or None."""
        if database in self.disabled_dbs:
            return codes.OBJECT_NOT_IN_PREREQUISITE_STATE, (
                f'database "{database}" is not currently accepting connections (DISABLE)')
        if self.shutdown_mode:
            return codes.CANNOT_CONNECT_NOW, "the database system is shutting down"
        return None

    def admin_login(self, client: ClientConn, startup: dict[str, str], rest: bytes) -> None:
        """A client asked for the console database: it becomes an admin session (admin/console.py)."""
        transport = client.transport
        client.hand_over()
        console = AdminConn(self, startup, client.peer)
        self.consoles.add(console)
        transport.set_protocol(console)
        console.connection_made(transport)
        if rest:
            console.data_received(rest)

    async def ask(self, request: dict[str, Any]) -> list[Any]:
        """Every worker's answer to a console request (this one's alone with one process)."""
        if self._outbox is None:
            return await coordinate.single(self, request)
        request_id = next(self._ask_ids)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._asks[request_id] = future
        self._outbox.put(channel.parts(channel.REQUEST, request_id, request))
        try:
            return await future
        finally:
            self._asks.pop(request_id, None)

    async def answer(self, request: dict[str, Any]) -> Any:
        try:
            return await self.control.handle(request)
        except Exception as exc:
            log.exception("console request %s failed", request.get("op"))
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def _answer_acceptor(self, request_id: int, request: dict[str, Any]) -> None:
        log.debug("worker %d: console request %s", self.worker, request.get("op"))
        result = await self.answer(request)
        if self._outbox is not None:
            self._outbox.put(channel.parts(channel.REPLY, request_id, result))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                if client.cancel_key != (0, 0) and client.cancel_key[1] % self.workers != self.worker:
                    try:
                        channel.send(self._channel, channel.pack(channel.KEY_GONE, client.cancel_key))
                    except OSError:
                        pass  # the acceptor keeps a stale route for a key nobody uses

    def client_moved_out(self, client: ClientConn) -> None:
        """Passed on to another worker: no longer ours, but not gone (the acceptor counts it there)."""
        self.clients.discard(client)

    def caps_on(self) -> bool:
        general = self.config.general
        return bool(general.max_user_client_connections or general.max_db_client_connections)

    def admit_client(self, user: str, database: str, done: Callable[[Refusal | None], None]) -> None:
        """Count an authenticated client against the caps; done(None) if it may stay, else done(why)."""
        general = self.config.general
        if self._outbox is None:
            done(self.caps.admit(user, database, general.max_user_client_connections,
                                 general.max_db_client_connections))
            return
        request_id = next(self._admit_ids)
        self._admits[request_id] = done
        self._outbox.put(iter([channel.pack(channel.ADMIT, (request_id, user, database))]))

    def client_uncounted(self, user: str, database: str) -> None:
        if self._outbox is None:
            self.caps.leave(user, database)
        else:
            self._outbox.put(iter([channel.pack(channel.LEAVE, (user, database))]))

    def over_client_limit(self) -> bool:
        return len(self.clients) > self.config.general.max_client_conn

    # --- life cycle ---

    async def start(self, channel_fd: int | None = None, predecessor: Predecessor | None = None) -> None:
        """predecessor: the old pooler of an upgrade (one process: it passed the listening sockets)."""
        loop = asyncio.get_running_loop()
        # Before listening: a signal must never find the default action (SIGHUP would kill us).
        if channel_fd is None:
            for sig, mode in ((signal.SIGTERM, coordinate.WAIT_FOR_CLIENTS),
                              (signal.SIGINT, coordinate.WAIT_FOR_SERVERS),
                              (signal.SIGQUIT, coordinate.IMMEDIATE)):
                loop.add_signal_handler(sig, self._signalled, mode)
            loop.add_signal_handler(signal.SIGHUP, self._reload_signal)
            loop.add_signal_handler(signal.SIGUSR2, self._upgrade_signal)
        else:  # the acceptor decides, and tells every worker (acceptor.py)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2):
                loop.add_signal_handler(sig, lambda: None)
            loop.add_signal_handler(signal.SIGQUIT, self.begin_shutdown, coordinate.IMMEDIATE)
        if channel_fd is None:
            inherited = predecessor.hello() if predecessor is not None else []
            socks = listening_sockets(self.config.general, inherited)
            self._listeners = await serve_on(socks, lambda: ClientConn(self))
            prometheus = self.config.prometheus
            if prometheus.enabled:
                from pgdoorman.metrics.http import MetricsServer  # (prometheus_client: only when enabled)

                self._metrics = MetricsServer(self.ask, lambda: self.config, lambda: bool(self.shutdown_mode))
                if predecessor is None:
                    await self._metrics.start(prometheus.host, prometheus.port)
                else:  # its port is the old process's until this one is ready
                    self._spawn(self._metrics.start(prometheus.host, prometheus.port, wait=True))
        else:
            self._channel = socket.socket(fileno=channel_fd)
            self._channel.setblocking(False)
            self._outbox = channel.Outbox(self._channel)
            loop.add_reader(channel_fd, self._receive)
            self._outbox.put(iter([channel.pack(channel.STARTED)]))
        for pool in self.pools.values():
            pool.maintain()  # opens min_pool_size servers
        self._tick = loop.create_task(self._housekeeping())
        # Start-up objects never become garbage; and the relay allocates a bytes object per read,
        # which with the default threshold (700) would run a young-generation collection every
        # few hundred transactions.
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, 20, 20)
        if predecessor is not None:  # it stops accepting now, hands its clients over, and exits
            self.predecessor = predecessor
            predecessor.listen(self._moved_in, self._predecessor_gone)
            await self.warm(predecessor.servers)
            write_pidfile(self.config.general.pidfile)
            predecessor.ready()
            log.info("upgrade: serving; the old process hands its clients over")
        elif channel_fd is None:
            sdnotify.notify(f"READY=1\nSTATUS={self.status_line()}\nMAINPID={os.getpid()}")

    def _reload_signal(self) -> None:
        log.info("signal: reload")
        self._spawn(coordinate.single(self, {"op": "reload"}))

    # --- upgrade, old side (one process; with several, the acceptor starts it: acceptor.py) ---

    def _upgrade_signal(self) -> None:
        log.info("signal: upgrade")
        self._spawn(self.upgrade())

    async def upgrade(self) -> dict[str, Any]:
        """SIGUSR2 or UPGRADE with one process: start the program now on disk as the successor and
        hand every client over to it. {"pid": the successor's} or {"error": why}: then this
        pooler serves on as if nothing had happened."""
        why = self.upgrade_refusal()
        if why:
            log.error("upgrade refused: %s", why)
            return {"error": why}
        successor = Successor(self.upgrade_argv, self.generation + 1, self._cancel_from_successor,
                              self._successor_lost, self._moved_in)
        self._successor = successor
        try:
            await check_config(self.upgrade_argv)
            log.info("upgrade: the config passes the new program's check; starting it")
            pid = await successor.start([listener.sock for listener in self._listeners], self.server_counts())
        except UpgradeFailed as exc:
            self._successor = None
            log.error("upgrade failed, serving on: %s", exc)
            return {"error": str(exc)}
        for listener in self._listeners:
            listener.pause()  # the successor accepts on the same sockets from now on (kept: _successor_lost)
        log.info("upgrade: the new process (pid %d) serves; handing %d clients over", pid, len(self.clients))
        self.begin_hand_over()
        return {"pid": pid}

    def server_counts(self) -> dict[str, int]:
        """Servers per transaction or statement pool (session servers move with their clients)."""
        return {pool.name: len(pool.servers) for pool in self.pools.values()
                if pool.servers and pool.mode != SESSION and not pool.looked_up}

    async def warm(self, counts: dict[str, int], workers: int = 1) -> None:
        """Open this worker's share of the servers the old process had (Pool.warm), at most 5 s."""
        by_name = {pool.name: pool for pool in self.pools.values()}
        waits = [pool.warm(-(-count // workers), WARM_TIMEOUT) for name, count in counts.items()
                 if (pool := by_name.get(name)) is not None]
        if waits:
            await asyncio.gather(*waits)
            log.info("upgrade: %d servers open before the hand-over",
                     sum(len(by_name[name].servers) for name in counts if name in by_name))

    def upgrade_refusal(self) -> str:
        return refusal(self._successor is not None or self.handing_over, self.predecessor,
                       bool(self.shutdown_mode))

    def begin_hand_over(self) -> None:
        """Every client moves to the successor at its next idle point; this process ends once none
        is left, or at shutdown_timeout (those still here get 58006)."""
        self.handing_over = True
        timeout = self.config.general.shutdown_timeout
        self._hand_over_at = time.monotonic() + timeout if timeout else 0.0
        for client in self.clients:
            self.hand_over_soon(client)

    def hand_over_soon(self, client: ClientConn) -> None:
        """At the client's idle point (ClientConn.on_ready), once the call that found it is done."""
        if not self._to_hand_over:
            asyncio.get_running_loop().call_soon(self._hand_over_due)
        self._to_hand_over.add(client)

    def _hand_over_due(self) -> None:
        due, self._to_hand_over = self._to_hand_over, set()
        if not self.handing_over:  # (called off meanwhile: _successor_lost)
            return
        for client in due:
            if client.can_hand_over():
                self._hand_over(client)

    def _hand_over(self, client: ClientConn) -> None:
        fds, state = client.hand_over_state()
        if self._successor is not None:
            self._successor.send_client(state, fds)
        elif self._outbox is not None:  # a worker: through the acceptor, which passes it on
            state["to"] = -1
            self._outbox.put_fds(channel.pack(channel.MOVED_CLIENT, state), fds)
        log.debug("%s: handed over to the new process%s", client.id,
                  " with its server" if len(fds) > 1 else "")

    def _hand_over_progress(self) -> None:
        """Each tick while handing over: the clients that became idle meanwhile, idle servers no
        client here needs any more, and the end."""
        for client in list(self.clients):
            if client.can_hand_over():
                self._hand_over(client)
        for pool in self.pools.values():
            if not pool.clients:
                for server in list(pool.idle):
                    server.close("upgrade: its clients have moved to the new process")
        outbox = self._successor.outbox if self._successor is not None else self._outbox
        if not self.clients and not (outbox is not None and len(outbox)):
            log.info("upgrade: every client has been handed over; exiting")
            self._upgraded()
        elif self._hand_over_at and time.monotonic() >= self._hand_over_at:
            log.warning("upgrade: shutdown_timeout reached: %d clients could not be handed over",
                        len(self.clients))
            for client in list(self.clients):
                client.fatal(codes.NOT_HANDED_OVER,
                             "the pooler was upgraded and this connection could not be handed over to the "
                             "new process (TLS, LISTEN, or busy until shutdown_timeout)")
            self._upgraded()

    def _upgraded(self) -> None:
        """The hand-over is over: the successor is the pooler now. (Only now does systemd hear
        of it: a successor dying before this is _successor_lost, and this process serves on.)"""
        successor = self._successor
        if successor is not None:
            if self._metrics is not None:
                self._metrics.close()  # its port is the successor's to bind (it retries until free)
                self._metrics = None
            successor.announce()
        self._stopped.set()

    def _successor_lost(self) -> None:
        """The new process died during the hand-over: the clients it took are gone with it; this
        one takes back the ones not sent yet (_returned_by_successor), and serves on."""
        if not self.handing_over or self._stopped.is_set():
            return
        log.error("upgrade: the new process died during the hand-over; this process serves on "
                  "(%d clients)", len(self.clients))
        self.end_hand_over()
        self._successor = None
        for listener in self._listeners:
            listener.resume()
        write_pidfile(self.config.general.pidfile)

    def end_hand_over(self) -> None:
        self.handing_over = False
        self._to_hand_over.clear()

    def _cancel_from_successor(self, initial: bytes, sock: socket.socket) -> None:
        """A CancelRequest the successor did not know: its client is still here."""
        self._adopt(sock, partial(ClientConn, self, initial, final=True))

    # --- upgrade, new side ---

    def _moved_in(self, packet: bytes, fds: list[int]) -> None:
        """A client (and in session mode its server) the old process handed over; or, on the old
        side, one that was on its way to a successor that died: it stays here after all."""
        self._adopt_moved(channel.unpack(packet), fds)

    def _predecessor_gone(self) -> None:
        self.predecessor = None

    def _adopt_moved(self, state: dict[str, Any], fds: list[int]) -> None:
        client_sock = socket.socket(fileno=fds[0])
        server_sock = socket.socket(fileno=fds[1]) if len(fds) > 1 else None
        for extra in fds[2:]:
            os.close(extra)
        task = asyncio.get_running_loop().create_task(self._connect_moved(state, client_sock, server_sock))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _connect_moved(self, state: dict[str, Any], client_sock: socket.socket,
                             server_sock: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        server: ServerConn | None = None
        if server_sock is not None:
            pool = arrival_pool(self, state)
            if pool is None:
                server_sock.close()  # _arrive tells the client
            else:
                adopted = server = ServerConn.adopted(pool, state["server"])
                try:
                    await loop.connect_accepted_socket(lambda: adopted, server_sock)
                except OSError as exc:
                    log.warning("%s: its server could not be adopted: %s", state["id"], exc)
                    server_sock.close()
                    server = None
                else:
                    pool.servers.add(server)

        def arriving() -> ClientConn:
            client = ClientConn(self, moved=state)
            client.server = server
            return client

        try:
            await loop.connect_accepted_socket(arriving, client_sock)
        except OSError as exc:  # the client went away during the hand-over
            log.info("%s: hand-over failed: %s", state["id"], exc)
            client_sock.close()
            if server is not None:
                server.close("its client went away during the hand-over")
            if self._channel is not None:
                self._closed_unreported += 1

    def _signalled(self, mode: str) -> None:
        """SIGTERM, SIGINT, SIGQUIT (single process): a second SIGTERM or SIGINT is immediate."""
        if self.shutdown_mode and mode != coordinate.IMMEDIATE:
            mode = coordinate.IMMEDIATE
        log.info("signal: shutdown (%s)", mode)
        self.begin_shutdown(mode)

    def healthy(self) -> bool:
        return not (self.shutdown_mode or self.paused_dbs)

    def status_line(self) -> str:
        servers = sum(len(pool.servers) for pool in self.pools.values())
        return f"{len(self.clients)} clients, {servers} servers"

    def begin_shutdown(self, mode: str) -> None:
        """PgBouncer's SHUTDOWN, SHUTDOWN WAIT_FOR_SERVERS, SHUTDOWN WAIT_FOR_CLIENTS; bounded by
        shutdown_timeout, after which the clients still there get FATAL 57P01."""
        if self.shutdown_mode == coordinate.IMMEDIATE:
            return
        first = not self.shutdown_mode
        self.shutdown_mode = mode
        if first:
            if self._channel is None:
                sdnotify.notify("STOPPING=1")
            timeout = self.config.general.shutdown_timeout
            self._shutdown_deadline = time.monotonic() + timeout if timeout else 0.0
            for listener in self._listeners:
                listener.close()  # no new connections (the acceptor stops accepting likewise)
            log.info("shutting down (%s): %d clients, %s", mode, len(self.clients),
                     f"at most {timeout:g}s" if timeout else "no time limit")
        if mode == coordinate.IMMEDIATE:
            self._stopped.set()
            return
        if mode == coordinate.WAIT_FOR_SERVERS:
            # As PAUSE, and the clients waiting for a server are told now.
            for pool in self.pools.values():
                pool.pause()
                pool.fail_waiters("the pooler is shutting down", codes.ADMIN_SHUTDOWN)
        self._shutdown_progress()

    def _shutdown_progress(self) -> None:
        mode = self.shutdown_mode
        if not mode or self._stopped.is_set():
            return
        if self._shutdown_deadline and time.monotonic() >= self._shutdown_deadline:
            log.warning("shutdown_timeout reached: %d clients are cut off", len(self.clients))
            self._stopped.set()
        elif mode == coordinate.WAIT_FOR_CLIENTS and not self.clients:
            self._stopped.set()
        elif mode == coordinate.WAIT_FOR_SERVERS and not any(
                pool.in_transactions() for pool in self.pools.values()):
            self._stopped.set()

    # --- worker side of the channel to the acceptor (see pgdoorman/acceptor.py, channel.py) ---

    def _receive(self) -> None:
        assert self._channel is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds = channel.receive_all(self._channel)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data, fds = b"", []
                log.error("acceptor channel failed: %s", exc)
            fd = fds[0] if fds else None
            if not data:
                log.warning("the acceptor process is gone: stopping")
                loop.remove_reader(self._channel.fileno())
                self._stopped.set()
                return
            kind = data[0]
            if kind == channel.REQUEST or kind == channel.REPLY:
                whole = self._parts.feed(data)
                if whole is not None:
                    request_id, payload = whole
                    if kind == channel.REQUEST:
                        self._spawn(self._answer_acceptor(request_id, payload))
                    else:
                        future = self._asks.get(request_id)
                        if future is not None and not future.done():
                            future.set_result(payload)
            elif kind == channel.ADMITTED:
                request_id, refusal = channel.unpack(data)
                callback = self._admits.pop(request_id, None)
                if callback is not None:
                    callback(None if refusal is None else tuple(refusal))
            elif kind == channel.MOVE_CLIENTS:
                pool_index, count, to = channel.unpack(data)
                self._move_clients(pool_index, count, to)
            elif kind == channel.HAND_OVER and len(data) > 1 and not channel.unpack(data):
                log.info("worker %d: upgrade: called off, serving on", self.worker)
                self.end_hand_over()
            elif kind == channel.HAND_OVER:
                log.info("worker %d: upgrade: handing %d clients over to the new process", self.worker,
                         len(self.clients))
                self.begin_hand_over()
            elif kind == channel.MOVED_CLIENT and fds:
                self._adopt_moved(channel.unpack(data), fds)
            elif fd is None and kind in _CLIENT_KINDS:
                # out of file descriptors here (the kernel dropped the passed one): the client is
                # gone, and the acceptor must stop counting it as ours
                self._closed_unreported += 1
                now = time.monotonic()
                if now - self._fd_warned >= 1.0:
                    self._fd_warned = now
                    log.warning("a client passed by the acceptor was lost: out of file descriptors")
            elif fd is not None:
                for extra in fds[1:]:
                    os.close(extra)
                sock = socket.socket(fileno=fd)
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
        """Give a client that belongs to another worker back to the acceptor (see acceptor.py); one
        process: a CancelRequest for a client still on the old process of an upgrade goes there."""
        if self._channel is None:
            if (cancel_key is None or self.predecessor is None or not self.predecessor.alive
                    or self.cancels.ours(cancel_key[1])):
                return False
            self.predecessor.forward_cancel(initial, client.detach_socket())
            log.info("cancel request passed to the old process of the upgrade")
            return True
        fd = client.detach_socket()
        try:
            message = channel.pack(channel.REROUTE, (initial, database, user, cancel_key))
            channel.send(self._channel, message, fd)
        except OSError as exc:  # detached already: the client is gone either way
            log.info("%s: cannot reroute: %s", client.id, exc)
        finally:
            os.close(fd)
        return True

    def reroute_cancel(self, request: bytes, cancel_key: tuple[int, int]) -> bool:
        """A CancelRequest that came over TLS for a key another worker issued: the TLS socket must
        stay here, so the request goes on over one end of a fresh socket pair."""
        if self._channel is None and (self.predecessor is None or not self.predecessor.alive
                                      or self.cancels.ours(cancel_key[1])):
            return False
        ours, theirs = socket.socketpair()
        try:
            if self._channel is None:
                assert self.predecessor is not None
                self.predecessor.forward_cancel(request, os.dup(theirs.fileno()))
                return True
            message = channel.pack(channel.REROUTE, (request, "", "", cancel_key))
            channel.send(self._channel, message, theirs.fileno())
            log.info("cancel request over TLS passed on to the worker of key %d", cancel_key[1])
        except OSError as exc:
            log.info("cannot pass on a cancel request: %s", exc)
        finally:
            theirs.close()
            ours.close()  # the other worker reads the request from what it was given, not the socket
        return True

    def _move_clients(self, pool_index: int, count: int, to: int) -> None:
        """Pass up to `count` of this pool's most recent waiters to worker `to`, which has servers
        free or shorter waits (the acceptor decides from our LOAD reports)."""
        assert self._channel is not None
        if pool_index >= len(self._pool_list):
            return  # decided on a report from before a reload
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
                self._adopt_moved(state, [fd])
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
        if self._metrics is not None:
            self._metrics.close()
        if self._tick is not None:
            self._tick.cancel()
        for client in list(self.clients):
            client.fatal(codes.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        why = ("the pooler was upgraded: connect again to reach the new process"
               if self.handing_over else "terminating connection due to administrator command")
        for console in list(self.consoles):
            console.end(codes.ADMIN_SHUTDOWN, why)
        for pool in [*self.pools.values(), *self._draining]:
            pool.close_all(reason)
        for lookup in self.lookups.values():
            lookup.close(reason)
        await asyncio.sleep(0)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                for pool in self.pools.values():
                    pool.maintain()
                for lookup in self.lookups.values():
                    lookup.pool.maintain()
                self._drop_unused_pools()
                self._expire_clients()
                self._enforce_timeouts()
                self._report_closed()
                self._report_load()
                self._housekeep_control()
            except Exception:  # housekeeping must never die
                log.exception("housekeeping failed")

    def _drop_unused_pools(self) -> None:
        """A looked-up user's pool goes when it has neither clients nor servers (they close at
        idle_timeout): memory stays bounded by the users active lately, not by every user seen."""
        unused = [key for key, pool in self.pools.items()
                  if pool.looked_up and not pool.clients and not pool.servers and not pool.connecting]
        for key in unused:
            pool = self.pools.pop(key)
            if pool.budget is not None:
                pool.budget.pools.remove(pool)
            log.debug("%s: no clients and no servers: pool dropped", pool.name)

    def _housekeep_control(self) -> None:
        """Stats periods, pools removed by a reload, shutdown progress, the service manager."""
        now = time.monotonic()
        period = self.config.general.stats_period
        if period and now - self._period_at >= period:
            elapsed, self._period_at = now - self._period_at, now
            live = self.control.live_bytes()
            for pool in self.pools.values():
                last = pool.period.roll(pool.stats, pool.totals(live.get(pool, (0, 0))), elapsed)
                if last is not None and self.config.general.log_stats and (last["queries"] or last["waits"]):
                    log.info("stats: %s: %s", pool.name, coordinate.stats_line(last, elapsed))
            if self._channel is None:
                sdnotify.notify(f"STATUS={self.status_line()}")
        for pool in list(self._draining):
            if not pool.clients:
                self._draining.remove(pool)
                pool.close_all("pool removed from the config")
        if self.handing_over and not self._stopped.is_set():
            self._hand_over_progress()
        self._shutdown_progress()

    def _enforce_timeouts(self) -> None:
        """query_timeout and transaction_timeout, PgBouncer's meaning: checked each tick (their
        precision) over lent servers only, from the clock the accounting already keeps per server
        (metrics/account.py times: request start, transaction start)."""
        g = self.config.general
        if not (g.query_timeout or g.transaction_timeout):
            return
        now = time.monotonic()
        for pool in self.pools.values():
            for server in list(pool.servers):
                client = server.client
                if not isinstance(client, ClientConn) or client.state != ACTIVE:
                    continue
                request_at, xact_at = _TIMES.unpack_from(server.times)
                if g.query_timeout and server.pending and request_at and now - request_at > g.query_timeout:
                    self.cancels.cancel_server(server)  # a closed socket does not stop pg_sleep
                    client.fatal(codes.QUERY_CANCELED, f"canceling statement due to query_timeout "
                                 f"({g.query_timeout:g}s): the connection ends")
                elif g.transaction_timeout and xact_at and now - xact_at > g.transaction_timeout:
                    client.fatal(codes.TRANSACTION_TIMEOUT,
                                 "terminating connection due to transaction timeout")

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


async def serve(config: Config, worker: int = 0, workers: int = 1, channel_fd: int | None = None,
                generation: int = 0, upgrade_fd: int | None = None,
                upgrade_argv: list[str] | None = None) -> None:
    """upgrade_fd: the link to the old pooler this one takes over from (process/upgrade.py)."""
    app = App(config, worker, workers, generation)
    app.upgrade_argv = upgrade_argv or []
    await app.start(channel_fd, Predecessor(upgrade_fd) if upgrade_fd is not None else None)
    await app.run_until_stopped()
