"""auth_query: the secret of a user the config does not list, looked up on the server.

Each database with an auth_query has, in each worker, an AuthLookup: a small pool of its own server
connections (lookup_pool_size) that run the query, and a cache of the answers (auth/lookup.py). A
login waits for its user's answer with its input buffered, and nobody else waits: the lookup is a
query like any other, on a server the pool lends to the lookup instead of to a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from pgdoorman.auth.lookup import FAILED, FOUND, UNKNOWN_USER, Answer, LookupCache, lookup_sql, secret_of
from pgdoorman.backend.tls import ServerTls
from pgdoorman.config import GeneralConfig, PoolConfig, UserConfig
from pgdoorman.pool import Pool
from pgdoorman.server import ServerConn

log = logging.getLogger("pgdoorman.authquery")

LOOKUP_TIMEOUT = 10.0  # a lookup query that has not answered by then closes its server


class _LookupPool(Pool):
    """The lookup's servers: a server closed while its lookup ran fails that lookup."""

    __slots__ = ("running",)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.running: dict[ServerConn, Callable[[str], None]] = {}

    def on_server_closed(self, server: ServerConn) -> None:
        failed = self.running.pop(server, None)
        super().on_server_closed(server)
        if failed is not None:
            failed("the lookup's server connection closed")


class _Waiter:
    """One user's lookup waiting for a server of the lookup pool (pool.Waiter)."""

    __slots__ = ("lookup", "user", "waiting", "wait_since")

    def __init__(self, lookup: AuthLookup, user: str) -> None:
        self.lookup, self.user = lookup, user
        self.waiting = False
        self.wait_since = 0.0

    def assign(self, server: ServerConn) -> None:
        self.lookup._run(server, self.user)

    def wait_failed(self, message: str, code: str) -> None:
        self.lookup._finish(self.user, Answer(FAILED, why=message))


class AuthLookup:
    def __init__(self, pool_cfg: PoolConfig, general: GeneralConfig, tls: ServerTls) -> None:
        aq = pool_cfg.auth_query
        assert aq is not None
        self.config = aq
        self.database = pool_cfg.name
        # The lookup's server side: the pool's server, the auth_query's database and role
        lookup_cfg = replace(pool_cfg, server_database=aq.database, connect_query="", users={},
                             auth_query=None, prepared_statements_cache_size=0, pool_mode="session")
        user_cfg = UserConfig(username=aq.user, password=aq.password, pool_size=aq.lookup_pool_size,
                              pool_mode="session", server_username=aq.user)
        self.pool = _LookupPool(lookup_cfg, user_cfg, general, tls=tls)
        self.pool.name = f"{pool_cfg.name}/{aq.user} (auth_query)"
        self.cache = LookupCache(aq.cache_ttl, aq.negative_cache_ttl)

    def same_as(self, pool_cfg: PoolConfig) -> bool:
        """Whether a reloaded pool config keeps this lookup as it is (its servers, its cache)."""
        cfg = self.pool.cfg
        return (pool_cfg.auth_query == self.config and pool_cfg.server_host == cfg.server_host
                and pool_cfg.server_port == cfg.server_port)

    def find(self, user: str, done: Callable[[Answer], None]) -> None:
        """done(answer) with user's secret: at once from the cache, else after the query."""
        answer = self.cache.get(user)
        if answer is not None:
            done(answer)
            return
        if not self.cache.wait(user, done):
            return  # that user's lookup is already running
        waiter = _Waiter(self, user)
        server = self.pool.acquire(waiter)
        if server is not None:
            self._run(server, user)

    def forget(self, user: str) -> None:
        self.cache.forget(user)

    def _run(self, server: ServerConn, user: str) -> None:
        try:
            sql = lookup_sql(self.config.query, user)
        except ValueError as exc:
            self.pool.release(server)
            self._finish(user, Answer(FAILED, why=str(exc)))
            return
        pool = self.pool

        def failed(why: str) -> None:
            self._finish(user, Answer(FAILED, why=why))

        def rows_read(rows: list[list[str | None]] | None) -> None:
            pool.running.pop(server, None)
            timer.cancel()
            if rows is None:
                error = server.hidden_error or {}
                failed(f"{error.get('C', '')} {error.get('M', 'the query failed')}".strip())
                return
            try:
                secret = secret_of(rows, user)
            except ValueError as exc:
                failed(str(exc))
                return
            if secret is None:
                self._finish(user, Answer(UNKNOWN_USER))
                return
            text = rows[0][-1]
            assert text is not None
            self._finish(user, Answer(FOUND, secret, text))

        pool.running[server] = failed
        server.hidden_error = None
        server.on_idle = pool.release  # at its ReadyForQuery, after rows_read
        timer = asyncio.get_running_loop().call_later(
            LOOKUP_TIMEOUT, lambda: server.close("auth_query lookup timed out"))
        server.capture(sql, rows_read)

    def _finish(self, user: str, answer: Answer) -> None:
        if answer.kind == FAILED:
            log.warning("%s: auth_query lookup of user %r failed: %s", self.pool.name, user, answer.why)
        elif answer.kind == UNKNOWN_USER:
            log.info("%s: auth_query: no user %r (or no password)", self.pool.name, user)
        self.cache.answer(user, answer)

    def close(self, reason: str) -> None:
        self.pool.close_all(reason)
        self.cache.fail_waiting(reason)
