"""Bytes a client connection carried, from the kernel's own TCP counters (TCP_INFO), so that the
relay counts nothing per read: tcpi_bytes_received (from the client) and tcpi_bytes_acked (to the
client, as it acknowledged them). Unix-socket clients report 0 (the kernel keeps no such count).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_SIZE = 136  # through tcpi_bytes_received (Linux 4.1+)
_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked at 120, tcpi_bytes_received at 128
_AT = 120


def socket_bytes(sock: Any) -> tuple[int, int]:
    """(received from the peer, sent to it and acknowledged) for a TCP socket; (0, 0) otherwise."""
    try:
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return 0, 0
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _SIZE)
    except OSError:
        return 0, 0
    if len(info) < _AT + _BYTES.size:
        return 0, 0
    acked, received = _BYTES.unpack_from(info, _AT)
    return received, acked
