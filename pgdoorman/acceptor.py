"""Several worker processes: the acceptor accepts connections and passes each socket to the worker
with the fewest clients, over a unix socket (SCM_RIGHTS); the worker does everything else.

Accepting costs the acceptor one accept(), one sendmsg() and one close() per connection: it reads
nothing. A worker that finds a client is not its own sends it back with what it read, to be routed
by that (a "reroute"): a client of a pool the worker has no share of (`config.pool_share`: a pool
smaller than the number of workers), or a CancelRequest for a key another worker issued (its secret
key is ≡ worker mod workers, or it moved: see _moved_keys).

The acceptor also enforces max_client_conn over all workers, moves waiting clients between workers
when one has free servers or much shorter waits (from their LOAD reports), restarts a worker that
dies, and on SIGTERM/SIGINT stops the workers and waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from pgdoorman import channel
from pgdoorman.channel import Load
from pgdoorman.config import Config, pool_keys, pool_share
from pgdoorman.listen import listening_sockets
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

log = logging.getLogger("pgdoorman")
TICK = 0.25
RECHECK_FULL = 0.3  # over max_client_conn: decide again after the workers' next close reports
ACCEPT_BATCH = 64  # connections accepted per wake-up before the loop serves others
RESTART_BACKOFF = 2.0  # a worker that died younger than this is restarted only after it
STOP_GRACE = 10.0  # seconds the workers get to close their clients before SIGKILL
# Balancing waiting clients between workers (seconds; see Acceptor._balance)
STALE_LOAD = 1.0  # a LOAD report older than this is not acted on
BALANCE_PAUSE = 0.5  # after moving a pool's clients, let the reports show the effect first
FREE_SERVER_WAIT = 0.02  # a client waiting this long while another worker has a free server moves
IMBALANCE = 1.1  # ... or when its worker's mean wait is this much longer than another's
IMBALANCE_SLACK = 0.0005


@dataclass(eq=False)
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    clients: int = 0  # handed over and not yet reported gone
    started: float = 0.0
    restart_at: float = 0.0
    backlog: deque[tuple[bytes, socket.socket]] = field(default_factory=deque)  # channel was full
    # pool index -> (clients, waiters, oldest wait s, free servers, mean wait s), latest LOAD report
    loads: dict[int, Load] = field(default_factory=dict)
    loads_at: float = 0.0


class Acceptor:
    def __init__(self, config: Config, workers: int, worker_argv: list[str]) -> None:
        self.config = config
        self.workers = [Worker(i) for i in range(workers)]
        self._worker_argv = worker_argv  # how to start one: argv without --worker / --channel-fd
        # (database, user) -> the workers that have servers for that pool; and by pool index
        self._capable: dict[tuple[str, str], list[Worker]] = {}
        self._shares: list[list[int]] = []  # pool index -> each worker's pool_size share
        for index, (db, user) in enumerate(pool_keys(config)):
            size = config.pools[db].users[user].pool_size
            shares = [pool_share(size, index, w.index, workers) for w in self.workers]
            self._shares.append(shares)
            self._capable[(db, user)] = [w for w in self.workers if shares[w.index] > 0]
        self._moved_keys: dict[tuple[int, int], Worker] = {}  # cancel keys of clients that moved
        self._balanced_at: dict[int, float] = {}  # pool index -> when clients last moved
        self._stopped = asyncio.Event()
        self._listeners: list[socket.socket] = []

    # --- routing ---

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client waits in the backlog
                log.error("accept failed: %s", exc)
                return
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._full():
                # Workers report closed clients once per tick: look again after the next reports.
                asyncio.get_running_loop().call_later(RECHECK_FULL, self._admit_or_refuse, sock)
                continue
            self._admit(sock)

    def _full(self) -> bool:
        return sum(w.clients for w in self.workers) >= self.config.general.max_client_conn

    def _admit(self, sock: socket.socket) -> None:
        worker = min(self.workers, key=lambda w: w.clients)
        self._send(worker, channel.pack(channel.NEW_CLIENT), sock)

    def _admit_or_refuse(self, sock: socket.socket) -> None:
        if self._full():
            self._refuse(sock)
        else:
            self._admit(sock)

    def _refuse(self, sock: socket.socket) -> None:
        log.warning("client refused: max_client_conn (%d) reached", self.config.general.max_client_conn)
        try:
            sock.setblocking(False)
            sock.send(m.error_response(codes.TOO_MANY_CONNECTIONS, "sorry, too many clients already",
                                       "FATAL"))
        except OSError:
            pass
        sock.close()

    def _reroute(self, source: Worker, message: bytes, sock: socket.socket) -> None:
        """A worker passes back a client that belongs elsewhere, with the bytes it read."""
        source.clients = max(0, source.clients - 1)
        initial, database, user, cancel_key = channel.unpack(message)
        target: Worker | None = None
        if cancel_key is not None:
            pid, key = cancel_key
            target = self._moved_keys.get((pid, key)) or self.workers[key % len(self.workers)]
        else:
            capable = self._capable.get((database, user))
            if capable:
                target = min(capable, key=lambda w: w.clients)
        self._send(target or source, channel.pack(channel.FINAL_CLIENT) + initial, sock)

    def _send(self, worker: Worker, message: bytes, sock: socket.socket) -> None:
        worker.clients += 1
        if worker.backlog:
            worker.backlog.append((message, sock))
            return
        if not self._try_send(worker, message, sock):
            worker.backlog.append((message, sock))
            assert worker.channel is not None
            asyncio.get_running_loop().add_writer(worker.channel.fileno(), self._flush, worker)

    def _try_send(self, worker: Worker, message: bytes, sock: socket.socket) -> bool:
        """False when the channel is full (try again when writable); else the socket is handed over."""
        try:
            if worker.channel is None:
                raise OSError("worker not running")
            channel.send(worker.channel, message, sock.fileno())
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

    def _receive(self, worker: Worker) -> None:
        """Messages from a worker: clients gone, load reports, clients it passes on."""
        assert worker.channel is not None
        while True:
            try:
                data, fd = channel.receive(worker.channel)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fd = b"", None
            if not data:  # the worker is gone; the tick restarts it
                asyncio.get_running_loop().remove_reader(worker.channel.fileno())
                return
            kind = data[0]
            if kind == channel.CLIENTS_GONE:
                worker.clients = max(0, worker.clients - len(data))
            elif kind == channel.LOAD:
                worker.loads = {load[0]: load[1:] for load in channel.unpack(data)}
                worker.loads_at = time.monotonic()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("worker %d load: %s", worker.index, worker.loads)
            elif kind == channel.KEY_GONE:
                pid, key = channel.unpack(data)
                if self._moved_keys.get((pid, key)) is worker:
                    del self._moved_keys[(pid, key)]
            elif kind == channel.MOVED_CLIENT and fd is not None:
                self._pass_on(worker, data, socket.socket(fileno=fd))
            elif kind == channel.REROUTE and fd is not None:
                self._reroute(worker, data, socket.socket(fileno=fd))
            elif fd is not None:
                os.close(fd)

    def _pass_on(self, source: Worker, message: bytes, sock: socket.socket) -> None:
        state = channel.unpack(message)
        to = self.workers[state["to"]]
        source.clients = max(0, source.clients - 1)
        pid, key = state["cancel_key"]
        if key % len(self.workers) == to.index:
            self._moved_keys.pop((pid, key), None)
        else:
            self._moved_keys[(pid, key)] = to
        self._send(to, message, sock)

    # --- balancing waiting clients between workers ---

    def _balance(self) -> None:
        """Move waiting clients of a pool from the worker where they wait longest to one with free
        servers, or with much shorter waits. Pool shares are fixed, so this is how a client never
        waits in one worker while another has a server for it."""
        now = time.monotonic()
        fresh = [w for w in self.workers if w.channel is not None and now - w.loads_at < STALE_LOAD]
        waiting = {i for w in fresh for i, load in w.loads.items() if load[1]}
        for index in waiting:
            if now - self._balanced_at.get(index, 0.0) < BALANCE_PAUSE:
                continue
            shares = self._shares[index]
            # workers without a report for the pool have no clients of it: all their servers are free
            loads = {w: w.loads.get(index, (0, 0, 0.0, shares[w.index], 0.0)) for w in self.workers
                     if shares[w.index] > 0 and w.channel is not None}
            count, source, target = self._plan(loads)
            if source is None or target is None or count <= 0 or source not in fresh:
                continue
            self._balanced_at[index] = now
            assert source.channel is not None
            log.debug("pool %d: moving %d waiting clients from worker %d (waits %.1f ms) to worker %d "
                      "(%.1f ms)", index, count, source.index, loads[source][4] * 1000, target.index,
                      loads[target][4] * 1000)
            try:
                channel.send(source.channel, channel.pack(channel.MOVE_CLIENTS, (index, count, target.index)))
            except OSError:
                pass

    @staticmethod
    def _plan(loads: dict[Worker, Load]) -> tuple[int, Worker | None, Worker | None]:
        """How many waiting clients of one pool to move, from which worker to which."""
        waiting = [w for w in loads if loads[w][1]]
        if not waiting or len(loads) < 2:
            return 0, None, None
        # Free servers elsewhere, and nobody waiting there: move as many as they can take at once.
        source = max(waiting, key=lambda w: loads[w][2])
        free = [w for w in loads if w is not source and loads[w][3] > 0 and loads[w][1] == 0]
        if free and loads[source][2] > FREE_SERVER_WAIT:
            target = max(free, key=lambda w: loads[w][3])
            return min(loads[source][1], loads[target][3]), source, target
        # Everyone busy: wait ≈ clients / rate per worker; move clients towards equal mean waits,
        # halfway (the rates change as the load moves), and at most a tenth at a time.
        source = max(waiting, key=lambda w: loads[w][4])
        target = min((w for w in loads if w is not source), key=lambda w: loads[w][4])
        clients, waiters, _oldest, _free, wait = loads[source]
        t_clients, _t_waiters, _t_oldest, _t_free, t_wait = loads[target]
        if wait < IMBALANCE * t_wait + IMBALANCE_SLACK:
            return 0, None, None
        rate = clients / wait
        t_rate = max(t_clients, 1) / max(t_wait, 0.001)
        want = (clients + t_clients) * rate / (rate + t_rate)
        count = int(min(waiters, (clients - want) / 2, clients / 10))
        return (count, source, target) if count > 0 else (0, None, None)

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
        asyncio.get_running_loop().add_reader(ours.fileno(), self._receive, worker)
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
        worker.loads = {}
        self._moved_keys = {k: w for k, w in self._moved_keys.items() if w is not worker}
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
            try:
                self._balance()
            except Exception:  # supervision must never die
                log.exception("balancing failed")

    # --- life cycle ---

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._listeners = listening_sockets(self.config.general)
        for listener in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        for worker in self.workers:
            self._spawn(worker)
        supervisor = loop.create_task(self._supervise())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        await self._stopped.wait()
        log.info("shutting down: pooler shutting down")
        supervisor.cancel()
        for listener in self._listeners:
            loop.remove_reader(listener.fileno())
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
