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
    """Cancel keys this worker issued (or adopted), by their secret part.

    The secret key is ≡ worker (mod workers): the acceptor routes a CancelRequest by it. The pid
    part is the client's real backend pid in session mode (drivers compare it with
    pg_backend_pid() and NotificationResponse pids), else a number of the pooler's (then ≡ worker
    too, so that a pid tells the worker in logs and tests).
    """

    def __init__(self, worker: int = 0, workers: int = 1) -> None:
        self._worker = worker
        self._workers = workers
        self._clients: dict[int, ClientConn] = {}  # secret key -> client
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, client: ClientConn, pid: int = 0) -> tuple[int, int]:
        """A new (pid, key) for client; pid: its backend's, or 0 for one of the pooler's."""
        workers, worker = self._workers, self._worker
        while True:
            raw_pid, raw_key = _two_u32(secrets.token_bytes(8))
            key = ((raw_key >> 1) - (1 << 30)) // workers * workers + worker  # 31 bits, then ≡
            if key not in self._clients:
                break
        if not pid:
            pid = (raw_pid >> 2) // workers * workers + worker or workers  # positive, like a pid
        self._clients[key] = client
        return pid, key

    def known(self, pid: int, key: int) -> bool:
        client = self._clients.get(key)
        return client is not None and client.cancel_key == (pid, key)

    def adopt(self, client: ClientConn) -> None:
        """A client moved here from another worker keeps the key it was given there."""
        self._clients[client.cancel_key[1]] = client

    def unregister(self, client: ClientConn) -> None:
        key = client.cancel_key[1]
        if self._clients.get(key) is client:
            del self._clients[key]

    def forward(self, pid: int, key: int) -> None:
        client = self._clients.get(key)
        if client is None or client.cancel_key[0] != pid:
            log.info("cancel request with unknown key ignored")
            return
        server = client.server
        if server is None or not server.pending:
            log.info("%s: cancel request ignored: no query running", client.id)
            return
        log.info("%s: forwarding cancel to %s (backend pid %d)", client.id, server.id, server.backend_pid)
        self.cancel_server(server)

    def cancel_server(self, server: ServerConn) -> None:
        """Cancel what the server runs. It stays with its client, or parked once released, until
        the cancel is done, so the cancel can never hit another client's query."""
        server.cancels_in_flight += 1
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
