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


def issued_by(key: int, generation: int) -> bool:
    """Whether a cancel key is of this generation's parity (CancelRegistry._offset)."""
    return (key < 0) == (generation % 2 == 1)


class CancelRegistry:
    """Cancel keys this worker issued (or adopted), by their secret part.

    The secret key is ≡ worker (mod workers): the acceptor routes a CancelRequest by it. The pid
    part is the client's real backend pid in session mode (drivers compare it with
    pg_backend_pid() and NotificationResponse pids), else a number of the pooler's (then ≡ worker
    too, so that a pid tells the worker in logs and tests).
    """

    def __init__(self, worker: int = 0, workers: int = 1, generation: int = 0) -> None:
        self._worker = worker
        self._workers = workers
        self._generation = generation
        # Keys of even generations (upgrades: process/upgrade.py) are >= 0, of odd ones < 0, whatever
        # the number of workers: a successor tells a key its predecessor issued by its sign.
        self._offset = 0 if generation % 2 == 0 else ((1 << 30) // workers + 1) * workers
        # (pid, secret key) -> client. Both parts: a client handed over by an upgrade keeps the key an
        # older generation issued, which only the pair keeps apart from this one's (2^-61 a pair).
        self._clients: dict[tuple[int, int], ClientConn] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, client: ClientConn, pid: int = 0) -> tuple[int, int]:
        """A new (pid, key) for client; pid: its backend's, or 0 for one of the pooler's."""
        workers, worker = self._workers, self._worker
        while True:
            raw_pid, raw_key = _two_u32(secrets.token_bytes(8))
            key = (raw_key >> 2) // workers * workers + worker - self._offset  # 31 bits, ≡ worker
            new_pid = pid or (raw_pid >> 2) // workers * workers + worker or workers  # positive, like a pid
            if (new_pid, key) not in self._clients:
                break
        self._clients[(new_pid, key)] = client
        return new_pid, key

    def ours(self, key: int) -> bool:
        """Issued by this generation (or by the one before the last: see _offset)."""
        return issued_by(key, self._generation)

    def known(self, pid: int, key: int) -> bool:
        return (pid, key) in self._clients

    def adopt(self, client: ClientConn) -> None:
        """A client moved here from another worker (or process) keeps the key it was given there."""
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
