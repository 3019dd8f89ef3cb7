"""The client side: start-up, authentication, and the per-mode relay of requests to a lent server."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from pgdoorman import ids
from pgdoorman.auth import UNKNOWN, AuthFailed, StoredSecret, mock_method, parse_secret
from pgdoorman.auth.lookup import FAILED, FOUND, Answer
from pgdoorman.frontend.login import Decision, Peer, admitted, jwt_checker, login_method
from pgdoorman.frontend.notify import LISTEN_SQL, Listener, channels_read, listen_sql
from pgdoorman.frontend.password import PasswordExchange
from pgdoorman.frontend.pins import HELD_SQL, PIN, held_state, refusal
from pgdoorman.frontend.settings import (
    MAX_CUSTOM_NAMES,
    Probe,
    Refused,
    Welcome,
    cached_welcome,
    check_replication,
    custom_names,
    followed,
    replay_sql,
    session_settings,
    session_settings_sql,
    split_local,
    startup_settings,
)
from pgdoorman.frontend.sqlprepare import PREPARED_SQL, Prepared, read_prepared, replay_prepared
from pgdoorman.frontend.statements import HOLD, UNCHANGED, UNNAMED_KEEP, StatementMapping
from pgdoorman.frontend.tls import TLS_RECORD_HANDSHAKE
from pgdoorman.metrics.account import begin
from pgdoorman.metrics.tcpbytes import socket_bytes
from pgdoorman.prepared import Statement
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m
from pgdoorman.protocol.scan import (
    BIND,
    CLOSE,
    COPY_END,
    DESCRIBE,
    HIDDEN_QUERY,
    HIDDEN_ROWS,
    NAMES_GUARDED,
    NAMES_MAPPED,
    NAMES_PLAIN,
    PARSE,
    SAW_PARSE,
    SAW_QUERY,
    SEQUENCE_MARKS,
    SPECIAL,
    STREAM,
    SYNC,
    SYNTH_CLOSE,
    changes_settings,
    grow_partial,
    mentions_session_state,
    message_need,
    scan_requests,
)
from pgdoorman.server import (
    ServerConn,
    tracked_values,
    with_tracked,
)
from pgdoorman.tlswrap import reason, start_tls

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable

    from pgdoorman.app import App
    from pgdoorman.config import UserConfig
    from pgdoorman.pool import Pool

log = logging.getLogger("pgdoorman.client")
_unpack_len = struct.Struct("!I").unpack_from
_unpack_i32 = struct.Struct("!i").unpack_from
_pack_hdr = struct.Struct("!cI").pack

STARTUP, AUTH, WAIT_LOGIN, ACTIVE, CLOSED = range(5)
ADMIN_DATABASES = ("pgdoorman", "pgbouncer")  # the console's virtual database (admin/console.py)
SESSION, TRANSACTION, STATEMENT = "session", "transaction", "statement"
_STATUS_IDLE = 73
# Where a client's TLS stands: none yet, handshaking (after an SSLRequest, or direct), or on TLS
_NO_TLS, _TLS_REQUESTED, _TLS_DIRECT, _TLS_ON = range(4)


class ClientConn(StatementMapping, asyncio.Protocol):
    # Slots: thousands of mostly idle clients, and attribute reads on every message.
    __slots__ = (
        "_asked", "_exchange", "_buf", "_drop", "_heard_here", "_held", "_max_message", "_moved", "_need",
        "_partial", "_stream_size", "_charged", "_charged_out", "_charged_srv", "_final_error",
        "_paused", "_rerouted", "_reset_always", "_rewrite", "_skip",
        "_custom", "_initial", "_names", "_notes", "_pin_policy", "_pinned", "_startup",
        "_statement_mode",
        "_stmt_cap", "_strict", "_terminating", "_timer", "activity",
        "app", "cancel_key",
        "connected_at", "id", "in_transaction", "last_active", "mode", "params", "peer", "pool",
        "channels", "prepared_sql", "seen_activity", "server", "settings", "state", "bytes_base",
        "bytes_final", "tracked",
        "tls", "_tls_state", "_counted", "_looked_up_secret", "transport",
        "wait_since", "waiting",
    )

    def __init__(self, app: App, initial: bytes = b"", moved: dict[str, Any] | None = None,
                 final: bool = False) -> None:
        """initial: what another worker already read from the socket (rerouted to us);
        moved: the state of a logged-in client another worker passed on (see detach());
        final: a rerouted client: serve it here, whatever it is."""
        self.id = ids.client_id() if moved is None else moved["id"]
        self.app = app
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = STARTUP
        self.peer = "?"
        self.pool: Pool | None = None
        self.mode = TRANSACTION
        self._statement_mode = False
        self._pinned = ""  # what its session holds that keeps it on its server (frontend/pins.py)
        self._pin_policy = PIN
        self._names = NAMES_PLAIN  # how scan_requests treats statement names (see _join)
        self.server: ServerConn | None = None
        self.waiting = False
        self.params: dict[str, str] = {}  # the values this client believes its session has
        self.tracked: tuple[str | None, ...] = ()  # its TRACKED_PARAMS values
        self.settings: tuple[tuple[str, str], ...] = ()  # its other settings (frontend/settings.py)
        self._asked: list[tuple[str, str]] = []  # the settings its startup packet asks for
        self.stmts: dict[bytes, Statement] = {}  # client's statement name -> shared statement
        self.cancel_key: tuple[int, int] = (0, 0)
        # The kernel's byte counts of its socket when it came to this worker (metrics/tcpbytes.py)
        self.bytes_base: tuple[int, int] = (0, 0)
        # its last count read (at its EOF, or a SHOW): a socket reset goes before connection_lost
        self.bytes_final: tuple[int, int] | None = None
        self.connected_at = time.monotonic()
        # Idle timeouts: data_received only counts; housekeeping notes when the count moved.
        self.activity = 0
        self.seen_activity = 0
        self.last_active = self.connected_at
        self.in_transaction = False
        self._rewrite = False
        self._stmt_cap = 0
        self._reset_always = app.config.general.server_reset_query_always
        self._strict = False
        self._initial: tuple[tuple[str, str], ...] = ()  # its startup settings
        self.prepared_sql: Prepared = ()  # its SQL prepared statements (frontend/sqlprepare.py)
        self.channels: frozenset[str] = frozenset()  # what it LISTENs to (frontend/notify.py)
        # notifications for it (channel, message), after its current reply; None for none
        self._notes: list[tuple[str | None, bytes]] | None = None
        # channels its server was last seen listening to: while it listens, it delivers those
        self._heard_here: frozenset[str] = frozenset()
        self._custom: list[str] = []  # names of custom settings it may have set (note_settings)
        self._max_message = app.config.general.max_message_size or MAX_MESSAGE
        self._stream_size = app.config.general.message_size_to_be_stream
        # What it holds for messages in flight, charged to the worker's max_memory_usage share
        # (limits.MemoryBudget): buffered input, and output waiting for a slow peer.
        self._final_error: tuple[str, str] | None = None  # sent after the replies it is owed (_terminated)
        self._charged = 0
        self._charged_out = 0  # its socket's write buffer (a slow client)
        self._charged_srv = 0  # its server's: requests waiting for a slow server, or a reply read whole
        self._buf = bytearray(initial)  # login-phase input
        self._held: bytes | bytearray | None = None  # requests waiting for a server
        self._partial: bytes | bytearray = b""  # an incomplete message the pooler must read whole
        self._need = 0  # the length _partial must reach before it is scanned
        self._skip = 0  # bytes of a streamed message still to come: it is half written to the server
        # Terminate (or EOF) received: the server may finish what it was sent. _FORWARDED: the
        # Terminate went on to the server too; _INTO_COPY: which reads it inside COPY FROM STDIN.
        self._terminating = 0
        # Requests held until a re-prepared statement's shape is checked (see _lookup).
        self._verify_hold: bytearray | None = None
        self._hold_prefix = b""
        self._no_verify = False
        # This client's unnamed statement (see _note_unnamed), for a Bind on another server.
        self._unnamed: tuple[bytes, int, int] | bytes | None = None
        self._unnamed_saved: tuple[bytes, int, int] | bytes | None = None
        self._unnamed_before: tuple[bytes, int, int] | bytes | None = None  # the one before _unnamed
        # Statements it closed while replies were still owed: their names, for those errors.
        self._closed: dict[Statement, bytes] = {}
        self._drop = 0  # bytes of a replaced request still to come: dropped
        self._dropping = False
        self._timer: asyncio.TimerHandle | None = None  # login timeout
        self._paused = False
        self.wait_since = 0.0  # set by the pool while waiting for a server
        self._exchange: PasswordExchange | None = None
        self._startup: dict[str, str] = {}
        self._moved = moved
        self._rerouted = final
        self.tls: ssl.SSLObject | None = None  # its TLS session (frontend/tls.py)
        self._counted = False  # counted under the client caps (limits.py)
        self._looked_up_secret = False  # its secret came from auth_query (frontend/authquery.py)
        self._tls_state = _NO_TLS

    @property
    def login_user(self) -> str:
        """The user it logged in as (its pool's user, unless auth_query's server_user shares one)."""
        return self._startup.get("user") or (self.pool.user if self.pool is not None else "")

    # --- connection events ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._tls_state != _NO_TLS:  # the TLS handshake is done: the same client, now encrypted
            self._tls_ready()
            return
        if self._moved is not None:
            self._arrive(self._moved)
            return
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        self.app.client_connected(self)
        timeout = self.app.config.general.client_login_timeout
        if timeout:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._login_timeout)
        if self._buf:
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("client closed the connection" if exc is None else f"client connection lost: {exc}")

    def data_received(self, data: bytes) -> None:
        if self.state == ACTIVE:
            self.activity += 1
            server = self.server
            if server is not None:
                if self._verify_hold is None:
                    self._forward(data, server)
                else:
                    self._verify_hold += data
                    if not self._recharge():
                        return
                    if len(self._verify_hold) > HOLD_LIMIT and not self._paused:
                        self._paused = True
                        self.transport.pause_reading()
            elif self._held is not None:
                if isinstance(self._held, bytes):  # a second chunk: start accumulating
                    self._held = bytearray(self._held)
                self._held += data
                if not self._recharge():
                    return
                if len(self._held) > HOLD_LIMIT and not self._paused:
                    self._paused = True
                    self.transport.pause_reading()
            else:
                self._held = data  # usually the whole request: kept as is, no copy
                self._need_server()
        elif self.state != CLOSED:
            self._buf += data
            try:
                self._login_input()
            except m.ProtocolError as exc:
                self.fatal(exc.code, str(exc))

    def eof_received(self) -> bool | None:
        """The client shut down its side (often right after a Terminate): PostgreSQL would still
        answer what it was sent before closing, so keep the connection open for those replies."""
        if self.pool is not None:  # the socket's byte counts, while it can still be asked
            self.bytes_final = socket_bytes(self.transport.get_extra_info("socket"))
        server = self.server
        if self.state == ACTIVE and server is not None and not server.closed and not self._skip and (
                server.pending or self._terminating):
            if not self._terminating:
                self._terminate(server)
            return None if self.state == CLOSED else True
        if self.state == ACTIVE and server is None and self._held is not None and not self._partial:
            # Its requests wait for a server: they still run, and on_ready then closes.
            self._terminating = _RECEIVED
            return True
        return None

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()
        self.output_waiting(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()
        self.output_waiting(0)

    # --- memory (limits.MemoryBudget) ---

    def _recharge(self) -> bool:
        """Charge what it holds of its input now; False if that went over max_memory_usage, and
        the client is then ended with 53200 (others are untouched)."""
        held = self._held
        total = len(self._partial) + (len(held) if type(held) is bytearray else 0) + (
            len(self._verify_hold) if self._verify_hold is not None else 0)
        if not self._charge(self._charged, total):
            return False
        self._charged = total
        return True

    def output_waiting(self, size: int) -> bool:
        """What waits in its socket's write buffer for a slow client (over the high-water mark);
        0 once it drained."""
        if self.state == CLOSED:
            return True
        if not self._charge(self._charged_out, size):
            return False
        self._charged_out = size
        return True

    def held_by_server(self, size: int) -> bool:
        """What its server holds for it: its requests in the write buffer of a slow server, or an
        incomplete reply the pooler must read whole; 0 once that is gone."""
        if self.state == CLOSED:
            return True
        if not self._charge(self._charged_srv, size):
            return False
        self._charged_srv = size
        return True

    def _charge(self, held: int, size: int) -> bool:
        """Change one of its charges from `held` to `size` bytes; False if that went over
        max_memory_usage (the client is then ended with 53200)."""
        if self.app.memory.change(size - held):
            return True
        self._out_of_memory(size - held)
        return False

    def _out_of_memory(self, wanted: int) -> None:
        budget = self.app.memory
        log.warning("%s: %s: max_memory_usage: this worker holds %d bytes for messages in flight (its "
                    "share: %d), %d more refused", self.id, self.peer, budget.used, budget.limit, wanted)
        self.fatal(codes.OUT_OF_MEMORY, "out of memory",
                   f"max_memory_usage reached: the pooler holds too much for messages in flight "
                   f"({wanted} more bytes were needed for this connection)")

    # --- login ---

    def _login_input(self) -> None:
        buf = self._buf
        if self.state == WAIT_LOGIN:  # requests sent before the login reply: kept for _welcome
            if len(buf) > HOLD_LIMIT and not self._paused:
                self._paused = True
                self.transport.pause_reading()
            return
        while self.state in (STARTUP, AUTH):
            if self.state == STARTUP:
                if (buf and buf[0] == TLS_RECORD_HANDSHAKE and self._tls_state == _NO_TLS
                        and self.app.tls.enabled):
                    self._start_tls(_TLS_DIRECT, bytes(buf))  # PostgreSQL 17's sslnegotiation=direct
                    buf.clear()
                    return
                if len(buf) < 4:
                    return
                length = _unpack_i32(buf, 0)[0]
                if length < 8 or length > codes.MAX_STARTUP_PACKET:
                    raise m.ProtocolError("invalid length of startup packet")
                if len(buf) < length:
                    return
                packet = bytes(buf[4:length])
                raw = bytes(buf)
                del buf[:length]
                self._startup_packet(packet, raw)
            else:
                if len(buf) < 5:
                    return
                length = _unpack_len(buf, 1)[0]
                if length < 4 or length > codes.MAX_STARTUP_PACKET:
                    raise m.ProtocolError("invalid message length during authentication")
                if len(buf) < length + 1:
                    return
                kind, body = buf[0], bytes(buf[5 : length + 1])
                del buf[: length + 1]
                if kind != ord("p"):
                    raise m.ProtocolError(f"expected password response, got message type {chr(kind)!r}")
                self._auth_response(body)

    def _startup_packet(self, packet: bytes, raw: bytes) -> None:
        """packet: the startup packet after its length; raw: everything read so far, from its start
        (what another worker needs to take this client over)."""
        code = _unpack_i32(packet, 0)[0]
        if code == codes.SSL_REQUEST_CODE and len(packet) == 4 and self._tls_state == _NO_TLS:
            if self.app.tls.enabled and not self._rerouted and self.peer != "unix":
                if self._buf:  # CVE-2021-23214: bytes injected before the handshake are refused
                    raise m.ProtocolError("received unencrypted data after SSL request")
                self.transport.write(b"S")
                self._start_tls(_TLS_REQUESTED, b"")
                return
            self.transport.write(b"N")  # libpq then continues in clear text (or gives up)
            return
        if code == codes.GSSENC_REQUEST_CODE and len(packet) == 4 and self._tls_state == _NO_TLS:
            self.transport.write(b"N")
            return
        if code == codes.CANCEL_REQUEST_CODE and len(packet) == 12:
            pid, key = struct.unpack_from("!ii", packet, 4)
            if not self._rerouted and not self.app.cancels.known(pid, key):
                if self.tls is not None and self.app.reroute_cancel(raw, (pid, key)):
                    # its socket cannot leave this process, the request can: counted as moved on
                    self.state = CLOSED
                    self._cancel_timer()
                    self.app.client_moved_out(self)
                    self.transport.close()
                    return
                if self.app.reroute(self, raw, "", "", (pid, key)):
                    return
            self.app.cancels.forward(pid, key)
            self._close_quietly()
            return
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            raise_unsupported = f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
            self.fatal(codes.FEATURE_NOT_SUPPORTED, raise_unsupported)
            return
        params = m.parse_startup_params(packet[4:])
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if minor > 0 or unsupported:
            self.transport.write(m.negotiate_protocol_version(0, unsupported))
        user = params.get("user")
        if not user:
            self.fatal(codes.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
            return
        database = params.get("database") or user
        self._startup = params
        peer = self._peer_facts()
        decision = admitted(self.app.config, peer, database, user)
        if decision.refusal is not None:
            log.info("%s: %s: %s/%s refused: %s", self.id, self.peer, database, user, decision.why)
            self.fatal(*decision.refusal)
            return
        if database in ADMIN_DATABASES:
            self.app.admin_login(self, params, bytes(self._buf))
            return
        if self.app.over_client_limit():
            self.fatal(codes.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
            return
        try:
            check_replication(params.get("replication"))
        except Refused as exc:
            self._refuse(exc)
            return
        self.peer = f"{database}/{user}@{self.peer}"
        refused = self.app.login_refusal(database)
        if refused is not None:
            self.fatal(*refused)
            return
        pool_cfg = self.app.config.pools.get(database)
        if pool_cfg is None:
            self._mock_auth(u for p in self.app.config.pools.values() for u in p.users.values())
            return
        pool = self.app.pool_for(database, user)
        if pool is not None and pool.pool_size == 0 and not self._rerouted and self.tls is None:
            # This worker has no share of the pool's servers (pool_size < workers): another has.
            if self.app.reroute(self, raw, database, user, None):
                return
        if pool is None or pool.looked_up:
            lookup = self.app.lookups.get(database)
            if lookup is not None:  # auth_query: its secret comes from the server
                self.state = WAIT_LOGIN  # its input is buffered meanwhile
                lookup.find(user, partial(self._looked_up, decision, peer))
                return
            self._mock_auth(pool_cfg.users.values())
            return
        self._authenticate(pool, parse_secret(pool.user_cfg.password, user), decision, peer)

    def _authenticate(self, pool: Pool, secret: StoredSecret, decision: Decision, peer: Peer) -> None:
        decision = login_method(self.app.config, decision, secret, peer)
        if decision.refusal is not None:
            log.info("%s: %s refused: %s", self.id, self.peer, decision.why)
            self.fatal(*decision.refusal)
            return
        self._join(pool)
        self._begin_auth(secret, decision.method)

    def _looked_up(self, decision: Decision, peer: Peer, answer: Answer) -> None:
        """auth_query's answer for this client's user (frontend/authquery.py)."""
        if self.state == CLOSED:
            return
        database, user = self._startup.get("database") or self._startup["user"], self._startup["user"]
        if answer.kind == FAILED:  # the reason is in the log: the client learns only that it failed
            self.fatal(codes.CONNECTION_FAILURE, f'authentication lookup for user "{user}" failed')
            return
        if answer.kind != FOUND or database not in self.app.lookups:
            self._mock_auth(self.app.config.pools[database].users.values()
                            if database in self.app.config.pools else ())
            return
        assert answer.secret is not None
        self._looked_up_secret = True
        self._authenticate(self.app.looked_up_pool(database, user, answer), answer.secret, decision, peer)

    def _start_tls(self, how: int, already_read: bytes) -> None:
        self._tls_state = how
        context = self.app.tls.context
        assert context is not None
        start_tls(self, self.transport, context, server_side=True, failed=self._tls_failed,
                  timeout=self.app.config.general.client_login_timeout, already_read=already_read)

    def _tls_ready(self) -> None:
        """connection_made from the SSL protocol: the handshake is done."""
        direct = self._tls_state == _TLS_DIRECT
        self._tls_state = _TLS_ON
        self.tls = self.transport.get_extra_info("ssl_object")
        if self.state == CLOSED:  # the login timeout struck during the handshake
            self.transport.close()
            return
        if direct and (self.tls is None or self.tls.selected_alpn_protocol() != "postgresql"):
            # PostgreSQL 17 too: ALPN is what tells a PostgreSQL client from any other TLS client
            self.fatal(codes.PROTOCOL_VIOLATION,
                       "received direct SSL connection request without ALPN protocol negotiation extension")
            return
        log.debug("%s: %s TLS on (%s)", self.id, self.peer, self.tls.version() if self.tls else "?")

    def _tls_failed(self, exc: BaseException) -> None:
        why = f"TLS handshake failed: {reason(exc)}"
        if self.state != CLOSED:
            log.info("%s: %s %s", self.id, self.peer, why)
        self._finish(why)
        self.transport.close()

    def _peer_facts(self) -> Peer:
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            return Peer(local=False, address=str(peer[0]), tls=self.tls)
        return Peer(local=True, address=None, tls=self.tls)

    def _join(self, pool: Pool) -> None:
        self.pool = pool
        pool.clients += 1
        self.mode = pool.mode
        self._statement_mode = pool.mode == STATEMENT
        self._names = NAMES_PLAIN if pool.mode == SESSION else NAMES_MAPPED
        self._rewrite = pool.mode != SESSION and pool.prepared_enabled
        self._strict = pool.mode != SESSION and pool.cfg.strict
        self._pin_policy = pool.cfg.pin_policy
        self._stmt_cap = self.app.config.general.client_prepared_statements_cache_size

    def _mock_auth(self, users: Iterable[UserConfig]) -> None:
        """A database or user the pooler does not know: the exchange a known user of that database
        gets, then 28P01 as for a wrong password ("does not exist" would tell which names exist)."""
        log.info("%s: %s: unknown database or user: mock authentication", self.id, self.peer)
        method = mock_method(parse_secret(u.password, u.username).kind for u in users)
        if method == "jwt":  # what a known JWT user gets, clear-text refusal included
            decision = login_method(self.app.config, Decision(method="jwt"), UNKNOWN, self._peer_facts())
            if decision.refusal is not None:
                self.fatal(*decision.refusal)
                return
        self._begin_auth(UNKNOWN, method)

    def _begin_auth(self, secret: StoredSecret, method: str = "") -> None:
        """method: what to ask for (default: what the secret needs); UNKNOWN never authenticates."""
        self.state = AUTH
        cbind = self.app.tls.cbind if self.tls is not None else None
        self._exchange = PasswordExchange(secret, method, self.app.auth_key, self._startup.get("user", ""),
                                          cbind=cbind, jwt=self._jwt_check(secret))
        first = self._exchange.start()
        if first is None:
            self._auth_ok()
        else:
            self.transport.write(first)

    def _jwt_check(self, secret: StoredSecret) -> Callable[[str], None] | None:
        if secret.kind != "jwt":
            return None
        return jwt_checker(self.app.config, self.app.jwt_keys, secret, self._startup.get("user", ""))

    def _auth_response(self, body: bytes) -> None:
        assert self._exchange is not None
        try:
            reply, done = self._exchange.step(body)
        except (AuthFailed, IndexError, struct.error) as exc:
            user = self._startup.get("user", "")
            log.info("%s: %s auth failed: %s", self.id, self.peer, exc)
            if self._looked_up_secret and self.pool is not None:  # its password may have changed
                lookup = self.app.lookups.get(self.pool.cfg.name)
                if lookup is not None:
                    lookup.forget(user)
            self._auth_failed(f'password authentication failed for user "{user}"')
            return
        if reply:
            self.transport.write(reply)
        if done:
            keys, self._exchange = self._exchange.scram_keys, None
            pool = self.pool
            if keys is not None and pool is not None and pool.passthrough is not None:
                pool.scram_keys = keys  # for its server logins
            self._auth_ok()

    def _auth_failed(self, message: str) -> None:
        """28P01, after the failed-login delay of its address (limits.FailureDelay): meanwhile its
        input is only buffered, and nobody else waits."""
        address = self._peer_facts().address
        general = self.app.config.general
        delay = 0.0 if address is None else self.app.failures.failed(
            address, general.auth_failure_delay, general.auth_failure_delay_max)
        if not delay:
            self.fatal(codes.INVALID_PASSWORD, message)
            return
        self.state = WAIT_LOGIN
        self._exchange = None
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self.fatal, codes.INVALID_PASSWORD, message)

    def _auth_ok(self) -> None:
        pool = self.pool
        assert pool is not None
        address = self._peer_facts().address
        if address is not None:
            self.app.failures.succeeded(address)
        if self.app.caps_on():
            self.state = WAIT_LOGIN  # its input is buffered until the acceptor answers
            self.app.admit_client(self.login_user, pool.cfg.name, self._admitted)
            return
        self._logged_in()

    def _admitted(self, refusal: tuple[str, str] | None) -> None:
        pool = self.pool
        assert pool is not None
        if refusal is not None:
            self.fatal(*refusal)
            return
        if self.state == CLOSED:  # it went while the acceptor counted it
            self.app.client_uncounted(self.login_user, pool.cfg.name)
            return
        self._counted = True
        self._logged_in()

    def _logged_in(self) -> None:
        pool = self.pool
        assert pool is not None
        self.state = WAIT_LOGIN
        try:
            self._asked = startup_settings(self._startup)
        except Refused as exc:  # PostgreSQL too refuses them once the client is authenticated
            self.transport.write(_AUTH_OK)
            self._refuse(exc)
            return
        welcome = None if self.mode == SESSION else cached_welcome(pool, self._asked)
        if welcome is None:
            # Session mode keeps a server for the whole session; otherwise a server must first tell
            # us the ParameterStatus values clients expect, or judge new startup settings.
            self.transport.write(_AUTH_OK)
            server = pool.acquire(self)
            if server is not None:
                self.assign(server)
        else:
            self._welcome(welcome, _AUTH_OK)  # one write for the whole login reply
            if self._held is not None:
                self._need_server()

    def _welcome(self, welcome: Welcome, prefix: bytes = b"", pid: int = 0) -> None:
        """Send the login reply. pid: the client's own backend in session mode, else 0 (the pooler
        picks one). What the client sent after its last login message is then held for a server."""
        self.params = dict(welcome.params)  # the client's own: ParameterStatus updates it
        self.tracked = welcome.tracked
        self.settings = self._initial = welcome.settings
        out = bytearray(prefix)
        out += welcome.block
        self.cancel_key = self.app.cancels.register(self, pid)
        out += m.backend_key_data(*self.cancel_key)
        out += m.ready_for_query(b"I")
        self._cancel_timer()
        self.state = ACTIVE
        self.transport.write(out)
        if self.app.config.general.log_client_connections:
            log.info("%s: %s login ok (%s mode)", self.id, self.peer, self.mode)
        if self._buf:
            self._held = bytes(self._buf)
            self._buf.clear()
        if self._paused:  # paused while logging in; the relay pauses again if it must
            self._paused = False
            self.transport.resume_reading()

    def _probe_done(self, server: ServerConn, refused: Refused | None) -> None:
        """PostgreSQL has judged this client's startup settings on server (frontend/settings.py)."""
        assert self.pool is not None
        if refused is not None or self.state != WAIT_LOGIN:
            self.pool.release(server)
            if refused is not None:
                self._refuse(refused)
            return
        self.assign(server)  # the pool's cache knows these settings now

    def _probe_lost(self, reason: str) -> None:
        self.fatal(codes.CONNECTION_FAILURE, f"server connection lost: {reason}")

    def _refuse(self, refused: Refused) -> None:
        self.fatal(refused.code, refused.message, refused.detail, refused.hint)

    def _login_timeout(self) -> None:
        self._timer = None
        if self.state != ACTIVE:
            self.fatal(codes.PROTOCOL_VIOLATION, "client_login_timeout: login not completed in time")

    # --- getting a server ---

    def _need_server(self, waiting_since: float = 0.0) -> None:
        pool, held = self.pool, self._held
        assert pool is not None and held is not None
        first = self._partial[0] if self._partial else held[0]  # else: a message's continuation
        if _LOOK_FIRST[first]:  # one table lookup on the hot path; the rare kinds below
            if first == 80:
                pass  # a Parse: see below
            elif first == 88:  # Terminate
                self.close("client close request")
                return
            elif not self._partial:
                # CopyData/Done/Fail after a COPY that failed, or a Flush: PostgreSQL drops them
                # outside COPY, so they need no server. Only whole messages are dropped here.
                skipped = _whole_no_reply_prefix(held)
                if skipped == len(held):
                    self._held = None
                    return
                if skipped:
                    held = self._held = held[skipped:]
                    first = held[0]
            # A named Parse of a statement this client has is answered without a server.
            if (first == 80 and not self._partial and len(held) > 5 and self._rewrite
                    and _whole_and_well_formed(held) and held[5] != 0 and self._prepare_locally(held)):
                self._held = None
                return
        server = pool.acquire(self, waiting_since)
        if server is not None:
            self.assign(server)
        # else: the pool calls assign() or wait_failed() (query_wait_timeout is checked by the pool's
        # housekeeping, so waiting costs no timer and no epoll change per transaction)

    def wait_failed(self, message: str, code: str) -> None:
        self._cancel_timer()
        self.fatal(code, message)

    def assign(self, server: ServerConn) -> None:
        """The pool lends us a server: replay settings, then forward what the client sent."""
        if self.state != ACTIVE and not self._assign_at_login(server):
            return
        self.server = server
        server.client = self
        server.refuse_transactions = self._statement_mode
        if server.last_client is not self:
            server.last_client = self
            if server.sequences_used:  # another client's currval/lastval must not be this one's
                server.sequences_used = False
                server.send_hidden("DISCARD SEQUENCES")
        if (server.tracked != self.tracked or server.settings != self.settings or server.hidden_error
                or server.settings_unknown or server.prepared_sql is not self.prepared_sql):
            self._sync_params(server)
        held, self._held = self._held, None
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        if held:
            self._forward(held, server)
        if self._terminating and self.server is server:
            self._terminate(server)  # its EOF came while it waited (eof_received): end as directly

    def _assign_at_login(self, server: ServerConn) -> bool:
        """assign() before the client is logged in (or after it closed): whether to lend it."""
        pool = self.pool
        assert pool is not None
        if self.state == CLOSED:
            pool.release(server)
            return False
        welcome = cached_welcome(pool, self._asked)
        if welcome is None:  # PostgreSQL judges the startup settings first, on this server
            Probe(server, split_local(self._asked)[0], self._probe_done, self._probe_lost)
            return False
        if self.mode != SESSION:
            pool.release(server)  # the login only needed the pool's ParameterStatus values
            self._welcome(welcome)
            if self._held is not None:
                self._need_server()
            return False
        self._welcome(welcome, pid=server.backend_pid)
        return True

    def _sync_params(self, server: ServerConn) -> None:
        sql = replay_sql(self.tracked, self.settings, server)
        if sql:
            server.send_hidden(sql)
        if server.prepared_sql is not self.prepared_sql:
            # After the settings: a PREPARE resolves names by the client's search_path.
            for sql in replay_prepared(self.prepared_sql, server.prepared_sql):
                server.send_hidden(sql)
            server.prepared_sql = self.prepared_sql

    # --- relaying requests ---

    def _forward(self, data: bytes | bytearray, server: ServerConn) -> None:
        """Relay what the client sent to its server, counting what it is owed (one function: this
        runs once per transaction)."""
        try:
            if self._partial:
                self._partial, whole = grow_partial(self._partial, data, self._need)
                if not whole:
                    self._recharge()  # (a refusal ends the client: nothing more to do here)
                    return
                data, self._partial = self._partial, b""
                if self._charged:
                    self._recharge()
            if self.channels:
                self._show_channels(data, server)
            if self._drop:  # the rest of a request the pooler replaced with an error
                if self._drop >= len(data):
                    self._drop -= len(data)
                    return
                data, self._drop = data[self._drop :], 0
            n = len(data)
            pos = self._skip
            transport = server.transport
            assert transport is not None
            if pos:  # the rest of a message streamed through
                if pos >= n:
                    self._skip = pos - n
                    transport.write(data)
                    if not self._skip and not server.pending:
                        self._message_done(server)
                    return
                # Its end goes now: whatever happens to the messages after it (a malformed one
                # ends the client), the server is never left with half a message.
                self._skip = 0
                transport.write(data[:pos])
                data = data[pos:]
                n, pos = len(data), 0
            begin(server.times)  # a request begins, unless one is open (metrics/account.py)
            pending = server.pending
            start = len(pending)
            out: bytearray | None = None
            copied = 0
            while True:
                names = self._names
                if names and server.unnamed_owner is not self:
                    names = NAMES_GUARDED  # its unnamed statement may be another client's
                scan_start = pos
                pos, result, skip, seen = scan_requests(data, pos, pending, names, self._max_message,
                                                        self._stream_size)
                if seen:
                    # Whose unnamed statement the server holds, and which one is this client's (a
                    # later Bind without Parse may need it on another server): an unnamed Parse sets
                    # it, any simple Query drops it (as PostgreSQL does).
                    if seen & SAW_PARSE:
                        server.unnamed_owner = None if seen & SAW_QUERY else self
                        if type(data) is bytes and n <= UNNAMED_KEEP:
                            # _note_unnamed's usual case
                            self._unnamed_before, self._unnamed = self._unnamed, (data, scan_start, pos)
                        else:
                            self._note_unnamed(data, scan_start, pos)
                    else:
                        server.unnamed_owner = None
                        self._unnamed_saved, self._unnamed = self._unnamed, None  # see on_query_skipped
                if not result:  # DONE
                    break
                if result == STREAM:
                    self._skip = skip
                    if seen & SAW_QUERY:  # a Query too long to read whole: assume it changed the
                        server.settings_dirty = True  # session (temp table, SET): read it back
                    break
                if result == SPECIAL:
                    end = pos + 1 + _unpack_len(data, pos + 1)[0]
                    if data[pos] == 88 or data[pos] not in _SPECIAL_KINDS:
                        # Terminate, or a type no frontend sends: what came before it still goes to
                        # the server and is answered, then the client goes (with PostgreSQL's
                        # FATAL for the bad type, as PostgreSQL sends it after those replies)
                        if data[pos] != 88:
                            self._final_error = (codes.PROTOCOL_VIOLATION,
                                                 f"invalid frontend message type {data[pos]}")
                        if out is None:
                            out = bytearray()
                        out += data[copied:pos]
                        if out and not server.closed:
                            transport.write(out)
                        server.requests_sent(start)
                        self._terminate(server)
                        return
                    replaced = self._special_request(data, pos, end, server)
                    if replaced is None:  # the client is gone; the server is closed with it
                        return
                    if replaced is HOLD:  # send what comes before; hold this message and the rest
                        if out is None:
                            out = bytearray()
                        out += data[copied:pos]
                        out += self._hold_prefix
                        self._hold_prefix = b""
                        self._verify_hold = bytearray(data[pos:])
                        transport.write(out)
                        server.requests_sent(start)
                        return
                    if replaced is not UNCHANGED:
                        if out is None:
                            out = bytearray()
                        out += data[copied:pos]
                        out += replaced
                        copied = end
                    pos = end
                    if end > n:  # a Bind too large for one read: the rest streams (or is dropped)
                        if self._dropping:
                            self._dropping, self._drop = False, end - n
                        else:
                            self._skip = end - n
                        pos = n
                        if replaced is not UNCHANGED:
                            copied = n  # the replacement holds what it needs of this message
                        break
                    self._dropping = False
                    continue
                # BAD_LENGTH: what came before it is answered first, as PostgreSQL does
                length = _unpack_len(data, pos + 1)[0]
                self._final_error = (codes.PROTOCOL_VIOLATION, f"invalid message length {length}")
                if out is None:
                    out = bytearray()
                out += data[copied:pos]
                if out and not server.closed:
                    transport.write(out)
                server.requests_sent(start)
                self._terminate(server)
                return
            if pos < n:
                self._partial = data[pos:]  # an incomplete message to read whole
                self._need = message_need(data, pos)
                if not self._recharge():
                    return
            if out is None:
                if pos:
                    transport.write(data if pos >= n else data[:pos])
            else:
                out += data[copied:pos]
                if out:
                    transport.write(out)
            if len(pending) != start:
                if self._strict:
                    server.settings_dirty = True  # read the settings back after every transaction
                # The usual case (a Query or Sync last, no batch open, no COPY) leaves nothing to
                # note; anything else is state.requests_sent's.
                if pending[-1] > SYNC or pending[0] == COPY_END or server.unsynced or server.skipping or (
                        server.copy_in):
                    server.requests_sent(start)
            if not pending and not self._skip:
                self._message_done(server)
        except (ValueError, IndexError):
            server.doubt = server.doubt or "a malformed client message was being relayed"
            self.fatal(codes.PROTOCOL_VIOLATION, "malformed message from client")

    def _message_done(self, server: ServerConn) -> None:
        """The client finished writing messages that get no reply (the rest of a CopyData after
        COPY failed, a stray CopyDone, a Flush): if the server is idle again, it can go back."""
        if self.mode != SESSION and self.server is server and server.reusable():
            self.on_ready(server.status)

    def _special_request(
        self, data: bytes | bytearray, pos: int, end: int, server: ServerConn
    ) -> bytes | bytearray | None:
        """A request the scanner left to us: what to send instead (UNCHANGED: itself), or None
        when the client has been closed."""
        kind = data[pos]
        named = self._rewrite
        malformed = _MALFORMED_KIND.get(kind)
        if malformed is not None and not _well_formed(data, pos, end):
            # Passed on as it is: PostgreSQL refuses it with its own ERROR (and skips to Sync), as
            # on a connection of its own. Read by the pooler, its strings could run into the next
            # message, and the server would then frame the stream differently from the pooler.
            server.pending.append(malformed)
            return UNCHANGED
        if kind == 66:  # Bind to a named statement
            name_at = data.index(0, pos + 5, end) + 1
            if data[name_at] == 0:
                return self._unnamed_guard(data, pos, end, server, BIND)
            if named:
                return self._bind(data, pos, name_at, end, server)
            server.pending.append(BIND)
            return UNCHANGED
        if kind == 80:  # Parse of a named statement, or one that may change settings
            text_at = data.index(0, pos + 5, end) + 1
            if mentions_session_state(data, text_at, end):
                self.note_settings(server, data[text_at:end])
            if data[pos + 5] == 0:
                server.pending.append(PARSE)
                server.unnamed_owner = self
                self._note_unnamed(data, pos, end)
                return UNCHANGED
            if named:
                return self._parse(data, pos, end, server)
            self.fatal(codes.FEATURE_NOT_SUPPORTED,
                       "named prepared statements need prepared_statements = true and "
                       f"prepared_statements_cache_size > 0 in {self.mode} pooling mode")
            return None
        if kind == 68:  # Describe of a named statement
            if data[pos + 6] == 0:
                return self._unnamed_guard(data, pos, end, server, DESCRIBE)
            if named:
                replaced = self._describe(data, pos, end, server)
                return UNCHANGED if replaced is None else replaced
            server.pending.append(DESCRIBE)
            return UNCHANGED
        if kind == 81:
            return self._own_query(data, pos, end, server)
        if kind == 67:  # Close of a named statement
            if named:
                name = bytes(data[pos + 6 : end - 1])
                if server.skipping and not server.pending:
                    return b""  # PostgreSQL skips it (an error before, no Sync yet): it stays
                closed = self._closing(name, server)
                if server.pending:  # answered in order, or skipped (then: on_close_skipped)
                    server.synth_closes.append((closed, name))
                self._synthetic(server, SYNTH_CLOSE)
                return b""
            server.pending.append(CLOSE)
            return UNCHANGED
        self.fatal(codes.PROTOCOL_VIOLATION, f"invalid frontend message type {kind}")
        return None

    def _terminated(self) -> None:
        """Everything before the client's Terminate (or bad message) is answered: it goes."""
        if self._final_error is not None:
            self.fatal(*self._final_error)
        else:
            self.close("client close request")

    def _terminate(self, server: ServerConn) -> None:
        """Terminate, after requests the server has not answered yet: PostgreSQL would answer them
        and then close, so the client gets those replies first."""
        self._terminating = _RECEIVED
        if self._skip or (not server.pending and (server.skipping or not (
                server.unsynced or server.copy_in))):
            # Nothing to wait for (a backend skipping until Sync ignores Terminate too), or a
            # message half written that will never be finished: the server goes with the client.
            self._terminated()
            return
        if not self.transport.is_closing():
            self.transport.pause_reading()  # nothing after Terminate counts
        if server.unsynced or server.copy_in or server.doubt:
            # The server goes with this client (it could not be made clean): it finishes what it
            # was sent, ends at the Terminate, and its replies reach the client until it closes.
            assert server.transport is not None
            server.transport.write(m.TERMINATE)
            # Never lent again, whatever the replies say: a COPY that fails before the server
            # reads the Terminate ends normally, and the server then takes the Terminate as its end
            server.doubt = "the client's Terminate was passed on to it"
            self._terminating = _INTO_COPY if server.copy_in else _FORWARDED
        # else: on_ready closes the client once the replies are in; the server is then reused.

    # --- events from the server ---

    def on_verified(self, failed: bool) -> None:
        """The hidden Describe of a re-prepared statement was answered (failed: its Parse failed
        and the server now skips until Sync): send what was held behind it."""
        held, self._verify_hold = self._verify_hold, None
        server = self.server
        if held is None or server is None or self.state == CLOSED:
            return
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._no_verify = failed  # the server skips it all anyway: never wait for a reply
        try:
            self._forward(held, server)
        finally:
            self._no_verify = False

    def on_ready(self, status: int) -> None:
        """The server answered everything we sent and reports its transaction status."""
        self.in_transaction = status != _STATUS_IDLE
        if self._charged:  # what it held while its requests waited has gone to the server
            self._recharge()
        if self._notes is not None:  # notifications that came during the reply, right after it
            self._deliver_notes()
        if self._terminating:  # everything before the client's Terminate is answered
            self._terminated()
            return
        if self.mode == SESSION:
            if self.app.handing_over and status == _STATUS_IDLE:
                self.app.hand_over_soon(self)
            return
        server = self.server
        assert server is not None
        if status == _STATUS_IDLE:
            if self._skip or server.unsynced or server.copy_in:
                return  # not done with it yet: released once it is (see _message_done)
            if server.settings_dirty:
                # Its session settings may have changed: read them back first; they follow
                # the client to whichever server it is lent next (on_ready comes again).
                server.settings_dirty = False
                server.capture(session_settings_sql(self._custom) + HELD_SQL + PREPARED_SQL + LISTEN_SQL,
                               self._settings_read)
                return
            if server.listening:  # its LISTENs move to the pool's listener first (frontend/notify.py)
                listener = server.pool.listener
                if listener is not None and not listener.covers(self.channels):
                    # It keeps this server, which delivers them, until on_listening; an UNLISTEN
                    # here meanwhile is read back.
                    server.settings_dirty = True
                    return
                server.listening = False
                server.send_hidden("UNLISTEN *")
                return
            if self._pinned:  # state that cannot move: it keeps this server (frontend/pins.py)
                server.settings_dirty = True  # and looks again after its next transaction
                if self.app.handing_over:
                    self.app.hand_over_soon(self)
                return
            self.server = None
            if server.session_reset or self._reset_always:
                server.client = None
                self._give_back(server)
            else:
                server.pool.release(server)  # (which unlinks it from this client)
            if self.app.handing_over:  # an upgrade: between transactions, it moves now
                self.app.hand_over_soon(self)
        elif self.mode == STATEMENT:
            self.fatal(codes.FEATURE_NOT_SUPPORTED,
                       "transaction blocks not allowed in statement pooling mode")

    def note_settings(self, server: ServerConn, sql: bytes | bytearray) -> None:
        """A request that may change session settings: read them back after its transaction,
        custom ones by the names it gives. (One that only calls nextval/setval marks the server
        for DISCARD SEQUENCES before its next other client instead.)"""
        text = bytes(sql).lower()
        if any(mark in text for mark in SEQUENCE_MARKS):
            server.sequences_used = True
            if not changes_settings(text):
                return
        server.settings_dirty = True
        for name in custom_names(sql):
            if name not in self._custom and len(self._custom) < MAX_CUSTOM_NAMES:
                self._custom.append(name)

    def _settings_read(self, rows: list[list[str | None]] | None) -> None:
        """SESSION_SETTINGS_SQL's answer on the server this client was lent."""
        server = self.server
        if rows is None or server is None:  # failed: the server is reset and replayed next time
            log.warning("%s: reading the session settings back failed", self.id)
            return
        # What RESET goes back to is the client's startup value, as directly.
        settings = session_settings(rows, server.pool.server_user, self._initial)
        if settings != self.settings:
            log.info("%s: session settings now: %s", self.id,
                     ", ".join(f"{name}={value}" for name, value in settings) or "defaults")
        self.settings = server.settings = settings
        server.settings_unknown = True  # a setting no query shows may be left: reset first next time
        prepared, stuck = read_prepared(rows)
        if prepared != self.prepared_sql:
            log.info("%s: SQL prepared statements now: %s", self.id,
                     ", ".join(name for name, _ in prepared) or "none")
        self.prepared_sql = server.prepared_sql = prepared
        if stuck:
            log.info("%s: SQL prepared statements that cannot move: %s", self.id, ", ".join(stuck))
        self._held_state(held_state(rows, server.loaded, bool(stuck)), server)
        self._channels_read(channels_read(rows), server)

    def _channels_read(self, found: frozenset[str], server: ServerConn) -> None:
        """The channels its server listens to after its transaction: they join its subscription
        on the pool's listener. A server that listens for it has all of its channels, so there
        what PostgreSQL shows is the subscription (UNLISTEN included)."""
        channels = found if server.listening else self.channels | found
        if found and channels != found:  # give it the rest too, so that it stays so
            server.send_hidden(listen_sql(channels - found))
        server.listening = bool(found)
        self._heard_here = found
        if channels == self.channels:
            return
        pool = server.pool
        if pool.listener is None:
            pool.listener = Listener(pool)
        old, self.channels = self.channels, channels
        log.info("%s: listens to: %s", self.id, ", ".join(sorted(channels)) or "nothing")
        pool.listener.update(self, old, channels)

    def deliver(self, message: bytes, channel: str | None) -> None:
        """A notification on channel (or the listener's NOTICE, channel None) for this client:
        now if no reply is on the way to it, else right after the current one (on_ready)."""
        if self.state == CLOSED:
            return
        server = self.server
        if server is not None and server.listening and channel in self._heard_here:
            # Committed before that server's UNLISTEN (not sent yet): it brings this one itself.
            return
        if server is None or not server.pending:
            self.transport.write(message)
        elif self._notes is None:
            self._notes = [(channel, message)]
        else:
            self._notes.append((channel, message))

    def _deliver_notes(self) -> None:
        """The notifications held during a reply, but none of a channel it UNLISTENed meanwhile
        (known from the read-back that may have come with the reply)."""
        notes, self._notes = self._notes or (), None
        channels = self.channels
        out = b"".join(message for channel, message in notes if channel is None or channel in channels)
        if out:
            self.transport.write(out)

    def _show_channels(self, data: bytes | bytearray, server: ServerConn) -> None:
        """A request that mentions "listen" (UNLISTEN, pg_listening_channels()) must see this
        client's channels on its server, as directly: LISTEN them there first, in a transaction
        of the pooler's own (so only between the client's transactions), and read back after."""
        lowered = data.lower()
        if self.mode == SESSION or b"listen" not in lowered:
            return
        if server.listening:  # it has them all already: read back after this request
            server.settings_dirty = True
            return
        if (self._skip or self._drop or server.status != _STATUS_IDLE or server.unsynced
                or server.copy_in or not _only_pooler_queries(server.pending)):
            if b"unlisten" in lowered:
                log.warning("%s: an UNLISTEN inside a transaction the pooler cannot see: it keeps"
                            " listening to %s (use autocommit for UNLISTEN)", self.id,
                            ", ".join(sorted(self.channels)))
            return
        server.send_hidden(listen_sql(self.channels))
        server.listening = server.settings_dirty = True
        self._heard_here = frozenset()

    def on_listening(self) -> None:
        """The pool's listener confirmed channels of this client: give back a server kept for them."""
        server = self.server
        if server is not None and server.listening and not server.pending and server.status == _STATUS_IDLE:
            # Nothing ran since on_ready kept it (else a request would be pending or its reply's
            # on_ready would have read back): the mark it left for an UNLISTEN is not needed.
            server.settings_dirty = False
            self.on_ready(_STATUS_IDLE)

    def traffic(self) -> tuple[int, int]:
        """Bytes (from it, to it) its socket carried while here: read from the kernel, so the relay
        counts nothing per read (metrics/tcpbytes.py)."""
        transport = self.transport
        if transport is None:
            return 0, 0
        received, sent = socket_bytes(transport.get_extra_info("socket"))
        if received or sent:
            self.bytes_final = (received, sent)
        elif self.bytes_final is not None:  # the socket is gone: its last count (at EOF, or asked)
            received, sent = self.bytes_final
        base_received, base_sent = self.bytes_base
        return max(0, received - base_received), max(0, sent - base_sent)

    def pinned_by(self) -> str:
        """What its session holds that keeps it on its server ("" when nothing)."""
        return self._pinned

    def _held_state(self, held: str, server: ServerConn) -> None:
        """What the session holds that cannot move (frontend/pins.py): pin, unpin or refuse."""
        pool = server.pool
        if held:
            server.session_reset = "DISCARD ALL"  # before anyone else gets this server
            refused = refusal(held, self.mode, self._pin_policy)
            if refused is not None:
                log.warning("%s: refused: its session holds %s", self.id, held)
                # Now, before anything else of this client runs: its close gives the server back,
                # reset (or closed, with requests of the client in flight).
                self.fatal(*refused)
                return
            if not self._pinned:
                pool.pinned += 1
                log.info("%s: pinned to %s: its session holds %s", self.id, server.id, held)
            elif held != self._pinned:
                log.info("%s: still pinned to %s: its session holds %s", self.id, server.id, held)
        elif self._pinned:
            pool.pinned -= 1
            log.info("%s: unpinned from %s: its session holds nothing that cannot move",
                     self.id, server.id)
        self._pinned = held

    def on_copy_in(self) -> None:
        """COPY FROM STDIN started. A Terminate already forwarded behind the request that started
        it is read inside COPY: PostgreSQL ends the session with its own ERROR and FATAL, which
        the client must get (even when the ERROR arrives in the same read as CopyInResponse)."""
        if self._terminating == _FORWARDED:
            self._terminating = _INTO_COPY

    def on_stalled(self, copy_in: bool) -> None:
        """The server waits for this client: it skips input until Sync after an error (every
        reply owed already relayed), or COPY FROM STDIN waits for data. After a Terminate or a
        half-close that is the end: PostgreSQL ignores Terminate while skipping, and ends a COPY
        at the client's EOF; it would close when the client closes. (A Terminate the server
        reads inside COPY ends it with its own FATAL error, which the client gets.)"""
        terminating = self._terminating
        if terminating == _INTO_COPY or copy_in and terminating == _FORWARDED:
            self._terminating = _INTO_COPY  # the server reads the Terminate inside COPY
        elif terminating:
            self._terminated()

    def on_server_lost(self, server: ServerConn, reason: str) -> None:
        if self.server is server:
            self.server = None
            if self._terminating:  # the server ended after answering, as this client asked
                if server.said_fatal:  # (its own FATAL is the client's last word, not ours)
                    self.close("client close request, and the server ended with its FATAL error")
                else:
                    self._terminated()
                return
            if server.said_fatal:  # the client has the server's own FATAL error already
                self.close(f"server connection lost after its FATAL error: {reason}")
                return
            self.fatal(codes.CONNECTION_FAILURE, f"server connection lost: {reason}")

    def on_parameter_status(self, name: str, value: str) -> None:
        self.params[name] = value
        self.tracked = with_tracked(self.tracked, name, value)
        if self.settings:
            self.settings = followed(self.settings, name, value)

    # --- closing ---

    def fatal(self, code: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
        """Send a FATAL ErrorResponse and close: the client's session cannot go on."""
        if self.state == CLOSED:
            return
        log.info("%s: %s error %s: %s", self.id, self.peer, code, message)
        if self._tls_state not in (_TLS_REQUESTED, _TLS_DIRECT):  # mid-handshake it cannot be read
            self.transport.write(m.error_response(code, message, "FATAL", detail, hint))
        self.close(message)

    def close(self, reason: str) -> None:
        if self.state == CLOSED:
            return
        self._finish(reason)
        self.transport.close()

    def hand_over(self) -> None:
        """The connection now belongs to another protocol object (the admin console): stop being
        a client without closing it."""
        self.state = CLOSED
        self._cancel_timer()
        self.app.client_disconnected(self)

    def _close_quietly(self) -> None:
        self.state = CLOSED
        self._cancel_timer()
        self.app.client_disconnected(self)
        self.transport.close()

    def _finish(self, reason: str) -> None:
        if self.state == CLOSED:
            return
        was_active = self.state == ACTIVE
        self.state = CLOSED
        if self._charged or self._charged_out or self._charged_srv:
            self.app.memory.change(-self._charged - self._charged_out - self._charged_srv)
            self._charged = self._charged_out = self._charged_srv = 0
        self._cancel_timer()
        self.app.cancels.unregister(self)
        self.app.client_disconnected(self)
        if self.pool is not None:
            self.pool.clients -= 1
            if self._counted:
                self._counted = False
                self.app.client_uncounted(self.login_user, self.pool.cfg.name)
            received, sent = self.traffic()
            self.pool.stats.received += received
            self.pool.stats.sent += sent
            if self._pinned:
                self.pool.pinned -= 1
            if self.channels and self.pool.listener is not None:
                self.pool.listener.drop(self)
            self.pool.cancel_wait(self)
            self._return_server()
        if was_active and not self.app.config.general.log_client_disconnections:
            return
        age = time.monotonic() - self.connected_at
        log.info("%s: %s closing because: %s (age=%.0fs)", self.id, self.peer, reason, age)

    def _return_server(self) -> None:
        """Give the server back clean: roll back, reset (session mode), or close if unsure."""
        server, pool = self.server, self.pool
        self.server = None
        if server is None or pool is None:
            return
        server.client = None
        if server.closed:
            return
        if server.pending and (self._terminating or _only_pooler_queries(server.pending)) and not (
                self._skip or server.unsynced or server.copy_in or server.doubt):
            # The client said goodbye after its last requests, as it may: PostgreSQL would run
            # them, so the server finishes them (replies dropped), then is reset as usual.
            server.on_idle = self._give_back_drained
            asyncio.get_running_loop().call_later(DRAIN_TIMEOUT, _close_if_stuck, server)
            return
        if (server.pending or self._skip or server.unsynced or server.skipping or server.copy_in
                or server.doubt):
            # Something is in flight, half written, or inside an open batch: nothing the pooler
            # sends could make this server clean for sure (a Sync would commit the batch).
            server.close("client left while the server was not ready: "
                         + server.why_not_reusable(bool(self._skip)))
            return
        self._give_back(server)

    def _give_back_drained(self, server: ServerConn) -> None:
        """The requests of a client that said goodbye are answered: the server goes back only if
        that left it clean (an error in an unsynced batch leaves it skipping until a Sync, where it
        would ignore the reset, and everyone waiting for it would wait for nothing)."""
        if server.pending or server.unsynced or server.skipping or server.copy_in or server.doubt:
            server.close("after its client's last requests: " + server.why_not_reusable(False))
            return
        self._give_back(server)

    def _give_back(self, server: ServerConn) -> None:
        """Return a server with nothing owed to the pool, first undoing what this client left on
        it: an open transaction, its settings (transaction mode), everything (session mode)."""
        pool = self.pool
        assert pool is not None
        if server.loaded:  # no reset unloads a library (LOAD): this backend is not lent again
            server.close("a client loaded a library into it (LOAD)")
            return
        queries = []
        if server.status != _STATUS_IDLE:
            queries.append("ROLLBACK")
        reset = pool.cfg.server_reset_query
        if self.mode == SESSION:
            if reset:
                queries.append(reset)
                server.statements.clear()
        else:
            if server.session_reset:
                queries.append(server.session_reset)
            elif server.listening:
                queries.append("UNLISTEN *")
            server.listening = False
            if reset and self.app.config.general.server_reset_query_always:
                queries.append(reset)
        server.session_reset = ""
        if not queries:
            pool.release(server)
            return
        server.on_idle = pool.release
        for sql in queries:
            server.send_hidden(sql)
        asyncio.get_running_loop().call_later(RESET_TIMEOUT, _close_if_stuck, server)

    # --- moving to another worker (the acceptor balances waiting clients between workers) ---

    def movable(self) -> bool:
        """Waiting for a server between transactions, with nothing half-read or half-written."""
        pool = self.pool
        return (self.waiting and self.state == ACTIVE and self.server is None and self.mode != SESSION
                and pool is not None and pool.passthrough is None  # (its ClientKey is this worker's)
                and not self._terminating and not self.channels  # (its subscription stays here)
                and self._held is not None and not self._partial and not self._skip and not self._paused
                and self._verify_hold is None and not self._drop and self.tls is None  # (its TLS session)
                and not self.transport.get_write_buffer_size())

    def detach_socket(self) -> int:
        """Stop being this worker's client without closing the connection: a duplicate of its fd."""
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        self.state = CLOSED  # connection_lost after the close below is then a no-op
        self._cancel_timer()
        self.app.client_moved_out(self)
        self.transport.close()  # only our fd: nothing is pending in either direction
        return fd

    def detach(self) -> tuple[int, dict[str, Any]]:
        """Leave this worker with the connection open: (a duplicate of the socket's fd, the state
        another worker's ClientConn(moved=state) continues from). The request it was waiting to send
        goes along; the new worker queues it again."""
        assert self._held is not None
        state = self._leave()
        return self.detach_socket(), state

    def can_hand_over(self) -> bool:
        """At an idle point an upgrade's successor can continue from: between transactions (or
        waiting for a server), nothing half read or half written, no TLS session (it lives in this
        process); a server it holds (session mode, a pinned client) idle and in clear text too.
        A LISTENing client of a transaction pool stays: a notification sent while it moved would be
        lost, and losing one silently is worse than the disconnect at the end of the drain."""
        pool = self.pool
        if not (self.state == ACTIVE and pool is not None and not pool.removed and self.tls is None
                and not self._terminating and not self.channels and self._notes is None
                and not self._partial and not self._skip and not self._paused and self._verify_hold is None
                and not self._drop and not self.transport.get_write_buffer_size()):
            return False
        server = self.server
        if server is None:
            return self._held is None or self.waiting
        return (self._held is None and not self.in_transaction and server.client is self and server.movable()
                and (self.mode == SESSION or bool(self._pinned)))

    def hand_over_state(self) -> tuple[list[int], dict[str, Any]]:
        """Leave this process for an upgrade's successor (can_hand_over() held): the fds of its
        socket and of the server it holds (if any), and the state ClientConn(moved=state) continues
        from."""
        server, pool = self.server, self.pool
        assert pool is not None
        state = self._leave()
        state["startup"] = self._startup
        state["scram_keys"] = pool.scram_keys if pool.passthrough is not None else None
        state["lookup"] = pool.user_cfg.password if pool.looked_up else None
        state["pinned"] = self._pinned
        fds = []
        if server is not None:
            if self._pinned:
                pool.pinned -= 1
            self.server = None
            server.client = None
            state["server"] = server.export()
            fds.append(server.detach())
        return [self.detach_socket(), *fds], state

    def _leave(self) -> dict[str, Any]:
        """The state another process continues from (detach, hand_over_state); the pool forgets it."""
        pool = self.pool
        assert pool is not None
        state = {
            "id": self.id, "peer": self.peer, "database": pool.cfg.name, "user": pool.user,
            "params": self.params, "settings": self.settings, "initial": self._initial,
            "prepared_sql": self.prepared_sql, "custom": self._custom,
            "cancel_key": self.cancel_key,
            "connected_at": self.connected_at,
            "held": b"" if self._held is None else bytes(self._held),
            "stmts": [(name, stmt.key) for name, stmt in self.stmts.items()],
            "unnamed": self._unnamed_parse(),
            "wait_since": self.wait_since if self.waiting else 0.0,  # CLOCK_MONOTONIC: one clock for all
            "counted": self._counted,  # its place under the client caps moves with it
        }
        received, sent = self.traffic()
        pool.stats.received += received
        pool.stats.sent += sent
        base_received, base_sent = self.bytes_base
        state["bytes_base"] = (base_received + received, base_sent + sent)
        pool.cancel_wait(self)
        pool.clients -= 1
        self.app.cancels.unregister(self)
        if self._charged or self._charged_out or self._charged_srv:  # (what it held goes with it)
            self.app.memory.change(-self._charged - self._charged_out - self._charged_srv)
            self._charged = self._charged_out = self._charged_srv = 0
        return state

    def _arrive(self, state: dict[str, Any]) -> None:
        """The other half of detach() and hand_over_state(), in the new worker or process."""
        self._moved = None
        startup = state.get("startup") or {}
        pool = arrival_pool(self.app, state)
        self._looked_up_secret = pool is not None and pool.looked_up
        if pool is None:  # a reload or an upgrade took its pool out of the config
            self.fatal(codes.INTERNAL_ERROR, f'pool "{state["database"]}/{state["user"]}" not found after '
                       "moving to another pooler process")
            if self.server is not None:
                self.server.close("its client's pool is not in this pooler's config")
            return
        self._startup = dict(startup)
        keys = state.get("scram_keys")
        if keys is not None and pool.passthrough is not None and pool.scram_keys is None:
            pool.scram_keys = (keys[0], keys[1])
        self.peer = state["peer"]
        self.connected_at = state["connected_at"]
        self.last_active = time.monotonic()
        self._join(pool)
        self.params = state["params"]
        self.tracked = tracked_values(self.params)
        self.settings = tuple((name, value) for name, value in state["settings"])
        self._initial = tuple((name, value) for name, value in state.get("initial", ()))
        self.prepared_sql = tuple((name, text) for name, text in state.get("prepared_sql", ()))
        self._custom = list(state.get("custom", ()))
        self.stmts = {name: pool.registry.get(key) for name, key in state["stmts"]}
        self._unnamed = state.get("unnamed")
        pid, key = state["cancel_key"]
        self.cancel_key = (pid, key)
        received, sent = state.get("bytes_base", (0, 0))
        self.bytes_base = (received, sent)
        self.app.cancels.adopt(self)
        self._counted = bool(state.get("counted"))
        self.state = ACTIVE
        self.app.client_connected(self)
        server = self.server
        if "server" in state and (server is None or server.closed):
            self.fatal(codes.NOT_HANDED_OVER, "its server connection was lost while the pooler was upgraded")
            return
        if server is not None:  # handed over with its client (session mode, a pinned client)
            server.client = self
            server.last_client = self
            pinned = state.get("pinned") or ("" if pool.mode == SESSION
                                             else "a session begun in session mode")
            if pinned:  # (a pool now in transaction mode: it keeps its server until it holds nothing)
                self._pinned = pinned
                pool.pinned += 1
                server.session_reset = "DISCARD ALL"
                server.settings_dirty = pool.mode != SESSION
            if server.transport is not None:
                server.transport.resume_reading()  # (paused since it was adopted: ServerConn.adopted)
            return
        held = state["held"]
        if held:
            self._held = held
            self._need_server(state["wait_since"])

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


RESET_TIMEOUT = 10.0
DRAIN_TIMEOUT = 60.0  # a server finishing the requests of a client that sent Terminate
_AUTH_OK = m.authentication(codes.AUTH_OK)
HOLD_LIMIT = 1 << 18  # bytes buffered while waiting for a server before we stop reading
MAX_MESSAGE = 0x3FFFFFFF  # PostgreSQL's PQ_LARGE_MESSAGE_LIMIT (1 GB)


_NO_REPLY_KINDS = frozenset(b"dcfH")
# First bytes of a request _need_server looks at: Terminate, _NO_REPLY_KINDS, Parse.
_LOOK_FIRST = bytes(1 if kind in _NO_REPLY_KINDS or kind in b"XP" else 0 for kind in range(256))
_RECEIVED, _FORWARDED, _INTO_COPY = 1, 2, 3  # ClientConn._terminating
_MALFORMED_KIND = {66: BIND, 80: PARSE, 68: DESCRIBE, 67: CLOSE}


def arrival_pool(app: App, state: dict[str, Any]) -> Pool | None:
    """The pool a client moved from another worker or process (ClientConn.hand_over_state) joins:
    a user auth_query found gets its pool made again from the secret that came along."""
    pool = app.pool_for(state["database"], state["user"])
    secret = state.get("lookup")
    if pool is None and secret is not None and state["database"] in app.lookups:
        user = (state.get("startup") or {}).get("user", state["user"])
        answer = Answer(FOUND, parse_secret(secret, user), text=secret)
        pool = app.looked_up_pool(state["database"], user, answer)
    return pool


def _whole_and_well_formed(held: bytes | bytearray) -> bool:
    end = 1 + _unpack_len(held, 1)[0]
    return len(held) >= end and _well_formed(held, 0, end)


def _well_formed(data: bytes | bytearray, pos: int, end: int) -> bool:
    """Whether the strings a Bind, Parse, Describe or Close starts with end inside the message:
    two for Bind and Parse (names, or name and text), a type byte and a name for the others."""
    kind, at = data[pos], pos + 5
    if kind == 68 or kind == 67:
        return end >= at + 2 and data[at] in b"SP" and data.find(0, at + 1, end) == end - 1
    first = data.find(0, at, end)
    return first >= 0 and data.find(0, first + 1, end) >= 0
_SPECIAL_KINDS = frozenset(b"BPDQC")  # the requests _special_request judges (with Terminate, all valid)


def _whole_no_reply_prefix(data: bytes | bytearray) -> int:
    """How many leading bytes of data are whole CopyData/CopyDone/CopyFail/Flush messages."""
    pos, n = 0, len(data)
    while pos + 5 <= n and data[pos] in _NO_REPLY_KINDS:
        end = pos + 1 + _unpack_len(data, pos + 1)[0]
        if end > n:
            break
        pos = end
    return pos


def _only_pooler_queries(pending: bytearray) -> bool:
    """Only the pooler's own queries are owed (reading settings back): a client that leaves now
    leaves the server clean once they are answered."""
    return all(kind == HIDDEN_ROWS or kind == HIDDEN_QUERY for kind in pending)


def _close_if_stuck(server: ServerConn) -> None:
    if server.on_idle is not None and not server.closed and server.client is None:
        server.on_idle = None
        server.close("reset query did not finish in time")
