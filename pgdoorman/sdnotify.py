"""systemd's sd_notify protocol without libsystemd: datagrams to $NOTIFY_SOCKET (READY=1,
RELOADING=1, STOPPING=1, STATUS=...). A no-op when the variable is unset."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("pgdoorman")


def notify(state: str) -> bool:
    """Send one state string; False when there is no service manager (or it cannot be reached)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    if "RELOADING=1" in state and "MONOTONIC_USEC=" not in state:
        # systemd ≥ 253 (Type=notify-reload) wants the time the reload began
        state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
