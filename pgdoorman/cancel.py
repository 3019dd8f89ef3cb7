"""Pooler-issued cancel keys, and forwarding a CancelRequest to the server the client holds."""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
from typing import TYPE_CHECKING

from pgdoorman.protocol.messages import cancel_request

if TYPE_CHECKING:
    from pgdoorman.client import ClientConn
    from pgdoorman.server import ServerConn

log = logging.getLogger("pgdoorman.cancel")
_two_u32 = struct.Struct("!II").unpack
CANCEL_TIMEOUT = 5.0


class CancelRegistry:
    def __init__(self, worker: int = 0, workers: int = 1) -> None:
        # The key's pid part is ≡ worker (mod workers): the acceptor routes a CancelRequest by it.
        self._worker = worker
        self._workers = workers
        self._clients: dict[tuple[int, int], ClientConn] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, client: ClientConn) -> tuple[int, int]:
        while True:
            raw_pid, raw_key = _two_u32(secrets.token_bytes(8))
            pid = (raw_pid >> 2) // self._workers * self._workers + self._worker  # 30 bits, then ≡
            key = (pid, (raw_key >> 1) - (1 << 30))
            if key not in self._clients:
                self._clients[key] = client
                return key

    def known(self, pid: int, key: int) -> bool:
        return (pid, key) in self._clients

    def adopt(self, client: ClientConn) -> None:
        """A client moved here from another worker keeps the key it was given there."""
        self._clients[client.cancel_key] = client

    def unregister(self, client: ClientConn) -> None:
        if self._clients.get(client.cancel_key) is client:
            del self._clients[client.cancel_key]

    def forward(self, pid: int, key: int) -> None:
        client = self._clients.get((pid, key))
        if client is None:
            log.info("cancel request with unknown key ignored")
            return
        server = client.server
        if server is None or not server.pending:
            log.info("%s: cancel request ignored: no query running", client.id)
            return
        # The server stays with this client (or parked) until the cancel is done, so the
        # cancel can never hit another client's query.
        server.cancels_in_flight += 1
        log.info("%s: forwarding cancel to %s (backend pid %d)", client.id, server.id, server.backend_pid)
        task = asyncio.get_running_loop().create_task(self._send(server))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, server: ServerConn) -> None:
        host, port = server.pool.cfg.server_host, server.pool.cfg.server_port
        writer = None
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                if host.startswith("/"):
                    reader, writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
                else:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(cancel_request(server.backend_pid, server.backend_key))
                await reader.read()  # the server closes the connection once it has acted
        except (OSError, TimeoutError) as exc:
            log.warning("%s: cancel request failed: %s", server.id, exc)
        finally:
            if writer is not None:
                writer.close()
            server.cancels_in_flight -= 1
            if server.cancels_in_flight == 0 and server.parked:
                server.parked = False
                server.pool.release(server)
