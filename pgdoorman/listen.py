"""The client-facing listeners (TCP addresses and a unix socket), for the pooler or the acceptor."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from pgdoorman.config import GeneralConfig

log = logging.getLogger("pgdoorman")


async def listen(g: GeneralConfig, factory: Callable[[], asyncio.Protocol]) -> list[asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    listeners: list[asyncio.AbstractServer] = []
    for host in g.host:
        server = await loop.create_server(factory, host, g.port, reuse_address=True, backlog=4096)
        listeners.append(server)
        log.info("listening on %s:%d", host, g.port)
    if g.unix_socket_dir:
        path = os.path.join(g.unix_socket_dir, f".s.PGSQL.{g.port}")
        if os.path.exists(path):
            os.unlink(path)
        server = await loop.create_unix_server(factory, path, backlog=4096)
        os.chmod(path, 0o777)
        listeners.append(server)
        log.info("listening on unix socket %s", path)
    if g.tcp_keepalive:
        for listener in listeners:
            for sock in getattr(listener, "sockets", ()):
                if sock.family != socket.AF_UNIX:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return listeners
