"""`python -m bench.large_message`: one very large message through direct / PgBouncer / pgdoorman.

A client sends `SELECT length($1::text), md5($1::text)` with one SIZE MB text parameter in a single
Bind (written in 1 MB pieces, as a driver writes it) and waits for the answer. For each target it
prints the time from the first byte to ReadyForQuery, the pooler's peak RSS during the transfer
(VmHWM of its largest process, reset first where the kernel allows, else measured against the RSS
before), and how long another client of the same pooler waited at most for `SELECT 1` meanwhile
(a worker that stalls on the big message stalls everyone on it). pgdoorman runs with workers = 1, so
the big client and the other one share a process, as in PgBouncer.

    python -m bench.large_message                 # 100 MB, 3 rounds, all targets
    python -m bench.large_message --size 20 --rounds 1 --targets direct,pgdoorman

Issue 8 measured 57 s and 225 MB for pgdoorman with 100 MB, against 2 s and 8 MB for PgBouncer.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from bench import procstats
from bench.doorman import PgDoorman
from bench.pgbouncer import PgBouncer
from bench.targets import Target
from pgdoorman.devcluster import Cluster, Role, free_port

USER = "bench"
DATABASE = "bench"
TARGETS = ("direct", "pgbouncer", "pgdoorman")
CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------
# a minimal v3 client (trust auth)


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


class Client:
    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        body = struct.pack("!I", 196608) + b"user\0" + USER.encode() + b"\0database\0" \
            + DATABASE.encode() + b"\0\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self.until_ready()

    def _recv(self) -> tuple[bytes, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack("!I", self.buf[1:5])[0]:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        n = 1 + struct.unpack("!I", self.buf[1:5])[0]
        kind, body, self.buf = self.buf[:1], self.buf[5:n], self.buf[n:]
        return kind, body

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        msgs = []
        while True:
            kind, body = self._recv()
            msgs.append((kind, body))
            if kind == b"E":
                raise RuntimeError(f"server error: {body!r}")
            if kind == b"R" and struct.unpack("!I", body[:4])[0] != 0:
                raise RuntimeError("the bench client speaks trust auth only")
            if kind == b"Z":
                return msgs

    def query(self, sql: str) -> None:
        self.sock.sendall(_msg(b"Q", sql.encode() + b"\0"))
        self.until_ready()

    def big_bind(self, value: bytes) -> list[list[bytes]]:
        """Parse/Bind/Execute/Sync with `value` as the one parameter; returns the rows."""
        parse = _msg(b"P", b"\0SELECT length($1::text), md5($1::text)\0\0\0")
        head = b"\0\0" + struct.pack("!HHi", 0, 1, len(value))
        tail = struct.pack("!H", 0)
        self.sock.sendall(parse + b"B" + struct.pack("!I", 4 + len(head) + len(value) + len(tail)) + head)
        view = memoryview(value)
        for i in range(0, len(value), CHUNK):
            self.sock.sendall(view[i:i + CHUNK])
        self.sock.sendall(tail + _msg(b"E", b"\0\0\0\0\0") + _msg(b"S"))
        rows = []
        for kind, body in self.until_ready():
            if kind == b"D":
                cols, pos, row = struct.unpack("!H", body[:2])[0], 2, []
                for _ in range(cols):
                    ln = struct.unpack("!i", body[pos:pos + 4])[0]
                    row.append(body[pos + 4:pos + 4 + ln])
                    pos += 4 + ln
                rows.append(row)
        return rows

    def close(self) -> None:
        try:
            self.sock.sendall(_msg(b"X"))
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------------------------
# measuring


@dataclass
class Result:
    target: str
    seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    base_mb: list[float] = field(default_factory=list)
    peak_reset: bool = True
    stall_ms: list[float] = field(default_factory=list)


class Prober(threading.Thread):
    """Another client of the same target: SELECT 1 in a loop; the longest wait is the stall."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(host, port)
        self.stop = threading.Event()
        self.worst = 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            self.client.query("SELECT 1")
            self.worst = max(self.worst, time.monotonic() - t0)
            time.sleep(0.005)

    def finish(self) -> float:
        self.stop.set()
        self.join(120)
        self.client.close()
        return self.worst


def measure(target: Target, value: bytes, digest: bytes, result: Result) -> None:
    pid = target.pid()
    pids = procstats.tree(pid) if pid is not None else []
    client = Client(target.host, target.port)
    prober = Prober(target.host, target.port)
    client.query("SELECT 1")  # the big client holds its own server, the prober another
    reset = procstats.reset_peak_rss(pids) if pids else False
    before = max((procstats.rss_bytes([p]) for p in pids), default=0)
    prober.start()
    t0 = time.monotonic()
    rows = client.big_bind(value)
    elapsed = time.monotonic() - t0
    stall = prober.finish()
    client.close()
    if rows != [[str(len(value)).encode(), digest]]:
        raise RuntimeError(f"{target.name}: wrong answer {[[c[:40] for c in r] for r in rows]}")
    result.seconds.append(elapsed)
    result.stall_ms.append(stall * 1000)
    if pids:
        result.peak_mb.append(max(procstats.peak_rss_bytes([p]) for p in pids) / 2**20)
        result.base_mb.append(before / 2**20)
        result.peak_reset = result.peak_reset and reset  # else VmHWM may hold an older peak


def _fmt(values: list[float], unit: str, digits: int = 1) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} {unit} (max {max(values):.{digits}f})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.large_message", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=100, help="parameter size in MB (100)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per target (3)")
    p.add_argument("--targets", default=",".join(TARGETS), help=",".join(TARGETS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad:
        print(f"unknown target(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    value = b"0123456789abcdef" * (args.size * 1000 * 1000 // 16)
    digest = hashlib.md5(value).hexdigest().encode()
    cluster = Cluster(roles=[Role(USER, None, "trust")], databases=[DATABASE])
    cluster.start()
    host, targets = cluster.host, []
    try:
        for name in names:
            if name == "direct":
                targets.append(Target("direct", host, cluster.port))
            elif name == "pgbouncer":
                pgb = PgBouncer("pgbouncer", host, free_port(host), server_port=cluster.port,
                                database=DATABASE, user=USER, pool_size=4, max_client_conn=100)
                pgb.prepare()
                targets.append(pgb)
            else:
                pgd = PgDoorman("pgdoorman", host, free_port(host), server_port=cluster.port,
                                database=DATABASE, user=USER, pool_size=4, max_client_conn=100, workers=1,
                                log_level="warning")
                pgd.prepare()
                targets.append(pgd)
        results = {t.name: Result(t.name) for t in targets}
        for t in targets:
            t.start()
        for r in range(args.rounds):
            for t in targets:  # interleaved, so drift in the machine hits every target alike
                measure(t, value, digest, results[t.name])
                print(f"round {r + 1}: {t.name}: {results[t.name].seconds[-1]:.2f} s", file=sys.stderr)
        print(f"\n{args.size} MB Bind parameter, {args.rounds} round(s); median (max)\n")
        print(f"| {'target':<16} | {'time':<20} | {'pooler peak RSS':<22} | {'RSS before':<10} "
              f"| {'other client waited':<22} |")
        print(f"|{'-' * 18}|{'-' * 22}|{'-' * 24}|{'-' * 12}|{'-' * 24}|")
        for t in targets:
            res = results[t.name]
            label = f"{t.name} {t.version}".strip() if t.name != "direct" else t.name
            base = f"{statistics.median(res.base_mb):.0f} MB" if res.base_mb else "-"
            peak = _fmt(res.peak_mb, "MB") + ("" if res.peak_reset else " *")
            print(f"| {label:<16} | {_fmt(res.seconds, 's', 2):<20} | {peak:<22} | {base:<10} "
                  f"| {_fmt(res.stall_ms, 'ms', 0):<22} |")
        if not all(r.peak_reset for r in results.values()):
            print("\n* VmHWM could not be reset before the round: it may hold an earlier peak")
    finally:
        for t in targets:
            t.cleanup()
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
