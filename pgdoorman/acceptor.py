"""Several worker processes: the acceptor listens, reads each client's first packet, and passes the
socket (with the bytes read) to a worker over a unix socket (SCM_RIGHTS).

Why read the startup packet here: each worker has its own share of every pool's server limit
(`config.pool_share`), so a client must go to a worker that has servers for its (database, user);
among those, the one with the fewest clients. A CancelRequest goes to the worker that issued the
key (its pid part is ≡ worker mod workers). Everything else (bad packets, unknown databases) goes to
the least-loaded worker, which answers it exactly as a single-process pooler would.

The acceptor also enforces max_client_conn over all workers, restarts a worker that dies, and on
SIGTERM/SIGINT stops the workers and waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from pgdoorman.config import Config, pool_keys, pool_share
from pgdoorman.listen import HANDOFF_MAX, listen
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

log = logging.getLogger("pgdoorman")
_unpack_i32 = struct.Struct("!i").unpack_from
TICK = 0.25
RESTART_BACKOFF = 2.0  # a worker that died younger than this is restarted only after it
STOP_GRACE = 10.0  # seconds the workers get to close their clients before SIGKILL


@dataclass(eq=False)
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    clients: int = 0  # handed over and not yet reported gone
    started: float = 0.0
    restart_at: float = 0.0
    backlog: deque[tuple[bytes, socket.socket]] = field(default_factory=deque)  # channel was full


class Intake(asyncio.Protocol):
    """A new client until its first real packet is read (SSLRequest/GSSENCRequest answered "N")."""

    __slots__ = ("acceptor", "buf", "timer", "transport")

    def __init__(self, acceptor: Acceptor) -> None:
        self.acceptor = acceptor
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        timeout = self.acceptor.config.general.client_login_timeout
        if timeout:
            self.timer = asyncio.get_running_loop().call_later(timeout, self.close)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            length = _unpack_i32(buf, 0)[0]
            if length < 8 or length > codes.MAX_STARTUP_PACKET:
                break  # the worker sends the error
            if len(buf) < length:
                return
            code = _unpack_i32(buf, 4)[0]
            if length == 8 and code in (codes.SSL_REQUEST_CODE, codes.GSSENC_REQUEST_CODE):
                del buf[:8]
                assert self.transport is not None
                self.transport.write(b"N")  # as the worker would: TLS/GSS come later
                continue
            break
        else:
            return
        self.acceptor.route(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Acceptor:
    def __init__(self, config: Config, workers: int, worker_argv: list[str]) -> None:
        self.config = config
        self.workers = [Worker(i) for i in range(workers)]
        self._worker_argv = worker_argv  # how to start one: argv without --worker / --channel-fd
        # (database, user) -> the workers that have servers for that pool
        self._capable: dict[tuple[str, str], list[Worker]] = {}
        for index, (db, user) in enumerate(pool_keys(config)):
            size = config.pools[db].users[user].pool_size
            self._capable[(db, user)] = [w for w in self.workers
                                         if pool_share(size, index, w.index, workers) > 0]
        self._stopped = asyncio.Event()
        self._listeners: list[asyncio.AbstractServer] = []

    # --- routing ---

    def route(self, intake: Intake) -> None:
        transport = intake.transport
        assert transport is not None
        if intake.timer is not None:
            intake.timer.cancel()
        transport.pause_reading()
        packet = bytes(intake.buf)
        worker = self._choose(packet)
        if worker is None:
            transport.write(m.error_response(codes.TOO_MANY_CONNECTIONS, "sorry, too many clients already",
                                             "FATAL"))
            transport.close()
            log.warning("client refused: max_client_conn (%d) reached", self.config.general.max_client_conn)
            return
        sock = transport.get_extra_info("socket")
        try:
            own = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as exc:
            log.warning("client hand-over failed: %s", exc)
            transport.close()
            return
        transport.close()  # the worker's copy keeps the connection open
        self._send(worker, packet, own)

    def _choose(self, packet: bytes) -> Worker | None:
        """The worker for this first packet; None when max_client_conn is reached."""
        candidates = self.workers
        if len(packet) >= 8:
            code = _unpack_i32(packet, 4)[0]
            if code == codes.CANCEL_REQUEST_CODE and len(packet) == 16:
                return self.workers[_unpack_i32(packet, 8)[0] % len(self.workers)]
            if code >> 16 == 3:
                if sum(w.clients for w in self.workers) >= self.config.general.max_client_conn:
                    return None
                try:
                    params = m.parse_startup_params(packet[8:])
                except m.ProtocolError:
                    params = {}
                user = params.get("user", "")
                candidates = self._capable.get((params.get("database") or user, user)) or self.workers
        return min(candidates, key=lambda w: w.clients)

    def _send(self, worker: Worker, packet: bytes, sock: socket.socket) -> None:
        worker.clients += 1
        if worker.backlog:
            worker.backlog.append((packet, sock))
            return
        if not self._try_send(worker, packet, sock):
            worker.backlog.append((packet, sock))
            assert worker.channel is not None
            asyncio.get_running_loop().add_writer(worker.channel.fileno(), self._flush, worker)

    def _try_send(self, worker: Worker, packet: bytes, sock: socket.socket) -> bool:
        """False when the channel is full (try again when writable); else the socket is handed over."""
        try:
            if worker.channel is None:
                raise OSError("worker not running")
            socket.send_fds(worker.channel, [packet], [sock.fileno()])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.warning("client hand-over to worker %d failed: %s", worker.index, exc)
            worker.clients -= 1
        sock.close()
        return True

    def _flush(self, worker: Worker) -> None:
        while worker.backlog:
            packet, sock = worker.backlog[0]
            if not self._try_send(worker, packet, sock):
                return
            worker.backlog.popleft()
        if worker.channel is not None:
            asyncio.get_running_loop().remove_writer(worker.channel.fileno())

    def _notes(self, worker: Worker) -> None:
        """Bytes from a worker: one per client of ours that has gone."""
        assert worker.channel is not None
        try:
            data = worker.channel.recv(HANDOFF_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is gone; the tick restarts it
            asyncio.get_running_loop().remove_reader(worker.channel.fileno())
            return
        worker.clients = max(0, worker.clients - len(data))

    # --- workers ---

    def _spawn(self, worker: Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*self._worker_argv, "--worker", f"{worker.index}/{len(self.workers)}",
                "--channel-fd", str(theirs.fileno())]
        try:
            worker.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.channel = ours
        worker.started = time.monotonic()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._notes, worker)
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _reap(self, worker: Worker) -> None:
        """A worker died: its clients are gone with it; drop its channel and plan the restart."""
        assert worker.proc is not None
        loop = asyncio.get_running_loop()
        log.error("worker %d (pid %d) exited with code %s; restarting it", worker.index, worker.proc.pid,
                  worker.proc.returncode)
        if worker.channel is not None:
            loop.remove_reader(worker.channel.fileno())
            loop.remove_writer(worker.channel.fileno())
            worker.channel.close()
            worker.channel = None
        for _packet, sock in worker.backlog:
            sock.close()
        worker.backlog.clear()
        worker.clients = 0
        worker.proc = None
        young = time.monotonic() - worker.started < RESTART_BACKOFF
        worker.restart_at = time.monotonic() + (RESTART_BACKOFF if young else 0.0)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is not None:
                    self._reap(worker)
                if worker.proc is None and time.monotonic() >= worker.restart_at:
                    try:
                        self._spawn(worker)
                    except OSError as exc:
                        log.error("cannot start worker %d: %s", worker.index, exc)
                        worker.restart_at = time.monotonic() + RESTART_BACKOFF

    # --- life cycle ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._listeners = await listen(self.config.general, lambda: Intake(self))
        for worker in self.workers:
            self._spawn(worker)
        supervisor = loop.create_task(self._supervise())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self._stopped.wait()
        log.info("shutting down: pooler shutting down")
        supervisor.cancel()
        for listener in self._listeners:
            listener.close()
        await self._stop_workers()

    async def _stop_workers(self) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in procs:
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in %.0f s: killing it", proc.pid, STOP_GRACE)
                proc.kill()
                proc.wait()


def worker_argv(config_path: str | None, log_level: str | None) -> list[str]:
    """The command line that starts one worker (the acceptor appends --worker and --channel-fd)."""
    argv = [sys.executable, "-m", "pgdoorman"]
    if config_path:
        argv += ["-c", os.path.abspath(config_path)]
    if log_level:
        argv += ["--log-level", log_level]
    return argv


async def serve_workers(config: Config, workers: int, config_path: str | None, log_level: str | None) -> None:
    await Acceptor(config, workers, worker_argv(config_path, log_level)).run()
