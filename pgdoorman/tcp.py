"""TCP options of the pooler's sockets, from [general]: keepalive and TCP_USER_TIMEOUT.

Keepalive probes find a peer that died while the connection was idle (a server behind a cut
network looks idle forever otherwise); TCP_USER_TIMEOUT ends a connection whose sent data stays
unacknowledged that long (a frozen network while a query or its reply is in flight). Both are
Linux options; where the platform lacks one it is skipped.
"""

from __future__ import annotations

import socket

from pgdoorman.config import GeneralConfig


def tune(sock: socket.socket, general: GeneralConfig) -> None:
    """Apply the keepalive and user-timeout settings to a TCP socket (accepted sockets inherit
    them from their listening socket)."""
    if general.tcp_keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        intervals = (("TCP_KEEPIDLE", general.tcp_keepidle), ("TCP_KEEPINTVL", general.tcp_keepintvl))
        for option, value in intervals:
            if value and hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), max(1, round(value)))
        if general.tcp_keepcnt and hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, general.tcp_keepcnt)
    if general.tcp_user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
        milliseconds = max(1, round(general.tcp_user_timeout * 1000))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)
