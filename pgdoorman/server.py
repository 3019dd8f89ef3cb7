"""The server side: connect and authenticate to PostgreSQL, then relay replies to the lent client.

While lent, every request the client sent is tracked in `pending` (one small int per message that
gets a reply), so the pooler knows when nothing is owed, which replies are its own to hide
(injected Parse/Close/SET) and where to insert replies it answers itself (Parse of a statement
the server already has, Close). Replies are forwarded chunk by chunk; a chunk is only copied when
something in it must be hidden or inserted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from pgdoorman import ids
from pgdoorman.auth import AuthFailed, ScramClient, md5_hash, md5_salted_response, tls_server_end_point
from pgdoorman.metrics.account import done, new_times
from pgdoorman.prepared import ServerStatements, Statement, row_shape
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m
from pgdoorman.protocol.scan import (
    BAD_LENGTH,
    BIND_NAMED,
    COPY_END,
    DESCRIBE,
    DESCRIBE_NAMED,
    EXECUTE,
    HIDDEN_BIND,
    HIDDEN_CLOSE,
    HIDDEN_DESCRIBE,
    HIDDEN_EXECUTE,
    HIDDEN_PARSE,
    HIDDEN_QUERY,
    HIDDEN_ROWS,
    PARSE,
    PARSE_NAMED,
    QUERY,
    REPLY_KINDS,
    STREAM,
    SYNC,
    SYNTH_CLOSE,
    SYNTH_DUE,
    SYNTH_FIRST,
    SYNTH_QUERY,
    grow_partial,
    message_need,
    scan_replies,
)
from pgdoorman.protocol.state import HAS_REF, ServerState
from pgdoorman.tcp import tune
from pgdoorman.tlswrap import reason, start_tls

if TYPE_CHECKING:
    import ssl

    from pgdoorman.pool import Pool

log = logging.getLogger("pgdoorman.server")
_unpack_len = struct.Struct("!I").unpack_from
_unpack_i32 = struct.Struct("!i").unpack_from
_SSL_REQUEST = struct.pack("!ii", 8, codes.SSL_REQUEST_CODE)
# Where its TLS stands: none, SSLRequest sent, handshaking, on
_NO_TLS, _TLS_ASKED, _TLS_HANDSHAKE, _TLS_ON = range(4)

SYNTH_REPLY = {SYNTH_CLOSE: m.close_complete()}

_Z, _E, _S, _A = 90, 69, 83, 65  # ReadyForQuery, ErrorResponse, ParameterStatus, NotificationResponse
_STATUS_IDLE = 73  # 'I'
_CACHED_PLAN_MSG = b"cached plan must not change result type"
# ServerConn.raise_error: a one-shot statement of the pooler's (closed first: a previous one may
# still be there, its Close skipped after its own error).
_FLUSH = m.message(b"H")
_CHECK_NAME = b"PGDOORMAN_check"
_CHECK_CLOSE = m.close_statement(_CHECK_NAME)
_SYNTAX_CHECK = Statement(b"", _CHECK_NAME, b"", _CHECK_CLOSE)  # the ref of check_syntax's Parse
# The ref of a client's unnamed Parse sent again on another server (client._unnamed_guard).
UNNAMED_REPARSE = Statement(b"", b"", b"", b"")
_RAISE_NAME = b"PGDOORMAN_raise"
_RAISE_CLOSE = m.close_statement(_RAISE_NAME)
_RAISE_BIND_EXECUTE = m.message(b"B", _RAISE_NAME.join((b"\0", b"\0\0\0\0\0\0\0"))) + m.message(
    b"E", b"\0\0\0\0\0")
_RAISE_KINDS = bytes((HIDDEN_CLOSE, HIDDEN_PARSE, HIDDEN_BIND, HIDDEN_EXECUTE))

_STATUS_FAILED = 69  # 'E'
_IN_FAILED_TRANSACTION = m.error_response(
    codes.IN_FAILED_SQL_TRANSACTION,
    "current transaction is aborted, commands ignored until end of transaction block")

# Session settings clients may change and servers report with ParameterStatus: each client's values
# are SET on whichever server it is lent. Kept as a tuple so "same?" is one comparison per loan.
TRACKED_PARAMS = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "application_name")
_TRACKED_INDEX = {name: i for i, name in enumerate(TRACKED_PARAMS)}


def tracked_values(params: dict[str, str]) -> tuple[str | None, ...]:
    return tuple(params.get(name) for name in TRACKED_PARAMS)


def with_tracked(values: tuple[str | None, ...], name: str, value: str) -> tuple[str | None, ...]:
    """values with one tracked parameter changed (unchanged if name is not tracked)."""
    i = _TRACKED_INDEX.get(name)
    if i is None or values[i] == value:
        return values
    return values[:i] + (value,) + values[i + 1 :]


class ClientLink(Protocol):
    """What a server needs from the client it is lent to."""

    transport: asyncio.Transport

    def on_ready(self, status: int) -> None: ...
    def on_server_lost(self, server: ServerConn, reason: str) -> None: ...
    def on_parameter_status(self, name: str, value: str) -> None: ...
    def on_statements_discarded(self) -> None: ...
    def name_of(self, stmt: Statement) -> bytes | None: ...
    def on_parse_failed(self, name: bytes, stmt: Statement | None) -> None: ...
    def on_verified(self, failed: bool) -> None: ...
    def on_stalled(self, copy_in: bool) -> None: ...
    def on_copy_in(self) -> None: ...
    def on_query_skipped(self) -> None: ...
    def on_unnamed_parses_skipped(self, count: int) -> None: ...
    def held_by_server(self, size: int) -> bool: ...
    def on_close_skipped(self, stmt: Statement | None, name: bytes) -> None: ...


class ServerError(Exception):
    """Connecting or authenticating to PostgreSQL failed; carries what the client should see."""

    def __init__(self, message: str, code: str = codes.CONNECTION_FAILURE) -> None:
        super().__init__(message)
        self.code = code


class ServerConn(ServerState, asyncio.Protocol):
    __slots__ = (
        "_handshaking", "_inbuf", "_need", "_partial", "_scram", "_skip", "_synth_z", "backend_key",
        "backend_pid",
        "cancels_in_flight", "client", "closed", "created", "hidden_error", "id", "last_used",
        "listening", "loaded", "on_idle", "params", "parked", "pool", "prepared_sql", "ready",
        "last_client", "refuse_transactions", "said_fatal", "sequences_used",
        "session_reset", "settings", "settings_dirty", "settings_unknown", "statements", "tracked",
        "transport",
        "_rows", "_rows_done", "times", "acc", "hist", "stats", "generation", "checking",
        "tls", "_tls_state", "_cbind", "_adopted",
    )

    def __init__(self, pool: Pool) -> None:
        self.id = ids.server_id()
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: ClientLink | None = None
        self.init_state()  # pending, refs, status, ...: see protocol/state.py
        self.statements = ServerStatements(max(pool.prepared_cache_size, 1))
        self.params: dict[str, str] = {}
        self.tracked: tuple[str | None, ...] = ()
        self.backend_pid = 0
        self.backend_key = 0
        self.created = time.monotonic()
        self.last_used = self.created
        self.stats = pool.stats
        # When the lent client's current request and transaction began (none: 0): set by the
        # client's relay, counted into the pool's acc/hist and cleared at the ReadyForQuery that
        # ends them (metrics/account.py).
        self.times = new_times()
        self.acc = pool.stats.acc
        self.hist = pool.stats.hist
        self.generation = pool.generation  # RECONNECT / a changed server address: replaced when released
        self.checking = False  # server_check_query in flight before it is lent
        self.cancels_in_flight = 0
        self.parked = False  # released while a cancel was in flight
        self.refuse_transactions = False  # lent in statement mode
        # What a client changed that the next one must not see; run before the server is reused.
        self.session_reset = ""
        self.loaded = False  # a client ran LOAD here (frontend/pins.py)
        # A client's nextval/setval (or INSERT) may have set currval/lastval here: the next other
        # client lent it gets DISCARD SEQUENCES first, so it sees 55000 as on a connection of its own.
        self.sequences_used = False
        self.last_client: object = None
        # It LISTENs for its lent client: UNLISTEN * before anyone else gets it (frontend/notify.py).
        self.listening = False
        # A reply showed the lent client may have changed its session settings (SET, RESET,
        # DISCARD, DO): the client reads them back before the server is given back.
        self.settings_dirty = False
        # What a client left may include settings the pooler cannot see (a custom setting SET
        # inside a function): the next replay resets everything first.
        self.settings_unknown = False
        self._rows: list[list[str | None]] | None = None  # capture(): the rows so far
        self._rows_done: Callable[[list[list[str | None]] | None], None] | None = None
        # The ErrorResponse fields of the last failed pooler query (send_hidden); the login probe of
        # a client's startup settings reads it.
        self.hidden_error: dict[str, str] | None = None
        # The other settings replayed here for clients (frontend/settings.py), as (name, value).
        self.settings: tuple[tuple[str, str], ...] = ()
        # The SQL prepared statements here, as the last client lent it had them (frontend/sqlprepare.py).
        self.prepared_sql: tuple[tuple[str, str], ...] = ()
        self.closed = False
        self.said_fatal = False  # it sent a FATAL ErrorResponse (its EOF follows)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_idle: Callable[[ServerConn], None] | None = None  # reset done; else released to pool
        self._handshaking = True
        self._inbuf = bytearray()
        self._scram: ScramClient | None = None
        self._partial: bytes | bytearray = b""  # an incomplete message the pooler must see whole
        self._need = 0  # the length _partial must reach before it is scanned
        self._skip = 0
        self._synth_z = -1  # status of a ReadyForQuery the pooler just answered itself (SYNTH_QUERY)
        self.tls: ssl.SSLObject | None = None  # its TLS session (backend/tls.py)
        self._tls_state = _NO_TLS
        self._cbind: bytes | None = None  # the server certificate's tls-server-end-point
        self._adopted = False  # logged in by an older pooler, which handed it over (upgrade)

    # --- handshake ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._adopted:  # logged in already, idle: read nothing until its client is here too
            self.transport.pause_reading()  # (a notification then reaches the client, not the void)
            return
        if self._tls_state == _TLS_HANDSHAKE:  # the SSL protocol: the handshake is done
            self._tls_on()
            return
        sock = transport.get_extra_info("socket")
        tcp = sock is not None and sock.family != socket.AF_UNIX
        if tcp:
            tune(sock, self.pool.general)
        if tcp and self.pool.tls.context is not None:
            self._tls_state = _TLS_ASKED
            self.transport.write(_SSL_REQUEST)
            return
        self._send_startup()

    def _tls_answer(self, data: bytes) -> None:
        """The server's one-byte answer to our SSLRequest."""
        tls = self.pool.tls
        answer, rest = data[:1], data[1:]
        if answer == b"S":
            if rest:  # CVE-2021-23222: nothing may come before the handshake
                self._fail_handshake(ServerError("received unencrypted data after SSL response"))
                return
            assert tls.context is not None and self.transport is not None
            self._tls_state = _TLS_HANDSHAKE
            host = self.pool.cfg.server_host
            start_tls(self, self.transport, tls.context, server_side=False, failed=self._tls_failed,
                      timeout=self.pool.general.server_connect_timeout, server_hostname=tls.hostname(host))
        elif answer == b"N" and not tls.required:
            self._tls_state = _NO_TLS
            self._send_startup()
            if rest:
                self._handshake(rest)
        elif answer == b"N":
            self._fail_handshake(ServerError("server does not support SSL, but SSL was required"))
        else:  # an ErrorResponse from a server too old for SSLRequest, or garbage
            self._fail_handshake(ServerError(f"received invalid response to SSL negotiation: {answer!r}"))

    def _tls_on(self) -> None:
        assert self.transport is not None
        self._tls_state = _TLS_ON
        self.tls = self.transport.get_extra_info("ssl_object")
        der = self.tls.getpeercert(binary_form=True) if self.tls is not None else None
        if der and self.pool.tls.channel_binding != "disable":
            try:
                self._cbind = tls_server_end_point(der)
            except ValueError as exc:  # e.g. an Ed25519 certificate: PostgreSQL cannot bind either
                log.info("%s: %s no channel binding: %s", self.id, self.pool.name, exc)
        self._send_startup()

    def _tls_failed(self, exc: BaseException) -> None:
        self._fail_handshake(ServerError(f"TLS handshake with the server failed: {reason(exc)}"))

    def _send_startup(self) -> None:
        assert self.transport is not None
        params = {"user": self.pool.server_user, "database": self.pool.server_database}
        if self.pool.application_name:
            params["application_name"] = self.pool.application_name
        self.transport.write(m.startup_message(params))

    def _handshake(self, data: bytes) -> None:
        if self._tls_state == _TLS_ASKED:
            self._tls_answer(data)
            return
        self._inbuf += data
        buf = self._inbuf
        while len(buf) >= 5:
            length = _unpack_len(buf, 1)[0]
            if len(buf) < length + 1:
                return
            kind, body = buf[0], bytes(buf[5 : length + 1])
            del buf[: length + 1]
            try:
                self._handshake_message(kind, body)
            except (AuthFailed, ServerError, m.ProtocolError, ValueError) as exc:
                code = exc.code if isinstance(exc, ServerError) else codes.CONNECTION_FAILURE
                self._fail_handshake(ServerError(str(exc), code))
                return
            if not self._handshaking:
                if buf:
                    rest, self._inbuf = bytes(buf), bytearray()
                    self.data_received(rest)
                return

    def _handshake_message(self, kind: int, body: bytes) -> None:
        if kind == ord("R"):
            self._auth_request(_unpack_i32(body, 0)[0], body[4:])
        elif kind == _S:
            name, value = m.parse_parameter_status(body)
            self.params[name] = value
        elif kind == ord("K"):
            self.backend_pid, self.backend_key = struct.unpack("!ii", body[:8])
        elif kind == _Z:
            self._handshaking = False
            self.status = body[0]
            self.tracked = tracked_values(self.params)
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == _E:
            fields = m.parse_error_fields(body)
            raise ServerError(fields.get("M", "server error"), fields.get("C", codes.CONNECTION_FAILURE))
        elif kind == ord("v"):
            pass  # NegotiateProtocolVersion: we asked for nothing optional
        elif kind != ord("N"):
            raise ServerError(f"unexpected message {chr(kind)!r} during server login")

    def _auth_request(self, code: int, data: bytes) -> None:
        assert self.transport is not None
        password = self.pool.server_password
        if self.pool.tls.channel_binding == "require" and code in (
                codes.AUTH_OK, codes.AUTH_CLEARTEXT, codes.AUTH_MD5) and not self._scram:
            # libpq's channel_binding=require: only a SCRAM-SHA-256-PLUS login is good enough
            raise ServerError("channel binding required, but server authenticated client without "
                              "channel binding")
        if code == codes.AUTH_OK:
            return
        if password is None and self.pool.passthrough is not None:
            self._passthrough_auth(code, data)
            return
        if password is None:
            raise ServerError(f"no password for server login of user \"{self.pool.server_user}\"",
                              codes.INVALID_PASSWORD)
        if code == codes.AUTH_CLEARTEXT:
            self.transport.write(m.password_message(m.cstr(password)))
        elif code == codes.AUTH_MD5:
            pool = self.pool
            hashed = password if pool.server_password_is_md5 else md5_hash(password, pool.server_user)
            self.transport.write(m.password_message(m.cstr(md5_salted_response(hashed, data[:4]))))
        elif code == codes.AUTH_SASL:
            if self.pool.server_password_is_md5:
                raise ServerError(f'the server asks user "{self.pool.server_user}" for SCRAM, but the pooler '
                                  "holds only an md5 hash of its password (give the plain text, or md5 on "
                                  "the server)", codes.INVALID_PASSWORD)
            offered = [name.decode("ascii", "replace") for name in data.split(b"\0") if name]
            mechanism = ScramClient.choose_mechanism(offered, self._cbind,
                                                     self.pool.tls.channel_binding == "require")
            self._scram = ScramClient(password, cbind_data=self._cbind, mechanism=mechanism)
            self.transport.write(m.sasl_initial_response(mechanism, self._scram.client_first()))
        elif code == codes.AUTH_SASL_CONTINUE and self._scram:
            self.transport.write(m.password_message(self._scram.handle_server_first(data)))
        elif code == codes.AUTH_SASL_FINAL and self._scram:
            self._scram.verify_server_final(data)
        else:
            raise ServerError(f"unsupported server authentication request {code}")

    def _passthrough_auth(self, code: int, data: bytes) -> None:
        """Log in with the ClientKey a client's SCRAM proof gave us (Pool.scram_keys)."""
        assert self.transport is not None
        pool = self.pool
        verifier = pool.passthrough
        assert verifier is not None
        if code == codes.AUTH_SASL:
            if pool.scram_keys is None:
                raise ServerError(f'SCRAM pass-through for user "{pool.server_user}": no client has '
                                  "logged in with its password yet (a trust or cert login gives no key)",
                                  codes.INVALID_PASSWORD)
            offered = [name.decode("ascii", "replace") for name in data.split(b"\0") if name]
            mechanism = ScramClient.choose_mechanism(offered, self._cbind,
                                                     pool.tls.channel_binding == "require")
            client_key, server_key = pool.scram_keys
            self._scram = ScramClient.from_keys(client_key, server_key, salt=verifier.salt,
                                                iterations=verifier.iterations, cbind_data=self._cbind,
                                                mechanism=mechanism)
            self.transport.write(m.sasl_initial_response(mechanism, self._scram.client_first()))
        elif code == codes.AUTH_SASL_CONTINUE and self._scram:
            self.transport.write(m.password_message(self._scram.handle_server_first(data)))
        elif code == codes.AUTH_SASL_FINAL and self._scram:
            self._scram.verify_server_final(data)
        else:
            raise ServerError(f'the server asks user "{pool.server_user}" for authentication {code}, but '
                              "the pooler holds only a SCRAM verifier (pass-through needs scram-sha-256 "
                              "on the server)", codes.INVALID_PASSWORD)

    def _fail_handshake(self, exc: ServerError) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.close(f"login failed: {exc}")

    # --- relaying ---

    def data_received(self, data: bytes) -> None:
        if self._handshaking:
            self._handshake(data)
            return
        if self._partial:
            self._partial, whole = grow_partial(self._partial, data, self._need)
            if not whole:
                if self.client is not None:  # a reply read whole (ErrorResponse, FunctionCallResponse)
                    self.client.held_by_server(len(self._partial))
                return
            data, self._partial = self._partial, b""
            if self.client is not None:
                self.client.held_by_server(0)
        n = len(data)
        pos = self._skip
        if pos:  # the rest of a DataRow or CopyData streamed through
            if pos >= n:
                self._skip = pos - n
                self._emit(data)
                return
            self._skip = 0
        pending = self.pending
        out: bytearray | None = None  # built only when something is hidden or inserted
        copied = 0  # data[:copied] is already in out (or dropped)
        ready = -1
        while True:
            pos, result, skip, last_z = scan_replies(data, pos, pending, self.refs, self.client_names)
            if last_z >= 0:
                self.status = last_z
                if not pending:
                    ready = last_z
            if not result:  # DONE
                break
            if result == SYNTH_DUE:  # insert the pooler's own replies here
                if out is None:
                    out = bytearray()
                out += data[copied:pos]
                out += self._drain_synthetic()
                copied = pos
                if not pending and last_z >= 0:
                    ready = last_z  # only the pooler's own replies (or COPY markers) were left
                continue
            if result == STREAM:
                self._skip = skip
                break
            if result == BAD_LENGTH:
                self._broken(f"invalid message length {_unpack_len(data, pos + 1)[0]} from server "
                             f"(message type {data[pos]!r})")
                return
            end = pos + 1 + _unpack_len(data, pos + 1)[0]
            try:
                hide, extra = self._special_reply(data, pos, end)
            except (IndexError, m.ProtocolError) as exc:
                self._broken(f"malformed or unexpected message {chr(data[pos])!r} from server ({exc})")
                return
            if data[pos] == _Z and not pending:
                ready = self.status
            if hide or extra:
                if out is None:
                    out = bytearray()
                out += data[copied : pos if hide else end]
                out += extra
                copied = end
            pos = end
        if pos < n:
            self._partial = data[pos:]  # an incomplete message the pooler must see whole
            self._need = message_need(data, pos)
        if out is None:
            payload: bytes | bytearray = data if pos >= n else data[:pos]
        else:
            out += data[copied:pos]
            payload = out
        if self._synth_z >= 0:
            if not pending and ready < 0:
                ready = self._synth_z
            self._synth_z = -1
        if self.refuse_transactions and ready >= 0 and ready != _STATUS_IDLE:
            payload = b""  # statement mode: the client gets only the error, its session ends
        client = self.client
        if payload and client is not None:
            client.transport.write(payload)
        if ready >= 0:
            # metrics/account.py; its clock reading is last_used (_on_ready, inlined: once per transaction)
            self.last_used = done(self.times, self.acc, self.hist, ready == _STATUS_IDLE)
            if client is not None:
                client.on_ready(ready)
            elif self.on_idle is not None:
                callback, self.on_idle = self.on_idle, None
                callback(self)
        elif client is not None and (self.copy_in or self.skipping and not pending):
            client.on_stalled(self.copy_in)  # nothing more comes until the client sends Sync or COPY data

    def _special_reply(self, data: bytes, pos: int, end: int) -> tuple[bool, bytes]:
        """One reply the scanner left to us: returns (hide it, replies to insert after it)."""
        kind = data[pos]
        pending = self.pending
        if kind == _E and (b"VFATAL\0" in data[pos + 5 : end] or b"VPANIC\0" in data[pos + 5 : end]):
            self.said_fatal = True  # the server's own last word: the client needs no other
        if kind == _A:
            return False, b""  # a NotificationResponse is its client's, even amid the pooler's query
        if kind not in REPLY_KINDS:
            raise m.ProtocolError(f"unexpected message type {kind!r}")
        if not pending:
            if kind == _S or kind == _E:
                self._unsolicited(kind, data[pos + 5 : end])
            elif kind == _Z:
                self.status = data[pos + 5]
                self.doubt = "ReadyForQuery that no request was owed"
            elif kind != 78:  # only a NoticeResponse may come unasked (and S, E, A, handled above)
                raise m.ProtocolError(f"message type {kind!r} that no request was owed")
            return False, b""
        head = pending[0]
        hide = head == HIDDEN_QUERY or head == HIDDEN_ROWS
        popped = False
        extra = b""
        if kind == 68:  # a DataRow of the pooler's capture()
            if head == HIDDEN_ROWS and self._rows is not None:
                self._rows.append(m.data_row_values(data[pos + 5 : end]))
        elif kind == _Z:
            # The scanner stops here when the oldest owed is not the Query/Sync this answers:
            # the requests before it were skipped after an error (state.settle_ready).
            self.settle_ready()
            popped = True
            self.status = data[pos + 5]
            if head == HIDDEN_ROWS:
                rows, done = self._rows, self._rows_done
                self._rows = self._rows_done = None
                if done is not None:
                    done(rows)
        elif kind == 49:  # ParseComplete
            del pending[0]
            popped = True
            if head in HAS_REF:
                ref = self.refs.popleft()
                if ref is not None:
                    ref.confirmed = True
                if head == PARSE_NAMED:
                    self.client_names.popleft()
            hide = head == HIDDEN_PARSE
        elif kind == 50:  # BindComplete
            del pending[0]
            popped = True
            hide = head == HIDDEN_BIND
            if head in HAS_REF:
                self.refs.popleft()
                if head == BIND_NAMED:
                    self.client_names.popleft()
        elif kind == 51:  # CloseComplete
            del pending[0]
            popped = True
            hide = head == HIDDEN_CLOSE
        elif kind == 84 or kind == 110:  # RowDescription / NoData
            if head == DESCRIBE:
                del pending[0]
                popped = True
            elif head == DESCRIBE_NAMED or head == HIDDEN_DESCRIBE:
                del pending[0]
                popped = True
                hide = head == HIDDEN_DESCRIBE
                if head == DESCRIBE_NAMED:
                    self.client_names.popleft()
                self._described(self.refs.popleft(), row_shape(kind, data[pos + 5 : end]), hide)
        elif kind == 116:  # ParameterDescription (then RowDescription/NoData)
            hide = head == HIDDEN_DESCRIBE
        elif kind == 67 or kind == 73 or kind == 115:  # CommandComplete / EmptyQuery / Suspended
            if head == EXECUTE:
                del pending[0]
                popped = True
            if kind == 67:
                self._command_tag(data[pos + 5 : end - 1], hide)
        elif kind == _E:
            if head == BIND_NAMED or head == DESCRIBE_NAMED or head == PARSE_NAMED:
                renamed = self._in_client_terms(data[pos:end])
                if renamed is not None:
                    hide, extra = True, renamed
            elif head == HIDDEN_BIND or head == HIDDEN_EXECUTE or (
                    head == HIDDEN_PARSE and self.refs[0] is None):
                reply = self.raised[0]  # raise_error's: shown as the pooler words it, if it does
                if reply is not None:
                    hide, extra = True, reply
            popped = self._error(head, data[pos + 5 : end])
        elif kind == 71:  # CopyInResponse
            self.copy_in_started()
            if self.client is not None:
                self.client.on_copy_in()
        elif kind == 87:  # CopyBothResponse: replication only, which the pooler refuses
            self.doubt = "unexpected CopyBothResponse"
        elif kind == _S:
            self._parameter_status(data[pos + 5 : end], hide)
        if popped:
            extra += self._drain_synthetic()
        return hide, extra

    def _drain_synthetic(self) -> bytes:
        """The replies the pooler owes itself, now due (they are the oldest owed)."""
        pending = self.pending
        extra = b""
        while pending and pending[0] >= SYNTH_FIRST:
            kind = pending[0]
            del pending[0]
            if kind == SYNTH_QUERY:
                extra += self._synthetic_query(self.synth_replies.popleft())
            elif kind == SYNTH_CLOSE:
                self.synth_closes.popleft()  # answered: the Close happened
                extra += SYNTH_REPLY[kind]
            elif kind != COPY_END:  # a CopyDone/CopyFail marker: owed nothing
                extra += SYNTH_REPLY[kind]
        return extra

    def _in_client_terms(self, error: bytes) -> bytes | None:
        """An ErrorResponse about a shared statement names the pooler's server-side statement:
        the same error naming the client's own statement instead (None: nothing to change)."""
        stmt = self.refs[0]
        if stmt is None or self.client is None:
            return None
        quoted = b'"' + stmt.server_name + b'"'
        if quoted not in error:
            return None
        # The name the failing request used (client_names[0] is the head's), else any of the
        # client's names for the statement.
        name = self.client_names[0] if self.client_names else self.client.name_of(stmt)
        if name is None:
            return None
        body = error[5:].replace(quoted, b'"' + name + b'"')
        return m.message(b"E", body)

    def _synthetic_query(self, reply: bytes) -> bytes:
        """The pooler's answer to a simple Query, as PostgreSQL would give it now (status is
        current: everything before it has been answered)."""
        if self.status == _STATUS_FAILED:
            reply = _IN_FAILED_TRANSACTION
        self._synth_z = self.status
        return reply + m.ready_for_query(bytes((self.status,)))

    def synthetic_now(self, kind: int, reply: bytes = b"") -> bytes:
        """A synthetic reply due at once (nothing owed before it)."""
        if kind == SYNTH_QUERY:
            out = self._synthetic_query(reply)
            self._synth_z = -1
            return out
        return SYNTH_REPLY[kind]

    def _described(self, stmt: Statement, shape: bytes, hidden: bool) -> None:
        if stmt.shape is None:
            stmt.shape = shape
        elif hidden and shape != stmt.shape and not stmt.retired:
            # Re-prepared here after DDL changed its result: clients that were told the old
            # shape must get PostgreSQL's error, never rows of another shape.
            log.info("%s: statement %s changed result type: retired", self.id, stmt.server_name.decode())
            self.pool.registry.retire(stmt)
        if hidden and self.client is not None:
            self.client.on_verified(False)

    def _emit(self, data: bytes | bytearray) -> None:
        client = self.client
        if client is not None:
            client.transport.write(data)

    def _on_ready(self, status: int) -> None:
        self.last_used = time.monotonic()
        if self.client is not None:
            self.client.on_ready(status)
        elif self.on_idle is not None:
            callback, self.on_idle = self.on_idle, None
            callback(self)

    def _unsolicited(self, kind: int, body: bytes) -> None:
        if kind == _S:
            self._parameter_status(body, hide=False)
        elif self.client is None:
            fields = m.parse_error_fields(body)
            log.warning("%s: server says: %s %s", self.id, fields.get("C"), fields.get("M"))
            if self.said_fatal:  # its end (say, pg_terminate_backend): lend it to no one meanwhile
                self.close(f"server sent FATAL while idle: {fields.get('M')}")

    def _parameter_status(self, body: bytes, hide: bool) -> None:
        name, value = m.parse_parameter_status(body)
        self.params[name] = value
        self.tracked = with_tracked(self.tracked, name, value)
        if not hide and self.client is not None:
            self.client.on_parameter_status(name, value)

    def _command_tag(self, tag: bytes, hidden: bool) -> None:
        if tag in (b"DISCARD ALL", b"DEALLOCATE ALL"):
            self.statements.clear()
            self.prepared_sql = ()
            if tag == b"DISCARD ALL":
                self.settings = ()
            if self.client is not None:
                self.client.on_statements_discarded()
            if not hidden:
                self.settings_dirty = True
        elif hidden:
            if tag == b"RESET" and self.client is None:  # a reset between loans
                self.settings = ()
        elif tag == b"SET" or tag == b"RESET" or tag == b"DO":
            # SET/RESET of any kind (SET LOCAL too: cheap to check), or a DO block that may
            # have run one: PostgreSQL tells the client's settings after the transaction.
            self.settings_dirty = True
        elif tag == b"PREPARE" or tag == b"DEALLOCATE":
            self.settings_dirty = True  # the client's SQL prepared statements: read back, then follow it
        elif tag == b"LISTEN" or tag == b"DECLARE CURSOR":
            self.settings_dirty = True  # state that pins the client while it lasts (frontend/pins.py)
        elif tag[:7] == b"INSERT ":
            self.sequences_used = True  # a column default may have called nextval (currval/lastval)
        elif tag == b"LOAD":
            self.loaded = True  # a library loaded stays in this backend: never lent to another client
            self.settings_dirty = True

    def _error(self, head: int, body: bytes) -> bool:
        """An ErrorResponse: in extended protocol the server now skips everything until Sync."""
        self.copy_over()
        if head != HIDDEN_QUERY and head != HIDDEN_ROWS:
            self.stats.error(m.parse_error_fields(body).get("C", "XX000"))
        if head == QUERY or head == HIDDEN_QUERY or head == HIDDEN_ROWS:
            if head == HIDDEN_ROWS:
                self._rows = None  # capture() failed: its callback gets None
            if head != QUERY:
                fields = m.parse_error_fields(body)
                self.hidden_error = fields
                log.warning("%s: pooler query failed: %s", self.id, fields.get("M"))
                if head == HIDDEN_QUERY and self.client is not None:
                    # A replay failed part way (say, a PREPARE of a dropped table): what the client
                    # has here is read back after its transaction.
                    self.settings_dirty = True
            return False
        if (head == BIND_NAMED or head == DESCRIBE_NAMED) and b"C26000\0" in body:
            # The statement vanished behind the pooler's back (a DEALLOCATE it could not see):
            # this client gets the error; the next use prepares it here again.
            ref = self.refs[0]
            if ref is not None:
                self.statements.discard(ref)
        if head in HAS_REF and _CACHED_PLAN_MSG in body:
            # DDL changed its result type: from now on every use fails as on the client's own
            # connection, and the next Parse of that query makes a new statement.
            ref = self.refs[0]
            if ref is not None and not ref.retired:
                log.info("%s: statement %s changed result type: retired", self.id,
                         ref.server_name.decode())
                self.pool.registry.retire(ref)
        if head == PARSE and self.client is not None:
            # The client's unnamed Parse failed: directly it has no unnamed statement now.
            self.client.on_parse_failed(b"", None)
        elif self.client is not None:
            # Unnamed Parses of this batch after the failed request are skipped: directly the
            # client's unnamed statement is the last one before them (unless a later batch,
            # already sent, parses one again).
            pending = self.pending
            sync_at = pending.find(SYNC)
            skipped = pending.count(PARSE, 1, None if sync_at < 0 else sync_at)
            if skipped and (sync_at < 0 or pending.find(PARSE, sync_at) < 0):
                self.client.on_unnamed_parses_skipped(skipped)
        self.skip_to_sync()
        return True

    def skipped(self, kind: int, ref: Any) -> None:
        if kind == PARSE_NAMED:
            stmt, name = ref
            if stmt is _SYNTAX_CHECK:  # parse_in_place: the client's name is all there was
                stmt = None
            else:
                self.statements.discard(stmt)  # its Parse never ran
            if self.client is not None:
                self.client.on_parse_failed(name, stmt)
        elif kind == QUERY:
            if self.client is not None:
                self.client.on_query_skipped()
        elif kind == HIDDEN_PARSE and ref is not None:
            self.statements.discard(ref)
        elif kind == HIDDEN_DESCRIBE and self.client is not None:
            self.client.on_verified(True)
        elif kind == SYNTH_CLOSE and self.client is not None:
            self.client.on_close_skipped(*ref)

    # --- used by the client and the pool ---

    def prepare_statement(self, stmt: Statement, out: bytearray,
                          client_name: bytes | None = None) -> None:
        """Append to out the Parse that makes stmt exist here (after Closes of a stale copy or an
        evicted statement). Hidden (its ParseComplete never reaches the client) unless it is the
        client's own Parse of client_name."""
        stats = self.pool.registry.stats
        if stmt in self.statements.stale:
            self.statements.stale.discard(stmt)
            out += stmt.close_msg
            self.pending.append(HIDDEN_CLOSE)
        victim = self.statements.add(stmt)
        if victim is not None:
            out += victim.close_msg
            self.pending.append(HIDDEN_CLOSE)
            stats.evictions += 1
        out += stmt.parse_msg
        if client_name is None:
            self.pending.append(HIDDEN_PARSE)
        else:
            self.pending.append(PARSE_NAMED)
            self.client_names.append(client_name)
        self.refs.append(stmt)
        stats.server_parses += 1

    def describe_hidden(self, stmt: Statement, out: bytearray) -> None:
        """Append a hidden Describe of stmt and a Flush: its reply checks the shape clients were
        told (see _described), and arrives without waiting for the client's Sync."""
        out += m.message(b"D", b"S" + stmt.server_name + b"\0")
        out += _FLUSH
        self.pending.append(HIDDEN_DESCRIBE)
        self.refs.append(stmt)

    def check_syntax(self, query_and_types: bytes, out: bytearray) -> None:
        """Append a hidden Parse (and Close) of this query under a throw-away name: if it fails,
        the client gets PostgreSQL's error and the rest of the batch is skipped."""
        self._parse_throwaway(query_and_types, out, HIDDEN_PARSE)

    def parse_in_place(self, query_and_types: bytes, out: bytearray, client_name: bytes) -> None:
        """The client's Parse of a statement this server already has, where PostgreSQL must say
        whether it succeeds now: parsed under a throw-away name (and closed); its ParseComplete or
        ErrorResponse is the client's, and a failure leaves the client's name undefined."""
        self._parse_throwaway(query_and_types, out, PARSE_NAMED)
        self.client_names.append(client_name)

    def _parse_throwaway(self, query_and_types: bytes, out: bytearray, kind: int) -> None:
        """Close + Parse + Close of the query as _CHECK_NAME; the Parse is owed as `kind`. The first
        Close drops one left by an earlier check whose own Close was skipped."""
        out += _CHECK_CLOSE
        out += m.parse_message(_CHECK_NAME, query_and_types)
        out += _CHECK_CLOSE
        self.pending.append(HIDDEN_CLOSE)
        self.pending.append(kind)
        self.refs.append(_SYNTAX_CHECK)
        self.pending.append(HIDDEN_CLOSE)

    def raise_error(self, out: bytearray, code: str, text: str, reply: bytes | None = None) -> None:
        """Append to out the extended-protocol messages that make PostgreSQL itself raise this
        error here, so the server's state follows as for any error (the transaction fails, the
        rest of the batch is skipped until Sync). Only the ErrorResponse reaches the client: the
        server's, or `reply` instead where its exact fields matter."""
        # Without reply, the error as PostgreSQL words its own (no PL/pgSQL context line).
        self.raised.append(reply if reply is not None else m.error_response(code, text))
        out += _RAISE_CLOSE
        out += m.parse_message(_RAISE_NAME, m.cstr(m.raise_sql(code, text)) + b"\0\0")
        out += _RAISE_BIND_EXECUTE
        self.pending += _RAISE_KINDS
        self.refs.append(None)  # HIDDEN_PARSE carries a ref

    def capture(self, sql: str, done: Callable[[list[list[str | None]] | None], None]) -> None:
        """Run the pooler's own query and hand its rows to done (None if it failed); none of
        its replies reach the client."""
        assert self.transport is not None
        self.unnamed_owner = None  # a simple Query drops the unnamed statement
        self._rows, self._rows_done = [], done
        self.pending.append(HIDDEN_ROWS)
        self.transport.write(m.query(sql))

    def send_hidden(self, sql: str) -> None:
        """Run the pooler's own query; all of its replies are hidden."""
        assert self.transport is not None
        self.unnamed_owner = None  # a simple Query drops the unnamed statement
        self.pending.append(HIDDEN_QUERY)
        self.transport.write(m.query(sql))

    # --- handed over by an upgrade (process/upgrade.py) ---

    def movable(self) -> bool:
        """Idle between transactions with nothing owed, half read or half written, and its link
        in clear text (a TLS session lives in this process): its socket can go to a successor."""
        return (not self.closed and not self._handshaking and self.tls is None and self.status == _STATUS_IDLE
                and not (self.pending or self.unsynced or self.skipping or self.copy_in or self.doubt)
                and not self._partial and not self._skip and not self.cancels_in_flight
                and self.on_idle is None and self._rows_done is None and self.transport is not None
                and not self.transport.get_write_buffer_size())

    def export(self) -> dict[str, Any]:
        """What a successor's ServerConn.adopted() continues from."""
        return {
            "id": self.id, "pid": self.backend_pid, "key": self.backend_key, "params": self.params,
            "created": self.created, "listening": self.listening, "loaded": self.loaded,
            "session_reset": self.session_reset, "settings": self.settings, "prepared_sql": self.prepared_sql,
            "sequences_used": self.sequences_used, "settings_unknown": self.settings_unknown,
        }

    def detach(self) -> int:
        """Stop using the connection without ending it: a duplicate of its fd (movable() held)."""
        assert self.transport is not None
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        self.closed = True
        self._handshaking = True  # close() sends no Terminate: the backend goes on, elsewhere
        log.info("%s: %s handed over with its client (backend pid %d)", self.id, self.pool.name,
                 self.backend_pid)
        self.transport.close()
        self.pool.on_server_closed(self)
        return fd

    @classmethod
    def adopted(cls, pool: Pool, state: dict[str, Any]) -> ServerConn:
        """An older pooler's logged-in, idle server connection (export()); connect its socket to
        this object with loop.connect_accepted_socket."""
        server = cls(pool)
        server.id = state["id"]
        server._adopted = True
        server._handshaking = False
        server.backend_pid, server.backend_key = state["pid"], state["key"]
        server.params = dict(state["params"])
        server.tracked = tracked_values(server.params)
        server.created = state["created"]
        server.listening = state["listening"]
        server.loaded = state["loaded"]
        server.session_reset = state["session_reset"]
        server.settings = tuple((name, value) for name, value in state["settings"])
        server.prepared_sql = tuple((name, text) for name, text in state["prepared_sql"])
        server.sequences_used = state["sequences_used"]
        server.settings_unknown = state["settings_unknown"]
        server.ready.set_result(None)
        return server

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("%s: %s closing because: %s", self.id, self.pool.name, why)
        if self.transport is not None:
            if not self._handshaking:
                self.transport.write(m.TERMINATE)
            self.transport.close()
        self.pool.on_server_closed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"server connection lost ({exc})" if exc else "server closed the connection"
        if not self.ready.done():
            self.ready.set_exception(ServerError(reason))
        self._broken(reason)

    def _broken(self, reason: str) -> None:
        """The connection is unusable: close it, and its client learns why."""
        if self.closed:
            return
        client = self.client
        self.close(reason)
        if client is not None:
            client.on_server_lost(self, reason)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.transport.pause_reading()
            if self.transport is not None:  # the client's requests wait for this slow server
                client.held_by_server(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.transport.resume_reading()
            client.held_by_server(0)
