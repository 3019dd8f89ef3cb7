"""Messages between the acceptor and its workers, over a unix SOCK_SEQPACKET socket pair.

Each message is one packet: a kind byte, then a payload (marshal for structured data: plain dicts,
lists, tuples, bytes and numbers, between processes of the same Python). A client socket travels as
an SCM_RIGHTS file descriptor with its message.
"""

from __future__ import annotations

import asyncio
import marshal
import socket
import struct
from collections import deque
from collections.abc import Iterator
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
MOVED_CLIENT = 0x41  # "A" + ClientConn.detach() state; fd: the client
# worker -> acceptor
CLIENTS_GONE = 0x78  # "x" repeated once per client that has gone
LOAD = 0x4C  # "L" + [(pool index, *Load), ...]
KEY_GONE = 0x6B  # "k" + cancel key of a client that had moved here, now gone
REROUTE = 0x52  # "R" + (bytes read, database, user, cancel key or None); fd: a client not ours
# Client caps over the whole pooler (limits.py): a logged-in client asks to be counted, and is let go
ADMIT = 0x61  # "a" + (request id, user, database): worker -> acceptor
ADMITTED = 0x62  # "b" + (request id, refusal or None): acceptor -> worker
LEAVE = 0x6C  # "l" + (user, database): a counted client has gone
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


def send(channel: socket.socket, data: bytes, fd: int | None = None) -> None:
    """Raises BlockingIOError when the channel is full (nothing was sent)."""
    if fd is None:
        channel.send(data)
    else:
        socket.send_fds(channel, [data], [fd])


def receive(channel: socket.socket) -> tuple[bytes, int | None]:
    """One message and its fd (if any). b"" with None: the other side has gone.
    Raises BlockingIOError when there is nothing to read."""
    data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 1)
    return data, (fds[0] if fds else None)


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
    """A worker's control packets to the acceptor, queued while the channel is full. (The
    acceptor queues its packets to a worker with the client sockets it hands over.)"""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._queue: deque[bytes] = deque()
        self._writing = False

    def put(self, packets: Iterator[bytes]) -> None:
        self._queue.extend(packets)
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._queue:
            try:
                self.sock.send(self._queue[0])
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    asyncio.get_running_loop().add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:  # the acceptor is gone: the worker stops (App._receive)
                self._queue.clear()
                break
            self._queue.popleft()
        if self._writing:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
