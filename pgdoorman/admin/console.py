"""The admin console: a virtual database ("pgdoorman", or "pgbouncer") that speaks the simple
query protocol, as PgBouncer's does. Every command covers the whole pooler: SHOWs merge the
snapshots of all workers, control commands run in every worker (App.ask).

Who may log in: admin_username with admin_password (full rights), the pool users named in
admin_users (full rights) or stats_users (SHOW only) with their own passwords, and over the unix
socket the OS user the pooler runs as, by its peer credentials, with no password.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import struct
from collections import deque
from typing import TYPE_CHECKING, Any

from pgdoorman import __version__
from pgdoorman.admin import columns, views
from pgdoorman.admin.coordinate import IMMEDIATE, WAIT_FOR_CLIENTS, WAIT_FOR_SERVERS, restart_note
from pgdoorman.auth import AuthFailed, StoredSecret, parse_secret
from pgdoorman.frontend.password import OK, PasswordExchange
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

if TYPE_CHECKING:
    from pgdoorman.app import App

log = logging.getLogger("pgdoorman.admin")
ADMIN, STATS = "admin", "stats"
_unpack_len = struct.Struct("!I").unpack_from
_PEERCRED = struct.Struct("3i")
MAX_QUERY = 1 << 20
# Messages of the extended protocol (and function calls, COPY data): the console answers none.
_EXTENDED = frozenset(b"PBEDCHSFdcf")
_COMMAND = re.compile(r"\s*(\w+)(?:\s+(.*?))?\s*;?\s*", re.DOTALL)
_SET = re.compile(r"\s*set\s+(\w+)\s*(?:=|\bto\b)\s*(.*?)\s*;?\s*", re.IGNORECASE | re.DOTALL)
_CONTROL = (
    "pause",
    "resume",
    "reconnect",
    "kill",
    "kill_client",
    "disable",
    "enable",
    "wait_close",
    "reload",
    "shutdown",
    "upgrade",
    "set",
)
_NEEDS_DB = ("disable", "enable", "kill_client")
_SHUTDOWN_MODES = {"": IMMEDIATE, "wait_for_servers": WAIT_FOR_SERVERS, "wait_for_clients": WAIT_FOR_CLIENTS}


class ConsoleError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _ident(word: str) -> str:
    """A database name as given: "quoted" keeps its case, bare words are taken as written."""
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return word[1:-1].replace('""', '"')
    return word


def result_messages(cols: columns.Columns, rows: list[list[Any]], tag: str) -> bytes:
    out = bytearray()
    desc = bytearray(struct.pack("!h", len(cols)))
    for name, oid in cols:
        desc += m.cstr(name) + struct.pack("!ihihih", 0, 0, oid, -1, -1, 0)
    out += m.message(b"T", bytes(desc))
    for row in rows:
        body = bytearray(struct.pack("!h", len(row)))
        for value in row:
            if value is None:
                body += b"\xff\xff\xff\xff"
            else:
                data = str(value).encode()
                body += struct.pack("!i", len(data)) + data
        out += m.message(b"D", bytes(body))
    out += m.message(b"C", m.cstr(f"{tag} {len(rows)}" if tag == "SELECT" else tag))
    return bytes(out)


class AdminConn(asyncio.Protocol):
    def __init__(self, app: App, startup: dict[str, str], peer: str) -> None:
        self.app = app
        self.startup = startup
        self.user = startup.get("user", "")
        self.peer = peer
        self.role = ""
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._buf = bytearray()
        self._exchange: PasswordExchange | None = None
        self._active = False
        self._queries: deque[str] = deque()
        self._runner: asyncio.Task[None] | None = None
        self._skipping = False  # after an extended-protocol message: until its Sync
        self._closed = False
        self.id = f"A-{secrets.randbelow(1 << 30)}"

    # --- login ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._peer_is_us():
            self.role = ADMIN
            log.info("%s: %s console login by peer credentials (user %s)", self.id, self.peer, self.user)
            self._logged_in()
            return
        role, secret = self._role()
        if role is None or secret is None:
            log.info("%s: %s console login refused for user %s", self.id, self.peer, self.user)
            self._fatal(codes.PROTOCOL_VIOLATION, "not allowed")
            return
        self.role = role
        self._exchange = PasswordExchange(secret, "", self.app.auth_key, self.user)
        first = self._exchange.start()
        if first is None:
            self._logged_in()
        else:
            self.transport.write(first)

    def _peer_is_us(self) -> bool:
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return False
        try:
            _pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError:
            return False
        return uid == os.getuid()

    def _role(self) -> tuple[str | None, StoredSecret | None]:
        g = self.app.config.general
        if self.user == g.admin_username:
            # No admin_password: this name has no password login (peer credentials only).
            return (ADMIN, parse_secret(g.admin_password, self.user)) if g.admin_password else (None, None)
        role = ADMIN if self.user in g.admin_users else STATS if self.user in g.stats_users else None
        if role is None:
            return None, None
        for pool in self.app.config.pools.values():
            user = pool.users.get(self.user)
            if user is not None:
                return role, parse_secret(user.password, self.user)
        return None, None

    def _logged_in(self) -> None:
        self._active = True
        self._exchange = None
        out = bytearray(OK)
        for name, value in (
            ("server_version", f"15.0 (pgdoorman {__version__})"),
            ("client_encoding", "UTF8"),
            ("server_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("TimeZone", "GMT"),
            ("standard_conforming_strings", "on"),
            ("integer_datetimes", "on"),
            ("is_superuser", "on" if self.role == ADMIN else "off"),
            ("application_name", self.startup.get("application_name", "")),
        ):
            out += m.parameter_status(name, value)
        out += m.backend_key_data(0, 0)
        out += m.ready_for_query(b"I")
        self.transport.write(bytes(out))
        log.info("%s: %s console login (%s)", self.id, self.peer, self.role)

    # --- input ---

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buf = self._buf
        buf += data
        while len(buf) >= 5:
            kind = buf[0]
            length = _unpack_len(buf, 1)[0]
            if length < 4 or length > MAX_QUERY:
                self._fatal(codes.PROTOCOL_VIOLATION, f"invalid message length {length}")
                return
            if len(buf) < length + 1:
                return
            body = bytes(buf[5 : length + 1])
            del buf[: length + 1]
            self._message(kind, body)
            if self._closed:
                return

    def _message(self, kind: int, body: bytes) -> None:
        if not self._active:
            if kind != ord("p") or self._exchange is None:
                self._fatal(codes.PROTOCOL_VIOLATION, "expected password response")
                return
            try:
                reply, done = self._exchange.step(body)
            except (AuthFailed, IndexError, struct.error, m.ProtocolError) as exc:
                log.info("%s: %s console auth failed: %s", self.id, self.peer, exc)
                self._fatal(codes.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"')
                return
            if reply:
                self.transport.write(reply)
            if done:
                self._logged_in()
            return
        if kind == ord("X"):
            self.close("client close request")
        elif kind == ord("Q"):
            self._queries.append(body.rstrip(b"\0").decode("utf-8", "replace"))
            if self._runner is None or self._runner.done():
                self._runner = asyncio.get_running_loop().create_task(self._run())
        elif kind in _EXTENDED:
            # As PgBouncer: the console speaks only the simple query protocol; the session ends.
            self._fatal(codes.PROTOCOL_VIOLATION, "extended query protocol not supported by admin console")
        else:
            self._fatal(codes.PROTOCOL_VIOLATION, f"invalid frontend message type {kind}")

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()

    def end(self, code: str, message: str) -> None:
        """The pooler (this process of it) stops: the session ends with a FATAL that says why."""
        self._fatal(code, message)

    def _fatal(self, code: str, message: str) -> None:
        if self._closed:
            return
        self.transport.write(m.error_response(code, message, "FATAL"))
        self.close(message)

    def close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        log.info("%s: %s console closing because: %s", self.id, self.peer, reason)
        self.transport.close()

    # --- commands ---

    async def _run(self) -> None:
        while self._queries and not self._closed:
            query = self._queries.popleft()
            try:
                out = await self.execute(query)
            except ConsoleError as exc:
                out = m.error_response(exc.code, str(exc))
            except Exception as exc:  # the console must answer, whatever went wrong
                log.exception("%s: console command failed: %s", self.id, query)
                out = m.error_response(codes.INTERNAL_ERROR, f"console command failed: {exc}")
            if self._closed:
                return
            self.transport.write(out + m.ready_for_query(b"I"))

    async def execute(self, query: str) -> bytes:
        if not query.strip(" \t\r\n;"):
            return m.message(b"I")  # EmptyQueryResponse
        if ";" in query.strip().rstrip(";"):
            raise ConsoleError(codes.PROTOCOL_VIOLATION, "multiple statements not allowed")
        match = _COMMAND.fullmatch(query)
        if match is None:
            raise ConsoleError(codes.PROTOCOL_VIOLATION, f"invalid command '{query}', use SHOW HELP;")
        verb, arg = match.group(1).lower(), (match.group(2) or "").strip()
        if verb in ("show", "select"):
            return await self._show(_ident(arg).lower() if arg else "", query)
        if verb not in _CONTROL:
            raise ConsoleError(codes.PROTOCOL_VIOLATION, f"invalid command '{query}', use SHOW HELP;")
        if self.role != ADMIN:
            raise ConsoleError(codes.INSUFFICIENT_PRIVILEGE, "admin access needed")
        return await self._control(verb, arg, query)

    async def _show(self, what: str, query: str) -> bytes:
        if what == "help":
            notice = m.message(
                b"N", b"SNOTICE\0VNOTICE\0C00000\0MConsole usage\0D" + views.HELP.encode() + b"\0\0"
            )
            return notice + m.message(b"C", b"SHOW\0")
        if what in columns.FAKE_PARAMS:
            return result_messages(((what, columns.TEXT),), [[columns.FAKE_PARAMS[what]]], "SHOW")
        need = {"clients": {"clients"}, "servers": {"servers"}, "prepared_statements": {"prepared"}}.get(
            what, set()
        )
        if what not in columns.SHOW_COLUMNS and what not in ("prepared_statements", "workers", "latency"):
            raise ConsoleError(codes.PROTOCOL_VIOLATION, f"invalid command '{query}', use SHOW HELP;")
        snapshots = await self.app.ask({"op": "snapshot", "what": sorted(need)})
        result = views.show(
            what, [s for s in snapshots if isinstance(s, dict) and "pools" in s], self.app.config
        )
        assert result is not None
        cols, rows = result
        return result_messages(cols, rows, "SHOW")

    async def _control(self, verb: str, arg: str, query: str) -> bytes:
        words = arg.split()
        if verb == "set":
            match = _SET.fullmatch(query)
            if match is None:
                raise ConsoleError(codes.SYNTAX_ERROR, "SET needs: SET key = value")
            key, value = match.group(1).lower(), match.group(2)
            results = await self.app.ask({"op": "set", "key": key, "value": value})
            self._raise_failed(results, codes.CONFIG_FILE_ERROR, "SET failed: ")
            return self._restart_notice(results) + m.message(b"C", m.cstr(f"SET {key}={value}"))
        if verb == "shutdown":
            mode = _SHUTDOWN_MODES.get(arg.lower())
            if mode is None:
                raise ConsoleError(codes.SYNTAX_ERROR, f"invalid SHUTDOWN mode '{arg}'")
            log.info("%s: SHUTDOWN %s from the console", self.id, mode)
            await self.app.ask({"op": "shutdown", "mode": mode})
            return m.message(b"C", b"SHUTDOWN\0")
        if verb == "upgrade":
            if words:
                raise ConsoleError(codes.SYNTAX_ERROR, "UPGRADE takes no argument")
            log.info("%s: UPGRADE from the console", self.id)
            results = await self.app.ask({"op": "upgrade"})
            self._raise_failed(results, codes.OBJECT_NOT_IN_PREREQUISITE_STATE, "UPGRADE failed: ")
            pid = next((r["pid"] for r in results if isinstance(r, dict) and "pid" in r), 0)
            note = (f"the new process (pid {pid}) serves; clients move to it between transactions, and "
                    "this console session ends with the old process")
            return (m.message(b"N", b"SNOTICE\0VNOTICE\0C00000\0M" + note.encode() + b"\0\0")
                    + m.message(b"C", b"UPGRADE\0"))
        if verb == "reload":
            if words:
                raise ConsoleError(codes.SYNTAX_ERROR, "RELOAD takes no argument")
            results = await self.app.ask({"op": "reload"})
            self._raise_failed(results, codes.CONFIG_FILE_ERROR)
            return self._restart_notice(results) + m.message(b"C", b"RELOAD\0")
        if len(words) > 1:
            raise ConsoleError(codes.SYNTAX_ERROR, f"{verb.upper()} takes at most one argument")
        target = _ident(words[0]) if words else None
        if target is None and verb in _NEEDS_DB:
            raise ConsoleError(codes.SYNTAX_ERROR, f"{verb.upper()} needs an argument")
        if verb == "kill_client":
            client_id = target if target and target.startswith("C-") else f"C-{target}"
            results = await self.app.ask({"op": "kill_client", "id": client_id})
            if not any(r == 1 for r in results):
                raise ConsoleError(codes.OBJECT_NOT_IN_PREREQUISITE_STATE, f"client {target} not found")
            return m.message(b"C", b"KILL_CLIENT\0")
        if target is not None and target not in self.app.config.pools:
            raise ConsoleError(codes.PROTOCOL_VIOLATION, f"no such database: {target}")
        log.info("%s: %s %s from the console", self.id, verb.upper(), target or "(all)")
        results = await self.app.ask({"op": verb, "db": target})
        self._raise_failed(results, codes.INTERNAL_ERROR, f"{verb.upper()} failed: ")
        return m.message(b"C", m.cstr(verb.upper()))

    @staticmethod
    def _raise_failed(results: list[Any], code: str, prefix: str = "") -> None:
        """A worker's {"error": ...} answer becomes the console's ErrorResponse."""
        for result in results:
            if isinstance(result, dict) and "error" in result:
                raise ConsoleError(code, f"{prefix}{result['error']}")

    @staticmethod
    def _restart_notice(results: list[Any]) -> bytes:
        restart = sorted({key for r in results if isinstance(r, dict) for key in r.get("restart", ())})
        if not restart:
            return b""
        text = restart_note(restart)
        return m.message(b"N", b"SWARNING\0VWARNING\0C01000\0M" + text.encode() + b"\0\0")
