"""Messages between the acceptor and its workers, over a unix SOCK_SEQPACKET socket pair.

Each message is one packet: a kind byte, then a payload (marshal for structured data: plain dicts,
lists, tuples, bytes and numbers, between processes of the same Python). A client socket travels as
an SCM_RIGHTS file descriptor with its message.
"""

from __future__ import annotations

import asyncio
import marshal
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

MAX_MESSAGE = 1 << 20
# One pool's entry in a LOAD report (Pool.load): clients, waiters, seconds the oldest waiter has
# waited, servers it could lend at once, mean wait of the clients served since the last report.
Load = tuple[int, int, float, int, float]

# acceptor -> worker
NEW_CLIENT = 0x43  # "C" + the bytes read so far (none when just accepted); fd: the client
FINAL_CLIENT = 0x46  # "F": the same, rerouted: the worker must serve it, never reroute it again
MOVE_CLIENTS = 0x4D  # "M" + (pool index, how many, to which worker): pass some waiting clients on
# both ways: a logged-in client changing worker (to the acceptor with "to", then to that worker)
MOVED_CLIENT = 0x41  # "A" + ClientConn.detach() state; fds: the client (and the server it holds)
# worker -> acceptor
CLIENTS_GONE = 0x78  # "x" repeated once per client that has gone
LOAD = 0x4C  # "L" + [(pool index, *Load), ...]
KEY_GONE = 0x6B  # "k" + cancel key of a client that had moved here, now gone
REROUTE = 0x52  # "R" + (bytes read, database, user, cancel key or None); fd: a client not ours
# Client caps over the whole pooler (limits.py): a logged-in client asks to be counted, and is let go
ADMIT = 0x61  # "a" + (request id, user, database): worker -> acceptor
ADMITTED = 0x62  # "b" + (request id, refusal or None): acceptor -> worker
LEAVE = 0x6C  # "l" + (user, database): a counted client has gone
STARTED = 0x73  # "s": a worker is serving (an upgrade's new acceptor waits for all of them)
HAND_OVER = 0x68  # "h": acceptor -> worker: an upgrade began, move every client to the successor
# Between an old pooler and its successor during an upgrade (process/upgrade.py): HELLO (old ->
# new, fds: the listening sockets), READY (new -> old); then MOVED_CLIENT old -> new, and REROUTE
# new -> old for a CancelRequest the successor does not know (the client is still on the old one).
HELLO = 0x48  # "H" + {"generation": n}
READY = 0x59  # "Y" + the successor's pid
# Control: the admin console, signals and reload cover every worker. A request goes from the worker
# that has the admin client to the acceptor, which asks every worker and answers with the list of
# their answers (admin/fanout.py). Both can be larger than a packet: sent in PARTs.
REQUEST = 0x51  # "Q" + part: worker -> acceptor "ask everyone"; acceptor -> worker "answer this"
REPLY = 0x50  # "P" + part: worker -> acceptor "my answer"; acceptor -> worker "everyone's answers"
_PART = struct.Struct("!BIB")  # kind, request id, 1 on the last part
PART_SIZE = 60000  # well under a unix socket's default send buffer


def pack(kind: int, payload: Any = None) -> bytes:
    return bytes((kind,)) + (b"" if payload is None else marshal.dumps(payload))


def unpack(data: bytes) -> Any:
    return marshal.loads(data[1:])


MAX_FDS = 16  # a HELLO's listening sockets; a moved client has one or two


def send(channel: socket.socket, data: bytes, fd: int | list[int] | None = None) -> None:
    """Raises BlockingIOError when the channel is full (nothing was sent)."""
    if fd is None:
        channel.send(data)
    else:
        socket.send_fds(channel, [data], [fd] if isinstance(fd, int) else fd)


def receive_all(channel: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds that came with it. b"": the other side has gone.
    Raises BlockingIOError when there is nothing to read."""
    data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, MAX_FDS)
    return data, fds


def parts(kind: int, request_id: int, payload: Any) -> Iterator[bytes]:
    """The packets that carry one control message."""
    data = marshal.dumps(payload)
    for at in range(0, max(len(data), 1), PART_SIZE):
        last = at + PART_SIZE >= len(data)
        yield _PART.pack(kind, request_id, last) + data[at : at + PART_SIZE]


class Assembler:
    """Joins the parts of control messages: feed() returns (request id, payload) when one is whole."""

    def __init__(self) -> None:
        self._partial: dict[tuple[int, int], bytearray] = {}

    def feed(self, packet: bytes) -> tuple[int, Any] | None:
        kind, request_id, last = _PART.unpack_from(packet)
        key = (kind, request_id)
        if last and key not in self._partial:
            return request_id, marshal.loads(packet[_PART.size :])
        buf = self._partial.setdefault(key, bytearray())
        buf += packet[_PART.size :]
        if not last:
            return None
        del self._partial[key]
        return request_id, marshal.loads(buf)


class Outbox:
    """Packets to the other process, queued while the channel is full: a worker's control packets
    and the clients it hands over; an old pooler's clients for its successor (process/upgrade.py).
    A packet's fds are closed once it has been sent, or once the other side has gone."""

    def __init__(self, sock: socket.socket,
                 returned: Callable[[bytes, list[int]], None] | None = None) -> None:
        """returned: takes back each packet not sent when the other side has gone, with its fds
        (without it they are closed)."""
        self.sock = sock
        self._returned = returned
        self._queue: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self.broken = False

    def put(self, packets: Iterator[bytes]) -> None:
        for packet in packets:
            self.put_fds(packet, [])

    def put_fds(self, packet: bytes, fds: list[int]) -> None:
        if self.broken:
            if self._returned is not None:
                self._returned(packet, fds)
                return
            for fd in fds:
                os.close(fd)
            return
        self._queue.append((packet, fds))
        if not self._writing:
            self._flush()

    def __len__(self) -> int:
        return len(self._queue)

    def _flush(self) -> None:
        while self._queue:
            packet, fds = self._queue[0]
            try:
                send(self.sock, packet, fds or None)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    asyncio.get_running_loop().add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:  # the other side is gone (a worker then stops: App._receive)
                self.close()
                return
            self._queue.popleft()
            for fd in fds:
                os.close(fd)
        if self._writing:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self.sock.fileno())

    def close(self) -> None:
        self.broken = True
        returned = self._returned
        if self._writing:
            self._writing = False
            try:
                asyncio.get_running_loop().remove_writer(self.sock.fileno())
            except (RuntimeError, ValueError):
                pass
        while self._queue:
            packet, fds = self._queue.popleft()
            if returned is not None:
                returned(packet, fds)
                continue
            for fd in fds:
                os.close(fd)
