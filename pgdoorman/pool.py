"""A pool of server connections for one (database, user): LIFO reuse, FIFO waiters, limits, timeouts."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from pgdoorman.auth import parse_secret
from pgdoorman.backend.tls import ServerTls, server_tls
from pgdoorman.channel import Load
from pgdoorman.config import GeneralConfig, PoolConfig, UserConfig
from pgdoorman.metrics.stats import PeriodStats, PoolStats
from pgdoorman.prepared import Registry
from pgdoorman.protocol import codes
from pgdoorman.protocol.state import STATUS_IDLE
from pgdoorman.server import ServerConn, ServerError

if TYPE_CHECKING:
    from pgdoorman.frontend.notify import Listener
    from pgdoorman.frontend.settings import Welcome

log = logging.getLogger("pgdoorman.pool")

RECONNECTING = "reconnect requested (RECONNECT, or its address or login changed)"


class Waiter(Protocol):
    """A client waiting for a server."""

    waiting: bool
    wait_since: float

    def assign(self, server: ServerConn) -> None: ...
    def wait_failed(self, message: str, code: str) -> None: ...


class DbBudget:
    """max_db_connections: this worker's share of a database's servers, over all its users' pools."""

    __slots__ = ("database", "limit", "pools")

    def __init__(self, database: str, limit: int) -> None:
        self.database = database
        self.limit = limit  # 0: no limit
        self.pools: list[Pool] = []

    def room(self) -> int:
        if not self.limit:
            return 1 << 30
        return self.limit - sum(len(p.servers) + p.connecting for p in self.pools)

    def full(self) -> bool:
        return bool(self.limit) and self.room() <= 0

    def make_room(self, wanting: Pool) -> bool:
        """Close an idle server of another pool of the database that nobody waits for (PgBouncer
        does the same): its place goes to `wanting` when it has closed."""
        for pool in self.pools:
            if pool is not wanting and pool.idle and not pool.waiters:
                pool.idle[0].close(f"max_db_connections ({self.limit}) reached: its place goes to "
                                   f"{wanting.name}")
                return True
        return False

    def freed(self) -> None:
        for pool in self.pools:
            if pool.waiters and not pool.paused:
                pool.grow_for_waiters()


class Pool:
    # Slots: an instance dict of more than 30 keys loses CPython's inline values, and every
    # attribute read on the lend path (idle, waiters, cfg, ...) then becomes a dict lookup.
    __slots__ = (
        "_closing", "_retry_at", "_server_side", "application_name", "cfg", "clients", "connecting",
        "general", "generation", "idle", "listener", "min_pool_size", "mode", "name", "paused", "period",
        "pinned", "pool_size", "prepared_cache_size", "prepared_enabled", "registry", "removed", "served",
        "server_database", "server_params", "server_password", "server_password_is_md5", "server_user",
        "servers", "stats", "tls", "user", "user_cfg", "waited", "waiters", "welcomes",
        "passthrough", "scram_keys", "budget", "looked_up", "_releasing", "_released_later",
    )

    def __init__(self, pool_cfg: PoolConfig, user_cfg: UserConfig, general: GeneralConfig,
                 pool_size: int | None = None, min_pool_size: int | None = None,
                 tls: ServerTls | None = None) -> None:
        """pool_size / min_pool_size: this worker's share of the configured limits (default: all);
        tls: the worker's TLS towards servers (default: built from general)."""
        self.user = user_cfg.username
        self.name = f"{pool_cfg.name}/{user_cfg.username}"
        # release() re-entered from a waiter's assign() (a login hands its server straight back)
        # queues the server for the outer call: a storm of waiting logins is a loop, not a recursion
        self._releasing = False
        self._released_later: deque[ServerConn] = deque()
        self.generation = 0
        self.configure(pool_cfg, user_cfg, general, pool_size, min_pool_size, tls)
        self.registry = Registry(max(self.prepared_cache_size, 1))
        self.idle: list[ServerConn] = []
        self.waiters: deque[Waiter] = deque()
        self.servers: set[ServerConn] = set()
        self.clients = 0  # logged-in (or logging-in) clients of this pool in this process
        self.pinned = 0  # of them, clients pinned to their server (frontend/pins.py; cl_pinned)
        self.listener: Listener | None = None  # LISTEN/NOTIFY fan-out, made at the first LISTEN
        self.budget: DbBudget | None = None  # max_db_connections, shared with the database's pools
        self.served = 0  # clients that waited and then got a server, since load() last ran
        self.waited = 0.0  # their total wait, seconds
        self.connecting = 0
        self.server_params: dict[str, str] | None = None
        # the clients' login replies by their startup settings (frontend/settings.py)
        self.welcomes: dict[tuple[tuple[str, str], ...], Welcome] = {}
        self._retry_at = 0.0
        self._closing = False
        self.stats = PoolStats()
        self.period = PeriodStats()
        # Console control (admin/worker.py): PAUSE lends no server until RESUME; RECONNECT and a
        # reload that changes the server's address or login bump generation, and servers of an
        # older one are closed instead of lent again; a pool taken out of the config by a reload
        # takes no new clients and goes once its clients have.
        self.paused = False
        self.removed = False
        self.looked_up = False  # made for users that auth_query found (frontend/authquery.py)

    def configure(self, pool_cfg: PoolConfig, user_cfg: UserConfig, general: GeneralConfig,
                  pool_size: int | None = None, min_pool_size: int | None = None,
                  tls: ServerTls | None = None) -> None:
        """Take the (re)loaded config: sizes and timeouts apply at once; a changed server address
        or login replaces the servers as they are released (the clients keep their own mode)."""
        server_side = getattr(self, "_server_side", None)  # None: the first configure
        self.cfg = pool_cfg
        self.user_cfg = user_cfg
        self.general = general
        self.tls = server_tls(general) if tls is None else tls
        self.mode = user_cfg.pool_mode
        self.pool_size = user_cfg.pool_size if pool_size is None else pool_size
        self.min_pool_size = user_cfg.min_pool_size if min_pool_size is None else min_pool_size
        self.server_user = user_cfg.server_username
        self.server_database = pool_cfg.server_database
        self.application_name = pool_cfg.application_name
        password = user_cfg.server_password
        # SCRAM pass-through (as PgBouncer): the pooler holds only the user's verifier, and logs in
        # to PostgreSQL with the ClientKey recovered from a client's proof (ScramServer.client_key).
        # The server's verifier must be the same one: same salt and iteration count.
        passthrough = None
        if password is None:
            client_secret = parse_secret(user_cfg.password, user_cfg.username)
            if client_secret.kind == "plain":
                password = client_secret.plain
            elif client_secret.kind == "md5" and self.server_user == self.user:
                password = client_secret.md5  # an md5 hash is all md5 server auth needs
            elif client_secret.kind == "scram" and self.server_user == self.user:
                passthrough = client_secret.scram
        if passthrough != getattr(self, "passthrough", None):
            self.scram_keys: tuple[bytes, bytes] | None = None  # (ClientKey, ServerKey) once a client proved
        self.passthrough = passthrough
        self.server_password = password
        self.server_password_is_md5 = (
            password is not None and parse_secret(password, self.server_user).kind == "md5")
        self.prepared_enabled = general.prepared_statements and pool_cfg.prepared_statements_cache_size > 0
        self.prepared_cache_size = pool_cfg.prepared_statements_cache_size
        self._server_side = (pool_cfg.server_host, pool_cfg.server_port, pool_cfg.server_database,
                             self.server_user, password, self.application_name, pool_cfg.connect_query,
                             general.server_tls_mode, general.server_tls_ca_file,
                             general.server_tls_certificate, general.server_channel_binding)
        if server_side is not None and server_side != self._server_side:
            log.info("%s: server address or login changed: servers are replaced as they are released",
                     self.name)
            self.reconnect()
            self.server_params = None
            self.welcomes = {}

    # --- lending ---

    def acquire(self, client: Waiter, since: float = 0.0) -> ServerConn | None:
        """An idle server now, or None with the client queued (it gets assign() or wait_failed()).

        since: when a client moved from another worker started waiting there; it is queued as if it
        had been waiting here since then (clients must not pay for a move with a second wait)."""
        idle = self.idle
        while idle and not self.paused:
            server = idle.pop()
            if not server.closed:
                self.stats.at_once += 1  # lent without a wait
                return server
        self._queue(client, since)
        return None

    def _queue(self, client: Waiter, since: float) -> None:
        client.waiting = True
        waiters = self.waiters
        if since:
            client.wait_since = since
            at = len(waiters)
            while at and waiters[at - 1].wait_since > since:
                at -= 1
            waiters.insert(at, client)
        else:
            client.wait_since = time.monotonic()
            waiters.append(client)
        if len(self.servers) + self.connecting < self.pool_size and not self.paused:
            self._grow()

    def load(self, now: float) -> Load:
        """This pool's LOAD report entry (see channel.Load); with nobody served since the last
        call, the mean wait is the oldest waiter's."""
        oldest = 0.0
        for client in self.waiters:
            if client.waiting:
                oldest = now - client.wait_since
                break
        free = len(self.idle) + max(0, self.pool_size - len(self.servers) - self.connecting)
        mean = self.waited / self.served if self.served else oldest
        self.waited, self.served = 0.0, 0
        return self.clients, len(self.waiters), oldest, free, mean

    def cancel_wait(self, client: Waiter) -> None:
        if client.waiting:
            client.waiting = False
            try:
                self.waiters.remove(client)
            except ValueError:
                pass

    def release(self, server: ServerConn) -> None:
        """Take a server back; it is lent again only if idle with nothing owed."""
        server.client = None
        if server.closed:
            return
        if server.cancels_in_flight:
            server.parked = True  # the cancel's completion calls release() again
            return
        if (server.pending or server.status != STATUS_IDLE or server.unsynced or server.copy_in
                or server.doubt):  # not server.reusable(), inlined: once per transaction
            server.close(server.doubt or "released while not idle")
            return
        lifetime = self.cfg.server_lifetime
        if lifetime and server.last_used - server.created > lifetime:  # last_used: just now
            server.close("server lifetime reached")
            return
        if not self.waiters or self.paused:
            self.idle.append(server)
            return
        if self._releasing:
            # Re-entered from a waiter's assign() (a login hands its server straight back): the
            # outer call lends it next, so a storm of waiting logins is a loop, not a recursion.
            self._released_later.append(server)
            return
        self._releasing = True
        try:
            while self.waiters and not self.paused:  # _lend(server), inlined: once per transaction
                client = self.waiters.popleft()
                if client.waiting:
                    client.waiting = False
                    self.served += 1
                    waited = server.last_used - client.wait_since  # last_used: just now
                    self.waited += waited
                    self.stats.waited(waited)
                    client.assign(server)
                    break
            else:
                self.idle.append(server)
            later = self._released_later
            while later:
                self._lend(later.popleft())
        finally:
            self._releasing = False

    def _lend(self, server: ServerConn) -> None:
        """A checked server to the first client still waiting, else to the idle list."""
        while self.waiters and not self.paused:
            client = self.waiters.popleft()
            if client.waiting:
                client.waiting = False
                self.served += 1
                waited = server.last_used - client.wait_since  # last_used: just now
                self.waited += waited
                self.stats.waited(waited)
                client.assign(server)
                return
        self.idle.append(server)

    # --- console control and server checks ---

    def totals(self, live_bytes: tuple[int, int] = (0, 0)) -> dict[str, Any]:
        """The pool's counters as plain data (metrics/stats.py), prepared statements' included;
        live_bytes: what its current clients' sockets carried so far (ClientConn.traffic)."""
        out = self.stats.totals()
        out["received"] += live_bytes[0]
        out["sent"] += live_bytes[1]
        prepared = self.registry.stats
        out["client_parses"] = prepared.client_parses
        out["server_parses"] = prepared.server_parses
        out["binds"] = prepared.binds
        out["prepared_hits"] = prepared.hits
        out["prepared_evictions"] = prepared.evictions
        return out

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        while self.idle and self.waiters:
            self.release(self.idle.pop())  # to the first waiter (or checked, or back to idle)
        if self.waiters:
            self._grow()

    def grow_for_waiters(self) -> None:
        if self.waiters and not self.paused:
            self._grow()

    def lent(self) -> int:
        """Servers not idle in the pool: lent to a client, being reset or checked."""
        return len(self.servers) - len(self.idle)

    def in_transactions(self) -> int:
        """Servers lent to a client that is in a transaction or has requests in flight (a pinned
        client's server between its transactions is not)."""
        return sum(1 for server in self.servers if server.client is not None and (
            server.pending or server.status != STATUS_IDLE or server.unsynced or server.copy_in))

    def reconnect(self) -> None:
        """Replace every server: idle ones now, the others when they are released (marked as not
        to be lent again: release() closes them, at no cost to the usual release)."""
        self.generation += 1
        idle = set(self.idle)
        for server in list(self.servers):
            if server in idle:
                server.close("reconnect requested")
            else:
                server.doubt = server.doubt or RECONNECTING

    def old_servers(self) -> int:
        return sum(1 for server in self.servers if server.generation != self.generation)

    def _check(self, server: ServerConn) -> None:
        """server_check_query on a server idle longer than server_check_delay, before it is lent:
        released again (to a waiter) if it answers, closed if not."""
        server.checking = True
        server.hidden_error = None
        server.on_idle = self._checked
        server.send_hidden(self.general.server_check_query)
        asyncio.get_running_loop().call_later(self.general.server_connect_timeout or 5.0,
                                              self._check_timeout, server)

    def _checked(self, server: ServerConn) -> None:
        server.checking = False
        if server.hidden_error is not None:
            server.close(f"server check failed: {server.hidden_error.get('M')}")
            return
        self.release(server)

    def _check_timeout(self, server: ServerConn) -> None:
        if server.checking and not server.closed:
            server.close("server check query timed out")

    def on_server_closed(self, server: ServerConn) -> None:
        self.servers.discard(server)
        try:
            self.idle.remove(server)
        except ValueError:
            pass
        if self.budget is not None and self.budget.limit:
            self.budget.freed()  # its place may be another pool's now
        elif self.waiters and not self._closing:
            self._grow()

    # --- growing ---

    def _grow(self) -> None:
        if self._closing:
            return
        wanted = len(self.waiters) - self.connecting
        room = self.pool_size - len(self.servers) - self.connecting
        budget = self.budget
        if budget is not None and budget.limit and wanted > 0 and room > 0:
            allowed = budget.room()
            if allowed <= 0:
                budget.make_room(self)  # when that server has closed, freed() grows us
                return
            room = min(room, allowed)
        for _ in range(min(wanted, room)):
            self._spawn_connect()

    def _spawn_connect(self) -> None:
        self.connecting += 1
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        delay = self._retry_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            server = await self.connect()
        except ServerError as exc:
            self.connecting -= 1
            self._retry_at = time.monotonic() + self.general.server_login_retry
            log.warning("%s: server connect failed: %s", self.name, exc)
            if not self.servers and self.connecting == 0:
                self.fail_waiters(f"server login failed: {exc}", exc.code)
            return
        self.connecting -= 1
        self.release(server)

    async def connect(self) -> ServerConn:
        """Open and authenticate one server connection (counted in self.servers)."""
        loop = asyncio.get_running_loop()
        server = ServerConn(self)
        host, port = self.cfg.server_host, self.cfg.server_port
        timeout = self.general.server_connect_timeout or None
        try:
            async with asyncio.timeout(timeout):
                if host.startswith("/"):
                    await loop.create_unix_connection(lambda: server, f"{host}/.s.PGSQL.{port}")
                else:
                    await loop.create_connection(lambda: server, host, port)
                await server.ready
                if self.cfg.connect_query:
                    await self._connect_query(server)
            self.servers.add(server)
            if server.generation != self.generation:  # RECONNECT while it connected
                server.doubt = RECONNECTING  # only now: until ready it is counted in self.connecting
        except TimeoutError:
            server.close("connect timeout")
            raise ServerError(f"could not connect to server {host}:{port}: timeout") from None
        except OSError as exc:
            server.close(f"connect failed: {exc}")
            raise ServerError(f"could not connect to server {host}:{port}: {exc.strerror or exc}") from None
        if self.server_params is None:
            self.server_params = dict(server.params)
        log.info("%s: %s new server connection to %s:%s (backend pid %d)",
                 server.id, self.name, host, port, server.backend_pid)
        return server

    async def _connect_query(self, server: ServerConn) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        server.on_idle = lambda _server: None if done.done() else done.set_result(None)
        server.send_hidden(self.cfg.connect_query)
        await done
        if server.hidden_error is not None:
            message = server.hidden_error.get("M", "")
            server.close(f"connect_query failed: {message}")
            raise ServerError(f"connect_query failed: {message}", server.hidden_error.get("C", "08006"))

    async def warm(self, wanted: int, timeout: float) -> None:
        """Open servers until there are `wanted` (at most pool_size), and wait for their logins:
        an upgrade's successor, before it says READY, opens as many as the old process had, so
        the clients handed over find servers instead of waiting for logins."""
        missing = min(wanted, self.pool_size) - len(self.servers) - self.connecting
        if missing <= 0 or (self.passthrough is not None and self.scram_keys is None) or self._closing:
            return
        for _ in range(missing):
            self._spawn_connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connecting and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def fail_waiters(self, message: str, code: str) -> None:
        while self.waiters:
            client = self.waiters.popleft()
            if client.waiting:
                client.waiting = False
                client.wait_failed(message, code)

    # --- housekeeping (called every second by the app) ---

    def expire_waiters(self, now: float) -> None:
        """Fail clients that waited longer than query_wait_timeout (oldest are at the front)."""
        timeout = self.cfg.query_wait_timeout
        waiters = self.waiters
        while waiters and timeout:
            client = waiters[0]
            if client.waiting and now - client.wait_since < timeout:
                return
            waiters.popleft()
            if client.waiting:
                client.waiting = False
                budget = self.budget
                if budget is not None and budget.full() and len(self.servers) < self.pool_size:
                    client.wait_failed(  # the database's cap, not this pool's size, kept it waiting
                        f'too many server connections for database "{budget.database}" (max_db_connections '
                        f"= {budget.limit}): none became available within {timeout:g}s",
                        codes.TOO_MANY_CONNECTIONS)
                    continue
                client.wait_failed(
                    f"query_wait_timeout: no server connection became available within {timeout:g}s",
                    codes.PROTOCOL_VIOLATION)

    def maintain(self) -> None:
        now = time.monotonic()
        self.expire_waiters(now)
        idle_timeout, lifetime = self.cfg.idle_timeout, self.cfg.server_lifetime
        keep = self.min_pool_size
        check = self.general.server_check_query and self.general.server_check_delay
        for server in list(self.idle):
            if lifetime and now - server.created > lifetime:
                server.close("server lifetime reached")
            elif idle_timeout and now - server.last_used > idle_timeout and len(self.servers) > keep:
                server.close("server idle timeout")
            elif check and now - server.last_used > check:
                # Idle longer than server_check_delay: out of the idle list until it has answered
                # server_check_query (within a tick of the delay, so before it is lent again).
                self.idle.remove(server)
                self._check(server)
        missing = self.min_pool_size - len(self.servers) - self.connecting
        if self.passthrough is not None and self.scram_keys is None:
            missing = 0  # pass-through: no server login until a client has proved its password
        if missing > 0 and self.budget is not None and self.budget.limit:
            missing = min(missing, self.budget.room())
        if missing > 0 and now >= self._retry_at and not self._closing and not self.removed:
            for _ in range(missing):
                self._spawn_connect()

    def close_all(self, reason: str) -> None:
        self._closing = True
        self.fail_waiters(reason, codes.ADMIN_SHUTDOWN)
        if self.listener is not None:
            self.listener.close(reason)
        for server in list(self.servers):
            server.close(reason)
