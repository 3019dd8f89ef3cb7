"""The client-facing listening sockets (TCP addresses and a unix socket), opened once and used by the
single-process pooler (through asyncio servers) or by the acceptor (which accepts itself)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from pgdoorman.config import GeneralConfig

log = logging.getLogger("pgdoorman")
BACKLOG = 4096


def listening_sockets(g: GeneralConfig) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every general.host address and the unix socket."""
    socks: list[socket.socket] = []
    try:
        for host in g.host:
            infos = socket.getaddrinfo(host or None, g.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _name, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if g.tcp_keepalive:  # inherited by accepted sockets
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.bind(addr)
                log.info("listening on %s:%d", addr[0], addr[1])
        if g.unix_socket_dir:
            path = os.path.join(g.unix_socket_dir, f".s.PGSQL.{g.port}")
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
    return socks


async def serve_on(socks: list[socket.socket],
                   factory: Callable[[], asyncio.Protocol]) -> list[asyncio.AbstractServer]:
    """asyncio servers (the event loop accepts) on sockets from listening_sockets()."""
    loop = asyncio.get_running_loop()
    servers: list[asyncio.AbstractServer] = []
    for sock in socks:
        if sock.family == socket.AF_UNIX:
            servers.append(await loop.create_unix_server(factory, sock=sock, backlog=BACKLOG))
        else:
            servers.append(await loop.create_server(factory, sock=sock, backlog=BACKLOG))
    return servers
