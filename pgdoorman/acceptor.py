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
import itertools
import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgdoorman import channel, sdnotify
from pgdoorman.admin import coordinate
from pgdoorman.cancel import issued_by
from pgdoorman.channel import Assembler, Load
from pgdoorman.config import Config, ConfigError, pool_keys, pool_share
from pgdoorman.fdlimit import OUT_OF_FDS, PAUSE, FdGuard
from pgdoorman.limits import ClientCaps
from pgdoorman.listen import listening_sockets
from pgdoorman.logs import set_log_level
from pgdoorman.process.pidfile import write_pidfile
from pgdoorman.process.upgrade import (
    Predecessor,
    Successor,
    UpgradeFailed,
    check_config,
    program_argv,
    refusal,
)
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

if TYPE_CHECKING:
    from pgdoorman.metrics.http import MetricsServer

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
class Fanout:
    """A control request out to every worker: the answers so far, and who still owes one."""

    waiting: set[int]
    results: dict[int, Any]
    done: Callable[[list[Any]], None]


@dataclass(eq=False)
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    clients: int = 0  # handed over and not yet reported gone
    started: float = 0.0
    restart_at: float = 0.0
    # channel was full: client hand-overs (with their sockets) and control packets (None)
    backlog: deque[tuple[bytes, list[socket.socket] | None]] = field(default_factory=deque)
    parts: Assembler = field(default_factory=Assembler)
    # pool index -> (clients, waiters, oldest wait s, free servers, mean wait s), latest LOAD report
    loads: dict[int, Load] = field(default_factory=dict)
    loads_at: float = 0.0
    caps: ClientCaps = field(default_factory=ClientCaps)  # its clients under the caps (limits.py)
    dead: bool = False  # its channel failed: it has exited, and is reaped at the next tick


class Acceptor:
    def __init__(self, config: Config, workers: int, worker_argv: list[str], generation: int = 0) -> None:
        self.config = config
        self.generation = generation  # upgrades that led to this process (process/upgrade.py)
        self._successor: Successor | None = None  # an upgrade under way (old side)
        self.handing_over = False  # the successor serves; the workers hand their clients over
        self.predecessor: Predecessor | None = None  # the old pooler handing over to this one
        self._started: set[int] = set()  # workers that said STARTED
        self.log_level: str | None = None  # the command line's --log-level, for the successor
        self.workers = [Worker(i) for i in range(workers)]
        self._worker_argv = worker_argv  # how to start one: argv without --worker / --channel-fd
        # (database, user) -> the workers that have servers for that pool; and by pool index
        self._capable: dict[tuple[str, str], list[Worker]] = {}
        self._shares: list[list[int]] = []  # pool index -> each worker's pool_size share
        self._plan_shares(config)
        self._moved_keys: dict[tuple[int, int], Worker] = {}  # cancel keys of clients that moved
        self.caps = ClientCaps()  # the whole pooler's clients under the caps
        self._balanced_at: dict[int, float] = {}  # pool index -> when clients last moved
        self._stopped = asyncio.Event()
        self._listeners: list[socket.socket] = []
        self._fds = FdGuard()  # a spare descriptor, to refuse clients once there are none left
        self._fanouts: dict[int, Fanout] = {}
        self._fanout_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.shutdown_mode = ""
        self._shutdown_deadline = 0.0
        self._metrics: MetricsServer | None = None

    def _plan_shares(self, config: Config) -> None:
        self._capable, self._shares = {}, []
        for index, (db, user) in enumerate(pool_keys(config)):
            size = config.pools[db].users[user].pool_size
            shares = [pool_share(size, index, w.index, len(self.workers)) for w in self.workers]
            self._shares.append(shares)
            self._capable[(db, user)] = [w for w in self.workers if shares[w.index] > 0]

    # --- routing ---

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_FDS:  # refused, not left in the backlog (readable: a spin)
                    if not self._fds.refuse_waiting(listener, exc):
                        loop = asyncio.get_running_loop()
                        loop.remove_reader(listener.fileno())
                        loop.call_later(PAUSE, self._resume_accepting, listener)
                else:  # ECONNABORTED and the like: that client's problem, not the listener's
                    log.info("accept failed: %s", exc)
                return
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._full():
                # Workers report closed clients once per tick: look again after the next reports.
                asyncio.get_running_loop().call_later(RECHECK_FULL, self._admit_or_refuse, sock)
                continue
            self._admit(sock)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self._listeners and not self.shutdown_mode:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _full(self) -> bool:
        return sum(w.clients for w in self.workers) >= self.config.general.max_client_conn

    def _admit(self, sock: socket.socket) -> None:
        live = [w for w in self.workers if w.channel is not None and not w.dead] or self.workers
        worker = min(live, key=lambda w: w.clients)
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
            target = self._moved_keys.get((pid, key))
            predecessor = self.predecessor
            if (target is None and predecessor is not None and predecessor.alive
                    and not issued_by(key, self.generation)):
                # an older pooler's key, and its client has not moved here: it is still there
                predecessor.forward_cancel(initial, sock.detach())
                return
            target = target or self.workers[key % len(self.workers)]
        else:
            capable = self._capable.get((database, user))
            if capable:
                target = min(capable, key=lambda w: w.clients)
        self._send(target or source, channel.pack(channel.FINAL_CLIENT) + initial, sock)

    def _send(self, worker: Worker, message: bytes, sock: socket.socket | list[socket.socket]) -> None:
        """A client for a worker (with the socket of the server it holds, handed over by an upgrade)."""
        socks = sock if isinstance(sock, list) else [sock]
        worker.clients += 1
        if worker.backlog or ((worker.channel is None or worker.dead) and not self.shutdown_mode):
            # (a worker being restarted: its clients wait for it, flushed by _spawn)
            worker.backlog.append((message, socks))
            return
        if not self._try_send(worker, message, socks):
            worker.backlog.append((message, socks))
            if worker.channel is not None and not worker.dead:
                asyncio.get_running_loop().add_writer(worker.channel.fileno(), self._flush, worker)

    def _try_send(self, worker: Worker, message: bytes, socks: list[socket.socket] | None) -> bool:
        """False when the channel is full (try again when writable); else the sockets are handed
        over (None: a control packet)."""
        try:
            if worker.channel is None:
                raise OSError("worker not running")
            channel.send(worker.channel, message, None if socks is None else [s.fileno() for s in socks])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if socks is None:
                return True  # the worker is gone: its fan-outs are settled when it is reaped
            if not self.shutdown_mode:
                # It has exited and is not reaped yet: the client waits for its restart (_reap, _spawn)
                log.info("worker %d is gone: a client waits for its restart (%s)", worker.index, exc)
                worker.dead = True
                if worker.channel is not None:
                    asyncio.get_running_loop().remove_writer(worker.channel.fileno())
                return False
            log.warning("client hand-over to worker %d failed: %s", worker.index, exc)
            worker.clients -= 1
        for sock in socks or ():
            sock.close()
        return True

    def _send_control(self, worker: Worker, packets: Any) -> None:
        for packet in packets:
            if worker.backlog or not self._try_send(worker, packet, None):
                if not worker.backlog and worker.channel is not None:
                    asyncio.get_running_loop().add_writer(worker.channel.fileno(), self._flush, worker)
                worker.backlog.append((packet, None))

    # --- control: console requests, reload, shutdown (see admin/) ---

    def _broadcast(self, request: dict[str, Any], done: Callable[[list[Any]], None]) -> None:
        live = [w for w in self.workers if w.channel is not None]
        if not live:
            done([])
            return
        fanout_id = next(self._fanout_ids)
        self._fanouts[fanout_id] = Fanout({w.index for w in live}, {}, done)
        for worker in live:
            self._send_control(worker, channel.parts(channel.REQUEST, fanout_id, request))

    def _answered(self, worker: Worker, fanout_id: int, result: Any) -> None:
        fanout = self._fanouts.get(fanout_id)
        if fanout is None:
            return
        fanout.results[worker.index] = result
        fanout.waiting.discard(worker.index)
        self._settle(fanout_id)

    def _settle(self, fanout_id: int) -> None:
        fanout = self._fanouts[fanout_id]
        if not fanout.waiting:
            del self._fanouts[fanout_id]
            fanout.done([fanout.results[i] for i in sorted(fanout.results)])

    async def _to_all(self, request: dict[str, Any]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._broadcast(request, lambda results: None if future.done() else future.set_result(results))
        return await future

    async def ask(self, request: dict[str, Any]) -> list[Any]:
        """Every worker's answer to a console request, after what the acceptor does once for the
        whole pooler (admin/coordinate.py)."""
        op = request["op"]
        if op in ("reload", "set"):
            try:
                config = coordinate.next_config(request, self.config)
            except ConfigError as exc:
                log.error("%s refused, the running config is kept: %s", op.upper(), exc)
                return [{"error": str(exc)}]
            sdnotify.notify("RELOADING=1")
            self.apply_config(config)
            results = await self._to_all({"op": "reload", "text": config.text, "path": config.path})
            restart = sorted({k for r in results if isinstance(r, dict) for k in r.get("restart", ())})
            log.info("%s: config %s applied to %d workers%s", op.upper(), config.path, len(results),
                     f"; {coordinate.restart_note(restart)}" if restart else "")
            sdnotify.notify(f"READY=1\nSTATUS={self.status_line()}")
            return results
        if op == "shutdown":
            # After the answer has gone to the console (its worker may stop at once)
            asyncio.get_running_loop().call_soon(self.begin_shutdown, request["mode"])
            return [True]
        if op == "upgrade":
            return [await self.upgrade()]
        return await self._to_all(request)

    # --- upgrade (process/upgrade.py): the old side, then the new side ---

    def _upgrade_signal(self) -> None:
        log.info("signal: upgrade")
        self._spawn_task(self.upgrade())

    async def upgrade(self) -> dict[str, Any]:
        """SIGUSR2 or UPGRADE: start the program on disk as the successor (an acceptor with its own
        workers) and have every worker hand its clients over. {"pid": ...} or {"error": ...}."""
        why = refusal(self._successor is not None, self.predecessor, bool(self.shutdown_mode))
        if why:
            log.error("upgrade refused: %s", why)
            return {"error": why}
        argv = program_argv(self.config.path if os.path.isfile(self.config.path) else None, self.log_level)
        successor = Successor(argv, self.generation + 1, self._cancel_from_successor,
                              self._successor_lost, self._moved_in)
        self._successor = successor
        try:
            await check_config(argv)
            log.info("upgrade: the config passes the new program's check; starting it")
            counts: dict[str, int] = {}
            for answer in await self._to_all({"op": "servers"}):
                for name, count in (answer if isinstance(answer, dict) else {}).items():
                    counts[name] = counts.get(name, 0) + count
            pid = await successor.start(self._listeners, counts)
        except UpgradeFailed as exc:
            self._successor = None
            log.error("upgrade failed, serving on: %s", exc)
            return {"error": str(exc)}
        loop = asyncio.get_running_loop()
        for listener in self._listeners:  # the successor accepts on them now (kept: _successor_lost)
            loop.remove_reader(listener.fileno())
        log.info("upgrade: the new process (pid %d) serves; the workers hand %s over", pid,
                 self.status_line())
        self.handing_over = True  # no worker is restarted; they exit once empty (_supervise)
        timeout = self.config.general.shutdown_timeout
        self._shutdown_deadline = time.monotonic() + timeout + STOP_GRACE if timeout else 0.0
        for worker in self.workers:
            self._send_control(worker, [channel.pack(channel.HAND_OVER)])
        return {"pid": pid}

    def _hand_over_progress(self) -> None:
        """Each tick of the hand-over: done once every worker has exited and the last clients they
        passed on have gone to the successor; workers still there at the deadline are killed."""
        running = [w for w in self.workers if w.proc is not None]
        outbox = self._successor.outbox if self._successor is not None else None
        if not running and not (outbox is not None and len(outbox)):
            successor = self._successor
            assert successor is not None
            log.info("upgrade: every worker has handed its clients over; exiting")
            if self._metrics is not None:
                self._metrics.close()  # its port is the successor's to bind (it retries until free)
                self._metrics = None
            successor.announce()
            self.handing_over = False
            self.shutdown_mode = "upgraded"
            self._stopped.set()
        elif self._shutdown_deadline and time.monotonic() >= self._shutdown_deadline:
            for worker in running:
                if worker.proc is not None and worker.proc.poll() is None:
                    log.warning("worker %d did not finish its hand-over in time: killing it", worker.index)
                    worker.proc.kill()

    def _successor_lost(self) -> None:
        """The new process died during the hand-over: serve on, with every worker (the ones that
        had finished are started again)."""
        if not self.handing_over:
            return
        log.error("upgrade: the new process died during the hand-over; this pooler serves on")
        self.handing_over = False
        self._successor = None
        self._shutdown_deadline = 0.0
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        for worker in self.workers:
            worker.restart_at = 0.0  # the ones that finished start again at the next tick
            if worker.channel is not None:
                self._send_control(worker, [channel.pack(channel.HAND_OVER, False)])
        write_pidfile(self.config.general.pidfile)

    def _cancel_from_successor(self, initial: bytes, sock: socket.socket) -> None:
        """A CancelRequest the successor did not know: to the worker of its key."""
        pid, key = struct.unpack_from("!ii", initial, 8)
        target = self._moved_keys.get((pid, key)) or self.workers[key % len(self.workers)]
        self._send(target, channel.pack(channel.FINAL_CLIENT) + initial, sock)

    def _moved_in(self, packet: bytes, fds: list[int]) -> None:
        """A client the old pooler handed over: to the worker its cancel key routes to, if that one
        serves its pool (else the least busy that does, remembered in _moved_keys)."""
        state = channel.unpack(packet)
        socks = [socket.socket(fileno=fd) for fd in fds]
        pid, key = state["cancel_key"]
        capable = self._capable.get((state["database"], state["user"])) or self.workers
        natural = self.workers[key % len(self.workers)]
        target = natural if natural in capable else min(capable, key=lambda w: w.clients)
        if target is not natural:
            self._moved_keys[(pid, key)] = target
        if state.get("counted"):
            self.caps.admit(state["user"], state["database"], 0, 0)
            target.caps.admit(state["user"], state["database"], 0, 0)
        self._send(target, packet, socks)

    async def _wait_started(self) -> None:
        """An upgrade's successor says READY once every worker serves."""
        deadline = time.monotonic() + STOP_GRACE * 3
        while len(self._started) < len(self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def _serve_request(self, worker: Worker, request_id: int, request: dict[str, Any]) -> None:
        results = await self.ask(request)
        self._send_control(worker, channel.parts(channel.REPLY, request_id, results))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def apply_config(self, config: Config) -> None:
        self.config = config
        set_log_level(config.general.log_level)
        self._plan_shares(config)
        # Pool indices may have changed: balance only on reports made after the workers reload.
        now = time.monotonic()
        for worker in self.workers:
            worker.loads = {}
            worker.loads_at = 0.0
        self._balanced_at = dict.fromkeys(range(len(self._shares)), now)

    def status_line(self) -> str:
        return f"{sum(w.clients for w in self.workers)} clients, {len(self.workers)} workers"

    def begin_shutdown(self, mode: str) -> None:
        """Stop accepting, and have every worker shut down in this mode (App.begin_shutdown)."""
        if self.shutdown_mode == coordinate.IMMEDIATE:
            return
        first = not self.shutdown_mode
        self.shutdown_mode = mode
        if first:
            sdnotify.notify("STOPPING=1")
            loop = asyncio.get_running_loop()
            for listener in self._listeners:
                loop.remove_reader(listener.fileno())
                listener.close()
            self._listeners = []
            timeout = self.config.general.shutdown_timeout
            self._shutdown_deadline = time.monotonic() + timeout + STOP_GRACE if timeout else 0.0
            log.info("shutting down (%s): %s", mode, self.status_line())
        if mode == coordinate.IMMEDIATE:
            soon = time.monotonic() + STOP_GRACE
            self._shutdown_deadline = min(self._shutdown_deadline or soon, soon)
        self._broadcast({"op": "shutdown", "mode": mode}, lambda _results: None)
        self._stopped.set()

    def _signalled(self, mode: str) -> None:
        if self.shutdown_mode and mode != coordinate.IMMEDIATE:
            mode = coordinate.IMMEDIATE  # a second SIGTERM or SIGINT
        log.info("signal: shutdown (%s)", mode)
        self.begin_shutdown(mode)

    def _reload_signal(self) -> None:
        log.info("signal: reload")
        self._spawn_task(self.ask({"op": "reload"}))



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
                data, fds = channel.receive_all(worker.channel)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            fd = fds[0] if fds else None
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
            elif kind == channel.REQUEST or kind == channel.REPLY:
                whole = worker.parts.feed(data)
                if whole is not None:
                    request_id, payload = whole
                    if kind == channel.REPLY:
                        self._answered(worker, request_id, payload)
                    else:
                        self._spawn_task(self._serve_request(worker, request_id, payload))
            elif kind == channel.ADMIT:
                request_id, user, database = channel.unpack(data)
                general = self.config.general
                refusal = self.caps.admit(user, database, general.max_user_client_connections,
                                          general.max_db_client_connections)
                if refusal is None:
                    worker.caps.admit(user, database, 0, 0)
                self._send_control(worker, [channel.pack(channel.ADMITTED, (request_id, refusal))])
            elif kind == channel.LEAVE:
                user, database = channel.unpack(data)
                if worker.caps.users[user] > 0:  # (a worker restarted since: counted out already)
                    worker.caps.leave(user, database)
                    self.caps.leave(user, database)
            elif kind == channel.MOVED_CLIENT and fd is not None:
                self._pass_on(worker, data, [socket.socket(fileno=f) for f in fds])
                continue
            elif kind == channel.STARTED:
                self._started.add(worker.index)
            elif kind == channel.REROUTE and fd is not None:
                self._reroute(worker, data, socket.socket(fileno=fd))
            elif fd is not None:
                os.close(fd)
            for extra in fds[1:]:
                os.close(extra)

    def _pass_on(self, source: Worker, message: bytes, socks: list[socket.socket]) -> None:
        state = channel.unpack(message)
        source.clients = max(0, source.clients - 1)
        if state["to"] == -1:  # handed over to an upgrade's successor
            if state.get("counted"):
                source.caps.leave(state["user"], state["database"])
                self.caps.leave(state["user"], state["database"])
            if self._successor is None:  # it died: the client stays with this pooler
                self._moved_in(message, [sock.detach() for sock in socks])
                return
            self._successor.forward(message, [sock.detach() for sock in socks])
            return
        to = self.workers[state["to"]]
        if state.get("counted"):  # its place under the client caps moves with it
            source.caps.leave(state["user"], state["database"])
            to.caps.admit(state["user"], state["database"], 0, 0)
        pid, key = state["cancel_key"]
        if key % len(self.workers) == to.index:
            self._moved_keys.pop((pid, key), None)
        else:
            self._moved_keys[(pid, key)] = to
        self._send(to, message, socks)

    # --- balancing waiting clients between workers ---

    def _balance(self) -> None:
        """Move waiting clients of a pool from the worker where they wait longest to one with free
        servers, or with much shorter waits. Pool shares are fixed, so this is how a client never
        waits in one worker while another has a server for it."""
        if self.shutdown_mode:
            return
        now = time.monotonic()
        fresh = [w for w in self.workers if w.channel is not None and now - w.loads_at < STALE_LOAD]
        waiting = {i for w in fresh for i, load in w.loads.items() if load[1]}
        for index in waiting:
            if index >= len(self._shares) or now - self._balanced_at.get(index, 0.0) < BALANCE_PAUSE:
                continue  # (a report from before a reload that removed pools)
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
        # The running config goes along (the file may have changed since, or be broken)
        text = os.memfd_create("pgdoorman-config")
        os.write(text, self.config.text.encode())
        os.lseek(text, 0, os.SEEK_SET)
        argv = [*self._worker_argv, "--worker", f"{worker.index}/{len(self.workers)}",
                "--generation", str(self.generation),
                "--channel-fd", str(theirs.fileno()), "--config-fd", str(text)]
        try:
            worker.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), text])
        finally:
            theirs.close()
            os.close(text)
        ours.setblocking(False)
        worker.channel = ours
        worker.started = time.monotonic()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._receive, worker)
        if worker.backlog:  # clients that came while it was being restarted
            asyncio.get_running_loop().add_writer(ours.fileno(), self._flush, worker)
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def _reap(self, worker: Worker) -> None:
        """A worker died: its clients are gone with it; drop its channel and plan the restart."""
        assert worker.proc is not None
        loop = asyncio.get_running_loop()
        if self.shutdown_mode or self.handing_over:
            log.info("worker %d (pid %d) stopped", worker.index, worker.proc.pid)
        else:
            log.error("worker %d (pid %d) exited with code %s; restarting it", worker.index, worker.proc.pid,
                      worker.proc.returncode)
        if worker.channel is not None:
            loop.remove_reader(worker.channel.fileno())
            loop.remove_writer(worker.channel.fileno())
            worker.channel.close()
            worker.channel = None
        # Clients not yet passed wait for the restart (control packets were for the dead process).
        restart = not (self.shutdown_mode or self.handing_over)
        kept = deque(entry for entry in worker.backlog if restart and entry[1] is not None)
        for _packet, socks in worker.backlog:
            if not (restart and socks is not None):
                for sock in socks or ():
                    sock.close()
        worker.backlog = kept
        worker.dead = False
        worker.parts = Assembler()
        for fanout_id, fanout in list(self._fanouts.items()):
            if worker.index in fanout.waiting:
                fanout.waiting.discard(worker.index)
                self._settle(fanout_id)
        worker.clients = len(kept)
        self.caps.add(worker.caps, -1)  # its clients are gone with it
        worker.caps = ClientCaps()
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
                if (worker.proc is None and time.monotonic() >= worker.restart_at and not self.shutdown_mode
                        and not self.handing_over):
                    try:
                        self._spawn(worker)
                    except OSError as exc:
                        log.error("cannot start worker %d: %s", worker.index, exc)
                        worker.restart_at = time.monotonic() + RESTART_BACKOFF
            try:
                if self.handing_over:
                    self._hand_over_progress()
                else:
                    self._balance()
            except Exception:  # supervision must never die
                log.exception("balancing failed")

    # --- life cycle ---

    async def run(self, predecessor: Predecessor | None = None) -> None:
        """predecessor: the old pooler of an upgrade, which passes the listening sockets."""
        loop = asyncio.get_running_loop()
        for sig, mode in ((signal.SIGTERM, coordinate.WAIT_FOR_CLIENTS),
                          (signal.SIGINT, coordinate.WAIT_FOR_SERVERS),
                          (signal.SIGQUIT, coordinate.IMMEDIATE)):
            loop.add_signal_handler(sig, self._signalled, mode)
        loop.add_signal_handler(signal.SIGHUP, self._reload_signal)
        loop.add_signal_handler(signal.SIGUSR2, self._upgrade_signal)
        inherited = predecessor.hello() if predecessor is not None else []
        self._listeners = listening_sockets(self.config.general, inherited)
        for listener in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        for worker in self.workers:
            self._spawn(worker)
        supervisor = loop.create_task(self._supervise())
        prometheus = self.config.prometheus
        if prometheus.enabled:
            from pgdoorman.metrics.http import MetricsServer  # (prometheus_client: only when enabled)

            self._metrics = MetricsServer(self.ask, lambda: self.config, lambda: bool(self.shutdown_mode))
            if predecessor is None:
                await self._metrics.start(prometheus.host, prometheus.port)
            else:  # its port is the old process's until this one is ready
                self._spawn_task(self._metrics.start(prometheus.host, prometheus.port, wait=True))
        if predecessor is not None:
            await self._wait_started()
            if predecessor.servers:
                await self._to_all({"op": "warm", "servers": predecessor.servers,
                                    "workers": len(self.workers)})
            self.predecessor = predecessor
            predecessor.listen(self._moved_in, lambda: log.info("upgrade: hand-over complete"))
            write_pidfile(self.config.general.pidfile)
            predecessor.ready()
            log.info("upgrade: serving with %d workers; the old process hands its clients over",
                     len(self.workers))
        else:
            sdnotify.notify(f"READY=1\nSTATUS={self.status_line()}\nMAINPID={os.getpid()}")
        await self._stopped.wait()
        await self._wait_workers()
        supervisor.cancel()
        if self._metrics is not None:
            self._metrics.close()
        if self._successor is not None:  # the last clients the workers handed over, then the link
            deadline = time.monotonic() + STOP_GRACE
            outbox = self._successor.outbox
            while outbox is not None and len(outbox) and not outbox.broken and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._successor.close()

    async def _wait_workers(self) -> None:
        """The workers shut down as told (begin_shutdown); past shutdown_timeout and STOP_GRACE
        (or STOP_GRACE after an immediate shutdown) the ones left are killed."""
        while True:
            procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
            if not procs:
                return
            deadline = self._shutdown_deadline
            if deadline and time.monotonic() >= deadline:
                for proc in procs:
                    log.warning("worker pid %d did not stop in time: killing it", proc.pid)
                    proc.kill()
                    proc.wait()
                return
            await asyncio.sleep(0.05)


def worker_argv(config_path: str | None, log_level: str | None) -> list[str]:
    """The command line that starts one worker (the acceptor appends --worker and --channel-fd)."""
    return program_argv(config_path, log_level)


async def serve_workers(config: Config, workers: int, config_path: str | None, log_level: str | None,
                        generation: int = 0, upgrade_fd: int | None = None) -> None:
    acceptor = Acceptor(config, workers, worker_argv(config_path, log_level), generation)
    acceptor.log_level = log_level
    await acceptor.run(Predecessor(upgrade_fd) if upgrade_fd is not None else None)
