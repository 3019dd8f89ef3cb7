"""Messages between the acceptor and its workers, over a unix SOCK_SEQPACKET socket pair.

Each message is one packet: a kind byte, then a payload (marshal for structured data: plain dicts,
lists, tuples, bytes and numbers, between processes of the same Python). A client socket travels as
an SCM_RIGHTS file descriptor with its message.
"""

from __future__ import annotations

import marshal
import socket
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
