"""`pgdoorman upgrade`: signal the running pooler (SIGUSR2) and wait for its successor."""

from __future__ import annotations

import os
import signal
import sys
import time

from pgdoorman.config import Config
from pgdoorman.process.pidfile import read_pidfile
from pgdoorman.process.upgrade import CHECK_TIMEOUT, READY_TIMEOUT

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
    if pid is None:
        if not path:
            print("pgdoorman upgrade: set general.pidfile in the config, or give --pid", file=sys.stderr)
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
