"""Zero-downtime upgrade: an old pooler hands its listening sockets and then its clients to a new one.

The old process (one pooler, or the acceptor of several workers) checks the config with the program
now on disk (`--check-config`), starts it with one end of a unix socket pair (`--upgrade-fd`), and
sends it the listening sockets (HELLO). The successor listens on them (they are never closed, so no
connection is refused at any moment), and says READY once it serves; only then does the old one stop
accepting. From then on every client of the old process moves at its next idle point (between
transactions): its socket, and the server it holds in session mode, go over the link with the
state the successor continues from (ClientConn.hand_over_state). A CancelRequest the successor
does not know comes back over the link (REROUTE): its client is still on the old process.

Successor is the old side, Predecessor the new side.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pgdoorman import channel, sdnotify

log = logging.getLogger("pgdoorman")
CHECK_TIMEOUT = 60.0  # the new program's --check-config
READY_TIMEOUT = 60.0  # from starting the successor to its READY


class UpgradeFailed(Exception):
    """The upgrade did not happen; the old pooler serves on. The message is for the operator."""


async def check_config(argv: list[str]) -> None:
    """Validate the config with the program on disk (argv: how to start it, with its -c)."""
    proc = await asyncio.create_subprocess_exec(*argv, "--check-config", stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CHECK_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise UpgradeFailed(f"the new program's --check-config did not finish in {CHECK_TIMEOUT:g}s") \
            from None
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise UpgradeFailed(f"the config does not pass the new program's check: {text}")


def refusal(upgrading: bool, predecessor: Predecessor | None, shutting_down: bool) -> str:
    """Why an upgrade cannot start now ("" if it can): one at a time, and none while this process's
    own predecessor is still handing over (cancel keys tell two generations apart, not three)."""
    if upgrading:
        return "an upgrade is already in progress"
    if predecessor is not None and predecessor.alive:
        return "the previous upgrade's old process is still handing its clients over"
    if shutting_down:
        return "the pooler is shutting down"
    return ""


class Successor:
    """The old side: the new pooler process and the link to it."""

    def __init__(self, argv: list[str], generation: int,
                 on_cancel: Callable[[bytes, socket.socket], None],
                 on_lost: Callable[[], None], on_returned: Callable[[bytes, list[int]], None]) -> None:
        self._argv = argv
        self.generation = generation  # the successor's
        self._on_cancel = on_cancel  # a CancelRequest it passes back, with the bytes it read
        self._on_lost = on_lost  # the successor died after READY: the old process serves on
        self._on_returned = on_returned  # a client not yet sent when it died (MOVED_CLIENT, fds)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self._link: socket.socket | None = None
        self.outbox: channel.Outbox | None = None
        self._ready: asyncio.Future[int] | None = None
        self.gone = False

    async def start(self, listeners: list[socket.socket], servers: dict[str, int]) -> int:
        """Start the successor, give it the listening sockets and how many servers each pool has
        (it opens as many before READY), and wait for its READY: its pid."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*self._argv, "--upgrade-fd", str(theirs.fileno()), "--generation", str(self.generation)]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise UpgradeFailed(f"cannot start the new program: {exc}") from None
        finally:
            theirs.close()
        self._link = ours
        try:
            hello = {"generation": self.generation, "servers": servers}
            channel.send(ours, channel.pack(channel.HELLO, hello), [sock.fileno() for sock in listeners])
        except OSError as exc:
            self._abandon()
            raise UpgradeFailed(f"cannot pass the listening sockets to the new process: {exc}") from None
        ours.setblocking(False)
        self.outbox = channel.Outbox(ours, self._on_returned)
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._receive)
        try:
            self.pid = await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except TimeoutError:
            self._abandon()
            raise UpgradeFailed(f"the new process did not become ready in {READY_TIMEOUT:g}s") from None
        except UpgradeFailed:
            self._abandon()
            raise
        return self.pid

    def _abandon(self) -> None:
        """Before READY: the successor never served anyone; stop it and forget the link."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_link()

    def _close_link(self) -> None:
        self.gone = True
        if self._link is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._link.fileno())
            except (RuntimeError, ValueError):
                pass
            if self.outbox is not None:
                self.outbox.close()
            self._link.close()
            self._link = None

    def _receive(self) -> None:
        assert self._link is not None
        while self._link is not None:
            try:
                data, fds = channel.receive_all(self._link)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                ready = self._ready
                if ready is not None and not ready.done():
                    code = self.proc.wait() if self.proc is not None else None
                    ready.set_exception(UpgradeFailed(f"the new process exited (code {code}) before it was "
                                                      "ready: see its log lines above"))
                    self._close_link()
                    return
                if self.proc is not None:
                    self.proc.poll()  # (reaped: it was started by this process)
                log.error("upgrade: the new process (pid %d) is gone", self.pid)
                self._close_link()
                self._on_lost()
                return
            kind = data[0]
            if kind == channel.READY and self._ready is not None and not self._ready.done():
                self._ready.set_result(channel.unpack(data))
            elif kind == channel.REROUTE and fds:
                initial = channel.unpack(data)[0]
                self._on_cancel(initial, socket.socket(fileno=fds[0]))
                fds = fds[1:]
            for fd in fds:
                os.close(fd)

    def send_client(self, state: dict[str, Any], fds: list[int]) -> None:
        """A client (and the server it holds) for the successor; the fds are closed once sent."""
        assert self.outbox is not None
        self.outbox.put_fds(channel.pack(channel.MOVED_CLIENT, state), fds)

    def forward(self, packet: bytes, fds: list[int]) -> None:
        """A MOVED_CLIENT packet a worker sent (several workers: the acceptor passes them on)."""
        assert self.outbox is not None
        self.outbox.put_fds(packet, fds)

    def announce(self) -> None:
        """The hand-over is complete: the service manager follows the successor from now on."""
        sdnotify.notify(f"MAINPID={self.pid}\nREADY=1\nSTATUS=upgraded to pid {self.pid}")

    def close(self) -> None:
        self._close_link()


class Predecessor:
    """The new side: the link to the old pooler while it hands its clients over."""

    def __init__(self, fd: int) -> None:
        self._link: socket.socket | None = socket.socket(fileno=fd)
        self.generation = 0
        self.servers: dict[str, int] = {}  # the old process's servers per pool ("db/user")
        self.outbox: channel.Outbox | None = None

    def hello(self) -> list[socket.socket]:
        """Read the old pooler's HELLO (blocking, at start): the listening sockets it passes on."""
        assert self._link is not None
        self._link.settimeout(READY_TIMEOUT)
        data, fds = channel.receive_all(self._link)
        if not data or data[0] != channel.HELLO:
            for fd in fds:
                os.close(fd)
            raise OSError("upgrade: no HELLO from the old process")
        hello = channel.unpack(data)
        self.generation = hello["generation"]
        self.servers = dict(hello.get("servers", {}))
        self._link.setblocking(False)
        self.outbox = channel.Outbox(self._link)
        return [socket.socket(fileno=fd) for fd in fds]

    def ready(self) -> None:
        self._send(channel.pack(channel.READY, os.getpid()), [])

    def listen(self, on_client: Callable[[bytes, list[int]], None], on_gone: Callable[[], None]) -> None:
        """Receive the clients handed over (MOVED_CLIENT packets, with their fds)."""
        link = self._link
        assert link is not None

        def receive() -> None:
            while self._link is not None:
                try:
                    data, fds = channel.receive_all(link)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data, fds = b"", []
                if not data:
                    log.info("upgrade: the old process has finished handing over")
                    self.close()
                    on_gone()
                    return
                if data[0] == channel.MOVED_CLIENT and fds:
                    on_client(data, fds)
                else:
                    for fd in fds:
                        os.close(fd)

        asyncio.get_running_loop().add_reader(link.fileno(), receive)

    @property
    def alive(self) -> bool:
        return self._link is not None

    def forward_cancel(self, initial: bytes, fd: int) -> bool:
        """A CancelRequest (initial: its bytes) for a client still on the old process, with the
        connection it came on (fd: ours to close, now or once sent)."""
        if self._link is None:
            os.close(fd)
            return False
        self._send(channel.pack(channel.REROUTE, (initial, "", "", None)), [fd])
        return True

    def _send(self, packet: bytes, fds: list[int]) -> None:
        if self.outbox is not None:
            self.outbox.put_fds(packet, fds)

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            try:
                asyncio.get_running_loop().remove_reader(link.fileno())
            except (RuntimeError, ValueError):
                pass
            if self.outbox is not None:
                self.outbox.close()
            link.close()


def program_argv(config_path: str | None, log_level: str | None) -> list[str]:
    """How to start the program now on disk with the same config file and log level."""
    argv = [sys.executable, "-m", "pgdoorman"]
    if config_path:
        argv += ["-c", os.path.abspath(config_path)]
    if log_level:
        argv += ["--log-level", log_level]
    return argv
