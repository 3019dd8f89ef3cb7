"""Open files: RLIMIT_NOFILE raised at start, and what accepting does once the process has none left.

Every client and every server connection is a file descriptor, and the default soft limit (often 1024)
is far below what a pooler holds; the hard limit is what the administrator allows, so the soft limit is
raised to it in every process (cli.py).

When accept() fails with EMFILE/ENFILE the connection stays in the listen backlog and the socket stays
readable: an event loop that simply retries spins at 100 % CPU, and one that backs off leaves the client
hanging. So a spare descriptor is kept open on /dev/null: out of descriptors, it is closed to make room,
every waiting client is accepted, told PostgreSQL's "sorry, too many clients already" and closed, and the
spare is opened again. Refusals are logged once a second at most, with their count.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time

from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

log = logging.getLogger("pgdoorman")
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
LOG_EVERY = 1.0  # seconds between two "refused" lines
PAUSE = 0.5  # no spare to give up: accepting pauses this long instead of spinning
REFUSAL = m.error_response(codes.TOO_MANY_CONNECTIONS, "sorry, too many clients already", "FATAL",
                           detail="the pooler is out of file descriptors")


def raise_nofile_limit(needed: int = 0) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit and log it; warn when the result is below `needed`
    (descriptors this process expects to hold). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("open files limit (RLIMIT_NOFILE) stays %d: cannot raise it to %d: %s", soft,
                        target, exc)
            target = soft
        else:
            log.info("open files limit (RLIMIT_NOFILE) raised from %d to %d (the hard limit)", soft, target)
    else:
        target = soft
        log.info("open files limit (RLIMIT_NOFILE) is %d (the hard limit)", soft)
    if needed > target:
        log.warning("open files limit %d is below the %d this process may need (max_client_conn and "
                    "pool sizes): raise the hard limit (LimitNOFILE=, ulimit -Hn) or add workers",
                    target, needed)
    return soft, target


def _open_spare() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class FdGuard:
    """The spare descriptor of one process, and its refusals of clients for want of descriptors."""

    def __init__(self) -> None:
        self._spare = _open_spare()
        self._refused = 0  # not logged yet
        self._paused = False  # (not logged yet)
        self._logged_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def refuse_waiting(self, listener: socket.socket, exc: OSError) -> bool:
        """accept() on `listener` failed with `exc` (EMFILE/ENFILE): refuse every client waiting in its
        backlog. False when there was no spare to give up: the caller must stop reading the listener for
        a while (PAUSE), or it spins."""
        if self._spare < 0:
            self._paused = True
            self._note(0, exc)
            self._spare = _open_spare()  # some descriptor was freed since: take it for next time
            return False
        os.close(self._spare)
        self._spare = -1
        refused = 0
        try:
            while True:
                try:
                    sock, _addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # (ECONNABORTED, or the slot went to another thread)
                    break
                refused += 1
                try:
                    sock.setblocking(False)
                    sock.send(REFUSAL)  # into an empty send buffer: never blocks
                except OSError:
                    pass
                sock.close()
        finally:
            self._spare = _open_spare()
        self._note(refused, exc)
        return True

    def _note(self, refused: int, exc: OSError) -> None:
        self._refused += refused
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            self._log(exc)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + self._logged_at + LOG_EVERY - now, self._log, exc)

    def _log(self, exc: OSError) -> None:
        self._timer = None
        self._logged_at = time.monotonic()
        if self._refused or self._paused:
            log.warning("out of file descriptors (%s): %d new client%s refused%s", exc.strerror,
                        self._refused, "" if self._refused == 1 else "s",
                        ", accepting paused" if self._paused else "")
        self._refused, self._paused = 0, False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
