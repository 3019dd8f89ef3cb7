"""`pgdoorman upgrade`: have the running pooler hand over to the program on disk. With
general.pidfile (or --pid): SIGUSR2, then wait until the pidfile names a new live process. Without
one: the console's UPGRADE over the unix socket, logged in by peer credentials (the OS user the
pooler runs as needs no password there)."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator

from pgdoorman.config import Config
from pgdoorman.process.pidfile import read_pidfile
from pgdoorman.process.upgrade import CHECK_TIMEOUT, READY_TIMEOUT
from pgdoorman.protocol import messages as m

POLL = 0.1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def upgrade_running(config: Config, pid: int | None) -> int:
    """0 once the pidfile names a new, live process; 1 if the upgrade did not happen (the old
    pooler serves on, and its log says why)."""
    path = config.general.pidfile
    if pid is None and not path and config.general.unix_socket_dir:
        g = config.general
        return _console_upgrade(os.path.join(g.unix_socket_dir, f".s.PGSQL.{g.port}"))
    if pid is None:
        if not path:
            print("pgdoorman upgrade: set general.pidfile (or unix_socket_dir) in the config, or give --pid",
                  file=sys.stderr)
            return 1
        pid = read_pidfile(path)
        if pid is None:
            print(f"pgdoorman upgrade: {path}: no pid in it (is the pooler running?)", file=sys.stderr)
            return 1
    try:
        os.kill(pid, signal.SIGUSR2)
    except OSError as exc:
        print(f"pgdoorman upgrade: cannot signal pid {pid}: {exc.strerror}", file=sys.stderr)
        return 1
    if not path:
        print(f"pgdoorman upgrade: SIGUSR2 sent to pid {pid}; its log tells how the upgrade went")
        return 0
    deadline = time.monotonic() + CHECK_TIMEOUT + READY_TIMEOUT
    while time.monotonic() < deadline:
        new = read_pidfile(path)
        if new is not None and new != pid and _alive(new):
            print(f"pgdoorman upgrade: pid {pid} handed over to pid {new}")
            return 0
        time.sleep(POLL)
    print(f"pgdoorman upgrade: no new process after {CHECK_TIMEOUT + READY_TIMEOUT:g}s; pid {pid} serves on "
          "(its log tells why)", file=sys.stderr)
    return 1


def _console_upgrade(path: str) -> int:
    """UPGRADE on the console over the unix socket; 0 when it answers UPGRADE."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CHECK_TIMEOUT + READY_TIMEOUT)
            sock.connect(path)
            sock.sendall(m.startup_message({"user": user, "database": "pgdoorman"}))
            sent_query = False
            failed = False
            for kind, body in _messages(sock):
                if kind == b"R" and struct.unpack_from("!i", body)[0] != 0:
                    print(f"pgdoorman upgrade: the console at {path} wants a password from {user}: set "
                          "general.pidfile and use it instead", file=sys.stderr)
                    return 1
                if kind in (b"E", b"N"):
                    fields = dict((f[:1], f[1:]) for f in body.split(b"\0") if f)
                    text = fields.get(b"M", b"").decode(errors="replace")
                    print(f"pgdoorman upgrade: {text}", file=sys.stderr if kind == b"E" else sys.stdout)
                    failed |= kind == b"E"
                if kind == b"Z":
                    if sent_query or failed:
                        sock.sendall(m.TERMINATE)
                        return 1 if failed else 0
                    sock.sendall(m.query("UPGRADE"))
                    sent_query = True
    except OSError as exc:
        print(f"pgdoorman upgrade: cannot reach the console at {path}: {exc}", file=sys.stderr)
        return 1
    print("pgdoorman upgrade: the console closed the connection", file=sys.stderr)
    return 1


def _messages(sock: socket.socket) -> Iterator[tuple[bytes, bytes]]:
    """(kind, body) of each backend message until the connection ends."""
    buf = b""
    while True:
        while len(buf) >= 5:
            length = struct.unpack_from("!i", buf, 1)[0]
            if len(buf) < 1 + length:
                break
            yield buf[:1], buf[5 : 1 + length]
            buf = buf[1 + length :]
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
