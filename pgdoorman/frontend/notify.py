"""LISTEN/NOTIFY in transaction and statement mode: one listener connection per pool fans out.

PostgreSQL is the authority on what a client listens to. A client's LISTEN runs on the server it
was lent, as any statement (in a transaction block it takes effect at COMMIT, a rollback undoes
it); the settings read-back after that transaction also lists pg_listening_channels(), and the
channels found become the client's subscription. Each pool (in each worker) keeps one server
connection of its own, the listener, that LISTENs to the union of its clients' subscriptions and
hands every NotificationResponse to the clients subscribed to its channel. Only once the listener
has confirmed a client's channels is the client's server given `UNLISTEN *` and lent to others:
until then that server delivers the client's notifications itself, so none is missed; one
committed while both listen reaches the client twice (the documented guarantee: at least once).

UNLISTEN and pg_listening_channels() must see the client's channels on its server: a loan whose
first request mentions "listen" (any case) first LISTENs there to the client's channels, and the
read-back after it replaces the subscription with what PostgreSQL then shows.

A lost listener is replaced (after RETRY_DELAY) and its channels LISTENed again; each subscribed
client gets a NOTICE that notifications may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from pgdoorman.frontend.standin import StandIn
from pgdoorman.protocol import messages as m

if TYPE_CHECKING:
    from pgdoorman.pool import Pool
    from pgdoorman.server import ServerConn

log = logging.getLogger("pgdoorman")

RETRY_DELAY = 1.0  # before connecting a new listener after one was lost or failed to connect
LISTEN_ROW = " listen"  # rows of the settings read-back (a space: no setting is named so)
LISTEN_SQL = f" UNION ALL SELECT '{LISTEN_ROW}', c FROM pg_catalog.pg_listening_channels() c"
LOST_NOTICE = m.message(b"N", b"SWARNING\0VWARNING\0C01000\0"
                        b"Mthe pooler's listener connection was lost: notifications may have been missed\0\0")
_A = 65  # NotificationResponse
_Z = 90


class Subscriber(Protocol):
    """A client of the pool that listens (client.ClientConn)."""

    id: str
    channels: frozenset[str]

    def deliver(self, message: bytes, channel: str | None) -> None: ...
    def on_listening(self) -> None: ...


def channels_read(rows: Iterable[list[str | None]]) -> frozenset[str]:
    """The channels a server listens to, from the settings read-back's rows."""
    return frozenset(row[1] for row in rows if row[0] == LISTEN_ROW and row[1] is not None)


def listen_sql(channels: Iterable[str]) -> str:
    return ";".join(f"LISTEN {m.quote_ident(channel)}" for channel in sorted(channels))


class _Stream(asyncio.Transport):
    """The listener's replies: what its ServerConn relays (NotificationResponses), as a transport."""

    def __init__(self, hub: Listener) -> None:
        super().__init__()
        self._hub = hub
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 5:
            end = pos + 1 + int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if end > len(buf):
                break
            if buf[pos] == _A:
                self._hub.notification(bytes(buf[pos:end]))
            pos = end
        del buf[:pos]

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Listener(StandIn):
    """One pool's listener connection and who is subscribed to what."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.listening: set[str] = set()  # channels the listener has confirmed
        self._asked: list[list[str]] = []  # LISTEN batches in flight, oldest first (one per ReadyForQuery)
        self.server: ServerConn | None = None
        self.transport: asyncio.Transport = _Stream(self)
        self._connecting = False
        self._closed = False
        self.notifications = 0  # delivered, counted per receiving client
        self.lost = 0

    def stats(self) -> dict[str, int]:
        """What SHOW and the metrics report: channels listened to, clients listening, notifications
        delivered, listener connections lost."""
        clients = {client for clients in self.subscribers.values() for client in clients}
        return {"channels": len(self.subscribers), "listeners": len(clients),
                "notifications": self.notifications, "listener_lost": self.lost}

    # --- subscriptions ---

    def update(self, client: Subscriber, old: frozenset[str], new: frozenset[str]) -> None:
        for channel in old - new:
            self._unsubscribe(client, channel)
        added = new - old
        for channel in added:
            self.subscribers.setdefault(channel, set()).add(client)
        self._listen([channel for channel in added if channel not in self.listening
                      and not any(channel in batch for batch in self._asked)])

    def drop(self, client: Subscriber) -> None:
        """The client left (or lost its channels): unsubscribe it from everything."""
        for channel in client.channels:
            self._unsubscribe(client, channel)

    def covers(self, channels: frozenset[str]) -> bool:
        """Whether the listener has confirmed LISTEN on every one of these channels."""
        return channels <= self.listening

    def _unsubscribe(self, client: Subscriber, channel: str) -> None:
        clients = self.subscribers.get(channel)
        if clients is None:
            return
        clients.discard(client)
        if clients:
            return
        del self.subscribers[channel]
        if channel in self.listening:
            self.listening.discard(channel)
            server = self.server
            if server is not None and not server.closed:
                server.send_hidden(f"UNLISTEN {m.quote_ident(channel)}")
                self._asked.append([])

    def _listen(self, channels: list[str]) -> None:
        if not channels:
            return
        server = self.server
        if server is None or server.closed:
            self._connect_soon(0.0)
            return
        server.send_hidden(listen_sql(channels))
        self._asked.append(channels)

    # --- the connection ---

    def _connect_soon(self, delay: float) -> None:
        if self._connecting or self._closed:
            return
        self._connecting = True
        asyncio.get_running_loop().create_task(self._connect(delay))

    async def _connect(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        pool = self.pool
        try:
            server = await pool.connect()
        except Exception as exc:  # ServerError, or the pool closing: try again while anyone listens
            self._connecting = False
            log.warning("%s: listener connection failed: %s", pool.name, exc)
            if self.subscribers:
                self._connect_soon(RETRY_DELAY)
            return
        self._connecting = False
        pool.servers.discard(server)  # not one of the pool's: never lent, not counted in pool_size
        if self._closed or not self.subscribers:
            server.close("listener not needed")
            return
        log.info("%s: listener for %s on %s", server.id, pool.name, ", ".join(sorted(self.subscribers)))
        self.server = server
        server.client = self
        self._asked = []
        self._listen(sorted(self.subscribers))

    def close(self, reason: str) -> None:
        self._closed = True
        if self.server is not None:
            self.server.close(reason)

    # --- what its ServerConn reports (the client interface, as a stand-in) ---

    def notification(self, message: bytes) -> None:
        body = memoryview(message)[9:]  # after kind, length and the notifying backend's pid
        end = bytes(body).find(b"\0")
        channel = bytes(body[:end]).decode(errors="replace")
        for client in tuple(self.subscribers.get(channel, ())):
            self.notifications += 1
            client.deliver(message, channel)

    def on_ready(self, status: int) -> None:
        server = self.server
        if server is not None and server.hidden_error is not None:
            log.warning("%s: listener query failed: %s", server.id, server.hidden_error.get("M"))
            server.hidden_error = None
        if not self._asked:
            return
        confirmed = self._asked.pop(0)
        waiting: set[Subscriber] = set()
        for channel in confirmed:
            clients = self.subscribers.get(channel)
            if clients:
                self.listening.add(channel)
                waiting |= clients
            elif server is not None:  # unsubscribed while its LISTEN was on the way
                server.send_hidden(f"UNLISTEN {m.quote_ident(channel)}")
                self._asked.append([])
        for client in waiting:
            client.on_listening()

    def on_server_lost(self, server: ServerConn, reason: str) -> None:
        if server is not self.server:
            return
        self.server = None
        self.listening.clear()
        self._asked = []
        self.lost += 1
        clients = {client for clients in self.subscribers.values() for client in clients}
        log.warning("%s: listener lost (%s): %d clients told notifications may have been missed",
                    self.pool.name, reason, len(clients))
        for client in clients:
            client.deliver(LOST_NOTICE, None)
        if self.subscribers:
            self._connect_soon(RETRY_DELAY)
