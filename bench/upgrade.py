"""`python -m bench.upgrade`: what a zero-downtime upgrade (SIGUSR2) under full load costs pgbench's clients.

For each case (pool mode and pgbench -M, times workers 1 and 2) it starts its own PostgreSQL and one
pgdoorman with a pidfile, runs `pgbench -c 100 -j 2 -T 30 -S -l` through it, and upgrades the pooler
three times during the run (SIGUSR2 to the pid in the pidfile). An upgrade's window runs from the
signal until the old pid has exited; transactions that ended inside a window are compared with the rest.

    python -m bench.upgrade                                           # all cases, about 5 minutes
    python -m bench.upgrade --duration 8 --upgrades 1 --cases tx-extended --workers 1   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import procstats
from bench.cluster import DATABASE, USER, start_cluster
from bench.doorman import REPO_ROOT, PgDoorman
from bench.pgbench import PgbenchSpec, parse_summary, percentile
from bench.pgbench import command as pgbench_command
from bench.targets import log_tail
from pgdoorman.devcluster import Cluster, find_pg_bin, free_port
from pgdoorman.process.pidfile import read_pidfile

CASES = {  # name: (pool_mode, pgbench -M)
    "tx-extended": ("transaction", "extended"),
    "tx-prepared": ("transaction", "prepared"),
    "session-extended": ("session", "extended"),
}
SHUTDOWN_TIMEOUT = 30.0
# Wait this long for the pidfile to name a new pid (the pooler itself allows 60 s for --check-config and
# 60 s for READY; here it takes 1-7 s), then shutdown_timeout + 10 s for the old pid to exit.
READY_WAIT = 70.0
POLL = 0.01  # window ends are measured to about this
CLOSING = re.compile(r"closing because: (.*?)(?: \(age=\d+s\))?$")


def log(msg: str) -> None:
    print(f"[upgrade {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def alive(pid: int) -> bool:
    """Whether pid runs. A zombie counts as gone: an old pooler whose parent has exited waits for init
    to reap it, and init here may never do."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class Upgrade:
    at_s: float  # when it was due, seconds after pgbench started
    signal_s: float  # when SIGUSR2 was sent, seconds after pgbench started
    old_pid: int
    new_pid: int | None = None
    ready_s: float | None = None  # signal -> the pidfile names a new, live pid
    window_s: float | None = None  # signal -> the old pid has exited (None: it had not, at the deadline)
    pid_changed: bool = False
    old_workers: list[int] = field(default_factory=list)
    new_workers: list[int] = field(default_factory=list)
    workers_replaced: bool | None = None  # None with one process
    old_workers_left: list[int] = field(default_factory=list)  # old workers alive when the old pid exited
    note: str = ""


@dataclass
class CaseResult:
    case: str
    pool_mode: str
    protocol: str
    workers: int
    returncode: int = 0
    tps: float = 0.0
    transactions: int = 0
    failed: int = 0  # pgbench's "number of failed transactions"
    failed_in_log: dict[str, int] = field(default_factory=dict)  # time column words of the -l log
    aborted_clients: int = 0
    pgbench_errors: list[str] = field(default_factory=list)  # its stderr lines with "error"/"aborted"
    # pooler log "closing because" lines while pgbench ran (not its clients' goodbyes at the end)
    closing_clients: int = 0
    closing_servers: int = 0
    closing_reasons: dict[str, int] = field(default_factory=dict)
    closing_at_end: int = 0  # those left out
    closing_client_lines: list[str] = field(default_factory=list)  # the clients' ones, as logged
    log_problems: list[str] = field(default_factory=list)  # WARNING/ERROR lines with their tracebacks
    upgrade_log: list[str] = field(default_factory=list)  # the pooler's upgrade lines
    inside: dict[str, float] = field(default_factory=dict)  # latency stats of tx ending in windows
    outside: dict[str, float] = field(default_factory=dict)
    handover: dict[str, float] = field(default_factory=dict)  # of inside: from the new pid's READY on
    upgrades: list[Upgrade] = field(default_factory=list)
    served_after: str = ""  # a query through the pooler after the run
    error: str = ""  # the case could not run
    pooler_log_tail: list[str] = field(default_factory=list)  # its last lines, when the case failed
    pooler_log_kept: str = ""  # where the whole pooler log was copied, when something went wrong
    source_changed: list[str] = field(default_factory=list)  # pgdoorman/ files edited during the case

    def anomalous(self) -> bool:
        return bool(self.error or self.aborted_clients or self.failed or self.closing_clients
                    or self.source_changed or self.log_problems or not self.served_after.startswith("ok")
                    or any(u.note or not u.pid_changed or u.workers_replaced is False or u.old_workers_left
                           for u in self.upgrades))


def latency_stats(latencies: list[int], seconds: float) -> dict[str, float]:
    latencies.sort()
    return {"transactions": len(latencies), "seconds": round(seconds, 3),
            "tps": round(len(latencies) / seconds, 1) if seconds > 0 else 0.0,
            "p50_ms": percentile(latencies, 50) / 1000, "p99_ms": percentile(latencies, 99) / 1000,
            "max_ms": (latencies[-1] / 1000) if latencies else 0.0}


def read_transactions(prefix: str) -> tuple[list[tuple[int, float, int]], Counter[str]]:
    """(client, end time as epoch seconds, latency µs) of each transaction in pgbench's -l logs, and the
    count of each word found instead of a latency ("failed", "serialization", "deadlock", "skipped").

    Lines are `client_id transaction_no time script_no time_epoch time_us [...]`; time_epoch/time_us is
    when the transaction ended.
    """
    done: list[tuple[int, float, int]] = []
    other: Counter[str] = Counter()
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6:
                    continue
                if fields[2].isdigit():
                    done.append((int(fields[0]), int(fields[4]) + int(fields[5]) / 1e6, int(fields[2])))
                else:
                    other[fields[2]] += 1
    return done, other


def source_mtimes() -> dict[str, float]:
    """The pooler's source files: an upgrade runs the program on disk, so an edit during a case is
    what the later upgrades run."""
    out: dict[str, float] = {}
    for path in glob.glob(os.path.join(REPO_ROOT, "pgdoorman", "**", "*.py"), recursive=True):
        try:
            out[os.path.relpath(path, REPO_ROOT)] = os.stat(path).st_mtime
        except OSError:
            pass
    return out


def log_time(line: str) -> float | None:
    """Epoch seconds of a pooler text log line (`YYYY-mm-dd HH:MM:SS.mmm pid LEVEL ...`, local time)."""
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
    except (ValueError, IndexError):
        return None


class Run:
    """One case: its PostgreSQL, its pooler (followed through upgrades by the pidfile) and pgbench."""

    def __init__(self, args: argparse.Namespace, name: str, workers: int) -> None:
        self.args = args
        self.result = CaseResult(name, *CASES[name], workers=workers)
        self.tmp = tempfile.mkdtemp(prefix="pgdoorman-bench-upgrade-")
        self.pidfile = os.path.join(self.tmp, "pgdoorman.pid")
        self.cluster: Cluster | None = None
        self.pooler: PgDoorman | None = None
        self.pgbench: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every main pid seen: the first and each upgrade's successor

    # --- start and stop ---

    def start(self) -> None:
        r, a = self.result, self.args
        pool_size = a.clients + 10 if r.pool_mode == "session" else 20  # session: a server per client
        self.cluster = start_cluster(a.scale, max(400, 3 * pool_size + 50))
        host = self.cluster.host
        self.pooler = PgDoorman(
            "pgdoorman", host, free_port(host), server_port=self.cluster.port, database=DATABASE, user=USER,
            pool_size=pool_size, max_client_conn=a.clients + 100, workers=r.workers, log_level="info",
            # a bare number would be milliseconds
            general={"pidfile": self.pidfile, "shutdown_timeout": f"{SHUTDOWN_TIMEOUT:g}s",
                     "pool_mode": r.pool_mode,
                     "log_client_disconnections": True})  # so a client cut off shows in the log
        self.pooler.prepare()
        self.pooler.start()
        deadline = time.monotonic() + 30
        while True:  # the pidfile, and with workers all of them, before the first client
            pid = read_pidfile(self.pidfile)
            if pid and (r.workers < 2 or len(procstats.tree(pid)) > r.workers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"pooler not ready (pidfile {pid}):\n{log_tail(self.pooler.log_path)}")
            time.sleep(0.1)
        self.pids.append(pid)
        r.served_after = self.query()  # first: it serves before we measure
        if not r.served_after.startswith("ok"):
            raise RuntimeError(f"pooler does not serve: {r.served_after}")
        time.sleep(0.5)  # its goodbye is logged before the run starts, not counted in it

    def query(self) -> str:
        assert self.cluster is not None and self.pooler is not None
        try:
            out = subprocess.run([self.cluster.tool("psql"), "-h", self.pooler.host, "-p",
                                  str(self.pooler.port), "-U", USER, "-d", DATABASE, "-X", "-A", "-t",
                                  "-c", "SELECT 1"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return "failed: psql got no answer in 30 s"
        return "ok" if out.returncode == 0 and out.stdout.strip() == "1" else f"failed: {out.stderr.strip()}"

    def cleanup(self) -> None:
        """pgbench, then every pooler generation (SIGQUIT: immediate), PostgreSQL, the temp dir."""
        if self.pgbench is not None and self.pgbench.poll() is None:
            self.pgbench.terminate()
            try:
                self.pgbench.wait(10)
            except subprocess.TimeoutExpired:
                self.pgbench.kill()
                self.pgbench.wait()
        if self.pooler is not None:
            current = read_pidfile(self.pidfile)
            mains = {p for p in [*self.pids, current] if p and alive(p)}
            every = {p for m in mains for p in procstats.tree(m)}
            for pid in mains:
                try:
                    os.kill(pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while any(alive(p) for p in every) and time.monotonic() < deadline:
                if self.pooler.proc is not None:
                    self.pooler.proc.poll()  # reap the first generation, our child
                time.sleep(0.05)
            for pid in every:
                if alive(pid):
                    log(f"pid {pid} still alive 15 s after SIGQUIT: SIGKILL")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.pooler.cleanup()  # reaps the first generation and removes its work dir
        if self.cluster is not None:
            self.cluster.destroy()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the measured run ---

    def pgbench_argv(self, prefix: str) -> list[str]:
        assert self.cluster is not None and self.pooler is not None
        a = self.args
        spec = PgbenchSpec(self.cluster.bindir, self.pooler.host, self.pooler.port, USER, DATABASE,
                           self.result.protocol, a.clients, a.duration)
        argv = pgbench_command(spec, prefix)
        if a.builtin != "select-only":
            argv[argv.index("-S"):argv.index("-S") + 1] = ["-b", a.builtin]
        if a.failures_detailed:
            argv.insert(-1, "--failures-detailed")
        return argv

    def measure(self) -> None:
        assert self.pooler is not None
        r, a = self.result, self.args
        prefix = os.path.join(self.tmp, "pgbench_log")
        out_path, err_path = os.path.join(self.tmp, "pgbench.out"), os.path.join(self.tmp, "pgbench.err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            t0 = time.time()
            self.pgbench = subprocess.Popen(self.pgbench_argv(prefix), stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=err, cwd=self.tmp, start_new_session=True)
        for at in a.at:
            while time.time() < t0 + at and self.pgbench.poll() is None:
                time.sleep(POLL)
            if self.pgbench.poll() is not None:
                r.upgrades.append(Upgrade(at, time.time() - t0, 0, note="not sent: pgbench had ended"))
                break
            up = self.upgrade(at, t0)
            r.upgrades.append(up)
            log(f"  upgrade at {up.signal_s:.1f}s: pid {up.old_pid} -> {up.new_pid}, ready "
                f"{_s(up.ready_s)}, old exited {_s(up.window_s)} {up.note}")
            if up.window_s is None:
                break  # the old one never left: further upgrades would measure overlapping windows
        try:
            self.pgbench.wait(a.duration * 3 + 120)
        except subprocess.TimeoutExpired:
            self.pgbench.kill()
            self.pgbench.wait()
            r.error = "pgbench did not finish"
        r.returncode = self.pgbench.returncode
        r.served_after = self.query()
        with open(out_path, errors="replace") as f:
            summary = parse_summary(f.read())
        with open(err_path, errors="replace") as f:
            stderr = f.read().splitlines()
        r.tps, r.transactions, r.failed = summary["tps"], int(summary["transactions"]), int(summary["failed"])
        r.pgbench_errors = [line for line in stderr if "error" in line or "aborted" in line]
        r.aborted_clients = len({m.group(1) for line in stderr if (m := re.search(r"client (\d+) ", line))
                                 and ("aborted" in line or "error" in line)})
        done, other = read_transactions(prefix)
        r.failed_in_log = dict(other)
        self.split_latencies(t0, [(end, latency) for _, end, latency in done])
        # The run ends when -T runs out: when most clients did their last transaction (an aborted one
        # stops early). A client's goodbye after that is the end, not a reconnect.
        last: dict[int, float] = {}
        for client, end, _ in done:
            last[client] = max(end, last.get(client, 0.0))
        ends = sorted(last.values())
        # It starts at the first transaction: pgbench's own setup connection (it reads the scale) is gone.
        start = min((end for _, end, _ in done), default=t0)
        self.read_pooler_log(start, ends[len(ends) // 2] - 0.5 if ends else t0 + a.duration)

    def upgrade(self, at: float, t0: float) -> Upgrade:
        """SIGUSR2 to the pidfile's pid; wait for the pidfile to name a new live pid, and the old to exit."""
        assert self.pooler is not None
        old = read_pidfile(self.pidfile) or 0
        up = Upgrade(at, time.time() - t0, old, old_workers=procstats.tree(old)[1:])
        sent = time.time()
        os.kill(old, signal.SIGUSR2)
        deadline = sent + READY_WAIT
        while time.time() < deadline:
            if self.pooler.proc is not None:
                self.pooler.proc.poll()  # the first generation is our child: reap it, or it stays a zombie
            now = time.time()
            if up.new_pid is None:
                pid = read_pidfile(self.pidfile)
                if pid and pid != old and alive(pid):
                    up.new_pid, up.ready_s = pid, now - sent
                    self.pids.append(pid)
                    deadline = now + SHUTDOWN_TIMEOUT + 10  # the old one leaves by shutdown_timeout
            if not alive(old):
                up.window_s = now - sent
                up.old_workers_left = [p for p in up.old_workers if alive(p)]
                break
            time.sleep(POLL)
        if up.new_pid is None:
            up.note = "no new pid in the pidfile" + ("" if up.window_s is None else "; the old pid exited")
        elif up.window_s is None:
            up.note = f"old pid still alive {time.time() - sent:.0f}s after the signal"
        up.pid_changed = up.new_pid is not None and up.new_pid != old
        if up.new_pid is not None and self.result.workers > 1:
            wait_until = time.time() + 10
            while len(procstats.tree(up.new_pid)) <= self.result.workers and time.time() < wait_until:
                time.sleep(0.05)
            up.new_workers = procstats.tree(up.new_pid)[1:]
            up.workers_replaced = (len(up.new_workers) == self.result.workers
                                   and not set(up.new_workers) & set(up.old_workers))
        return up

    def split_latencies(self, t0: float, done: list[tuple[float, int]]) -> None:
        r = self.result
        ups = [u for u in r.upgrades if u.old_pid]
        ends = [t0 + u.signal_s + (u.window_s if u.window_s is not None else 1e9) for u in ups]
        windows = [(t0 + u.signal_s, end) for u, end in zip(ups, ends, strict=True)]
        handovers = [(t0 + u.signal_s + u.ready_s, end) for u, end in zip(ups, ends, strict=True)
                     if u.ready_s is not None]
        inside: list[int] = []
        outside: list[int] = []
        handover: list[int] = []
        for end, latency in done:
            (inside if any(a <= end <= b for a, b in windows) else outside).append(latency)
            if any(a <= end <= b for a, b in handovers):
                handover.append(latency)
        if done:
            first, last = min(e for e, _ in done), max(e for e, _ in done)

            def span(spans: list[tuple[float, float]]) -> float:
                return sum(max(0.0, min(b, last) - max(a, first)) for a, b in spans)

            r.inside = latency_stats(inside, span(windows))
            r.outside = latency_stats(outside, (last - first) - span(windows))
            r.handover = latency_stats(handover, span(handovers))

    def read_pooler_log(self, run_start: float, run_end: float) -> None:
        """'closing because' lines logged while pgbench ran (its clients' goodbyes at the end excluded)."""
        assert self.pooler is not None
        r = self.result
        reasons: Counter[str] = Counter()
        with open(self.pooler.log_path, errors="replace") as f:
            lines = f.read().splitlines()
        in_problem = False
        for line in lines:
            stamp = log_time(line)
            if stamp is None:  # a traceback's lines follow the line that logged it
                if in_problem:
                    r.log_problems.append(line)
                continue
            in_problem = any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL"))
            if in_problem:
                r.log_problems.append(line)
            if "upgrade" in line or "hand" in line:
                r.upgrade_log.append(line)
            m = CLOSING.search(line)
            if m is None or stamp < run_start - 0.001:
                continue
            if stamp > run_end:
                r.closing_at_end += 1
                continue
            # a client's line ends in its age; a server's names its pool instead
            client = "(age=" in line
            reasons[("client: " if client else "server: ") + m.group(1)] += 1
            r.closing_clients += client
            if client:
                r.closing_client_lines.append(line)
            r.closing_servers += not client
        r.closing_reasons = dict(reasons)
        r.log_problems = r.log_problems[:200]
        r.upgrade_log = r.upgrade_log[:200]
        r.closing_client_lines = r.closing_client_lines[:50]


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}s"


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ms(stats: dict[str, float]) -> str:
    return f"{stats['p50_ms']:.2f} / {stats['p99_ms']:.2f}" if stats.get("transactions") else "—"


def table(results: list[CaseResult]) -> list[str]:
    out = ["| case | workers | TPS | failed tx | aborted clients | closing because (client / server) "
           "| p50 / p99 ms outside | p50 / p99 ms inside | of which in hand-over | tx inside (tx/s) "
           "| windows s | ready s | pid changed |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        if r.error and not r.transactions:
            out.append(f"| {r.case} | {r.workers} | error: {r.error.splitlines()[0][:80]} "
                       "| | | | | | | | | | |")
            continue
        ups = [u for u in r.upgrades if u.old_pid]
        windows = ", ".join(f"{_n(u.window_s)} @{u.signal_s:.1f}" for u in ups) or "—"
        ready = ", ".join(_n(u.ready_s) for u in ups) or "—"
        changed = ", ".join(("yes" if u.pid_changed else "NO")
                            + ("" if u.workers_replaced in (None, True) else " (workers NOT replaced)")
                            for u in ups) or "—"
        inside = f"{r.inside.get('transactions', 0):,.0f} ({r.inside.get('tps', 0):,.0f})"
        out.append(f"| {r.case} | {r.workers} | {r.tps:,.0f} | {r.failed} | {r.aborted_clients} "
                   f"| {r.closing_clients} / {r.closing_servers} | {_ms(r.outside)} | {_ms(r.inside)} "
                   f"| {_ms(r.handover)} | {inside} | {windows} "
                   f"| {ready} | {changed} |")
    return out


def notes(results: list[CaseResult]) -> list[str]:
    out: list[str] = []
    for r in results:
        who = f"{r.case} workers={r.workers}"
        if r.error:
            out.append(f"{who}: {r.error}")
        if r.returncode not in (0, None):
            out.append(f"{who}: pgbench exited {r.returncode}")
        out += [f"{who}: pgbench: {line}" for line in r.pgbench_errors[:5]]
        if r.failed_in_log:
            out.append(f"{who}: per-transaction log: {r.failed_in_log}")
        for u in r.upgrades:
            if u.note or u.old_workers_left:
                left = f"; old workers alive at exit: {u.old_workers_left}" if u.old_workers_left else ""
                out.append(f"{who}: upgrade due at {u.at_s:g}s: {u.note}{left}")
        if r.closing_reasons:
            out.append(f"{who}: closing because, during the run: {r.closing_reasons}")
        if not r.served_after.startswith("ok"):
            out.append(f"{who}: a query after the run: {r.served_after}")
        out += [f"{who}: pooler log: {line}" for line in r.log_problems[:5]]
        if r.source_changed:
            out.append(f"{who}: pgdoorman/ changed on disk during the case (upgrades ran the new code): "
                       f"{', '.join(r.source_changed)}")
        if r.pooler_log_kept:
            out.append(f"{who}: the pooler's log is kept in {r.pooler_log_kept}")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.upgrade", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)} (all)")
    p.add_argument("--modes", default="extended,prepared",
                   help="pgbench -M modes to keep (extended,prepared)")
    p.add_argument("--workers", default="1,2", help="pgdoorman worker counts (1,2)")
    p.add_argument("--duration", type=int, default=30, help="pgbench -T, whole seconds (30)")
    p.add_argument("--clients", type=int, default=100, help="pgbench -c (100)")
    p.add_argument("--upgrades", type=int, default=3, help="upgrades per run (3)")
    p.add_argument("--at", default="", help="upgrade times, s after pgbench starts (default: at 20%% of the "
                   "run, then evenly: 6,14,22 for 30 s and 3)")
    p.add_argument("--builtin", default="select-only", help="pgbench builtin script, e.g. tpcb-like")
    p.add_argument("--scale", type=int, default=1, help="pgbench -i -s (1)")
    p.add_argument("--results-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    modes = set(args.modes.split(","))
    if unknown := [n for n in names if n not in CASES]:
        p.error(f"unknown case {unknown}; cases: {', '.join(CASES)}")
    args.names = [n for n in names if CASES[n][1] in modes]
    args.worker_counts = [int(w) for w in args.workers.split(",") if w]
    if args.at:
        args.at = [float(x) for x in args.at.split(",")][: args.upgrades]
    else:
        n = args.upgrades
        args.at = [round(args.duration * (0.2 + 0.8 * i / n), 1) for i in range(n)]
    if not args.names or not args.worker_counts:
        p.error("nothing to run: --cases and --modes leave no case")
    help_text = subprocess.run([os.path.join(find_pg_bin(), "pgbench"), "--help"],
                               capture_output=True, text=True).stdout
    args.failures_detailed = "--failures-detailed" in help_text  # PostgreSQL 15 and later
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM as Ctrl-C: the same finally blocks stop pgbench, the poolers and PostgreSQL.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    timestamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # read only; the working tree may differ from it
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results: list[CaseResult] = []
    version = ""
    status = 0
    for workers in args.worker_counts:
        for name in args.names:
            log(f"{name}, workers={workers}: PostgreSQL, pgdoorman, pgbench -c {args.clients} "
                f"-T {args.duration} -M {CASES[name][1]}, upgrades at {', '.join(map(str, args.at))} s")
            run = Run(args, name, workers)
            sources = source_mtimes()
            try:
                run.start()
                version = run.pooler.version if run.pooler is not None else version
                run.measure()
            except Exception as exc:  # noqa: BLE001 - one broken case is reported, the others still run
                run.result.error = f"{type(exc).__name__}: {exc}"
                log(f"  failed: {run.result.error}")
                status = 1
            finally:
                now = source_mtimes()
                run.result.source_changed = sorted(f for f in now.keys() | sources.keys()
                                                   if now.get(f) != sources.get(f))
                if run.pooler is not None and run.pooler.log_path and os.path.exists(run.pooler.log_path):
                    if run.result.error:
                        run.result.pooler_log_tail = log_tail(run.pooler.log_path, 40).splitlines()
                    if run.result.anomalous():  # the log is in the temp dir cleanup removes
                        os.makedirs(args.results_dir, exist_ok=True)
                        kept = os.path.join(args.results_dir, f"upgrade-{timestamp}-{name}-w{workers}.log")
                        shutil.copyfile(run.pooler.log_path, kept)
                        run.result.pooler_log_kept = kept
                run.cleanup()
            r = run.result
            results.append(r)
            log(f"  TPS {r.tps:,.0f}, failed {r.failed}, aborted clients {r.aborted_clients}, "
                f"closing-because lines {r.closing_clients} client, {r.closing_servers} server")
    lines = [f"# pgdoorman upgrade under load, {timestamp}", "",
             f"pgbench -c {args.clients} -j 2 -T {args.duration} -b {args.builtin} (scale {args.scale}), "
             f"SIGUSR2 at {', '.join(f'{t:g}' for t in args.at)} s; pgdoorman {version} ({commit}), "
             f"shutdown_timeout {SHUTDOWN_TIMEOUT:g}s; load average {load_at_start} -> "
             + " ".join(f"{x:.2f}" for x in os.getloadavg()), "",
             "inside = transactions that ended between a SIGUSR2 and the old pid's exit; windows = those "
             "spans (@ when SIGUSR2 was sent, s into the run; the next waits for the last to end); ready = "
             "SIGUSR2 until the pidfile names the new pid; hand-over = from then to the old pid's exit; "
             "closing because: pooler log lines during the run.", "", *table(results)]
    extra = notes(results)
    if extra:
        lines += ["", "Notes:", *[f"- {n}" for n in extra]]
    print("\n".join(lines), flush=True)
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"upgrade-{timestamp}.json")
    meta: dict[str, Any] = {
        "timestamp": timestamp,
        "environment": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                   f"Linux {platform.release()}",
                        "python": platform.python_version(), "pgdoorman": version,
                        "commit at start": commit,
                        "load average at start": load_at_start,
                        "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "settings": {k: v for k, v in vars(args).items() if k not in ("cases", "modes", "workers")},
        "results": [asdict(r) for r in results],
        "notes": extra,
    }
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"\nJSON: {path}")
    return status


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the cases' finally blocks have cleaned up
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
