"""The client-facing listening sockets (TCP addresses and a unix socket), opened once and used by the
single-process pooler (Listener, below) or by the acceptor (which accepts itself)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from pgdoorman.config import GeneralConfig
from pgdoorman.fdlimit import OUT_OF_FDS, PAUSE, FdGuard
from pgdoorman.tcp import tune

log = logging.getLogger("pgdoorman")
BACKLOG = 4096
ACCEPT_BATCH = 64  # connections accepted per wake-up before the loop serves others


def _address(sock: socket.socket) -> tuple[int, Any]:
    name = sock.getsockname()
    return sock.family, name if isinstance(name, str) else tuple(name[:2])


def listening_sockets(g: GeneralConfig, inherited: list[socket.socket] | None = None) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every general.host address and the unix socket.
    inherited: the listening sockets of the pooler an upgrade takes over from; one already bound to
    an address is used as it is (it never stopped listening), the others are closed."""
    socks: list[socket.socket] = []
    handed = {_address(sock): sock for sock in inherited or ()}
    try:
        for host in g.host:
            infos = socket.getaddrinfo(host or None, g.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _name, addr in dict.fromkeys(infos):
                same = handed.pop((family, tuple(addr[:2])), None)
                if same is not None:
                    tune(same, g)
                    socks.append(same)
                    log.info("listening on %s:%d (taken over)", addr[0], addr[1])
                    continue
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tune(sock, g)  # keepalive and TCP_USER_TIMEOUT: inherited by accepted sockets
                sock.bind(addr)
                log.info("listening on %s:%d", addr[0], addr[1])
        path = os.path.join(g.unix_socket_dir, f".s.PGSQL.{g.port}") if g.unix_socket_dir else ""
        same = handed.pop((socket.AF_UNIX, path), None) if path else None
        if same is not None:  # (never unlinked: clients connect to it throughout)
            socks.append(same)
            log.info("listening on unix socket %s (taken over)", path)
        elif path:
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(path)
            os.chmod(path, 0o777)
            log.info("listening on unix socket %s", path)
        for sock in socks:
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    finally:
        for sock in handed.values():  # addresses the new config no longer has
            log.info("no longer listening on %s", sock.getsockname())
            sock.close()
    return socks


class Listener(asyncio.AbstractServer):
    """Accepts on one listening socket and hands each connection to the event loop.

    Not loop.create_server: out of file descriptors, uvloop's server (libuv) closes waiting clients
    without a word or a log line, and asyncio's logs a traceback and leaves them hanging for a second at
    a time. Here they get PostgreSQL's "too many clients" and one log line a second (fdlimit.FdGuard).
    """

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], guard: FdGuard) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = sock
        self._factory = factory
        self._guard = guard
        self._tcp = sock.family != socket.AF_UNIX
        self._serving = True
        self._handing: set[asyncio.Task[Any]] = set()
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_FDS:
                    if not self._guard.refuse_waiting(self.sock, exc):
                        self._loop.remove_reader(self.sock.fileno())
                        self._loop.call_later(PAUSE, self._resume)
                else:  # ECONNABORTED and the like: that client's problem, not the listener's
                    log.info("accept failed: %s", exc)
                return
            conn.setblocking(False)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._hand_over(conn))
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # gone already, or no descriptor left for the loop's own use
            log.info("accepted client dropped: %s", exc)
            conn.close()

    def _resume(self) -> None:
        if self._serving:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def pause(self) -> None:
        """Stop accepting, the socket kept open (an upgrade's successor accepts on it now)."""
        if self._serving:
            self._serving = False
            self._loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        if not self._serving and self.sock.fileno() >= 0:
            self._serving = True
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self._serving = False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        pass  # serving from the start

    async def serve_forever(self) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        pass  # close() is immediate


async def serve_on(socks: list[socket.socket],
                   factory: Callable[[], asyncio.Protocol]) -> list[Listener]:
    """Listeners (accepting at once) on sockets from listening_sockets(), sharing one spare descriptor."""
    guard = FdGuard()
    return [Listener(sock, factory, guard) for sock in socks]
