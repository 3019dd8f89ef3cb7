"""`python -m bench.memory`: the pooler's memory under large messages, against its idle baseline.

Four cases through pgdoorman (one PostgreSQL started here, trust auth):
  result    one client SELECTs a large result (default 1 GB) and reads it at a set rate (10 MB/s);
  bind      a 256 MiB bytea bound as a parameter (one Bind, written in 1 MiB pieces);
  copy      a 200 MiB COPY FROM STDIN;
  flood     100 clients each send an 8 MB parameter at once, with max_memory_usage = 256MB.
For each: the pooler tree's RSS sampled every 20 ms, its maximum over the idle baseline (RSS of the
tree, all clients connected, before the case), and for flood how many were served or refused 53200.
The target of issue 12: the maximum stays under the baseline plus 64 MiB.

    python -m bench.memory                      # all cases, workers 1 and 2
    python -m bench.memory --cases bind,copy --workers 1 --result-mb 200 --rate 50
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

from bench import procstats
from bench.doorman import PgDoorman
from pgdoorman.devcluster import Cluster, Role, free_port

USER = "bench"
DATABASE = "bench"
MIB = 1 << 20
CASES = ("result", "bind", "copy", "flood")


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


class Client:
    """A minimal v3 client (trust auth) that can pace its reads."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=600)
        self.buf = bytearray()
        body = struct.pack("!I", 196608) + f"user\0{USER}\0database\0{DATABASE}\0\0".encode()
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        self.until_ready()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the pooler")
            self.buf += chunk

    def message(self) -> tuple[bytes, bytes]:
        self._fill(5)
        length = struct.unpack_from("!I", self.buf, 1)[0]
        self._fill(1 + length)
        kind, body = bytes(self.buf[:1]), bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return kind, body

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            kind, body = self.message()
            out.append((kind, body))
            if kind == b"Z":
                return out

    def send_chunked(self, data: bytes) -> None:
        view = memoryview(data)
        for at in range(0, len(data), MIB):
            self.sock.sendall(view[at : at + MIB])

    def bind_bytea(self, size: int) -> list[tuple[bytes, bytes]]:
        """SELECT length($1::bytea) with one binary parameter of `size` bytes."""
        parse = _msg(b"P", b"\0SELECT length($1::bytea)\0" + struct.pack("!HI", 1, 17))
        head = b"\0\0" + struct.pack("!HH", 1, 1) + struct.pack("!Hi", 1, size)
        bind_len = 4 + len(head) + size + 4  # + result formats (count 1, binary 0)
        self.sock.sendall(parse + b"B" + struct.pack("!I", bind_len) + head)
        self.send_chunked(b"\x07" * size)
        self.sock.sendall(struct.pack("!HH", 1, 0) + _msg(b"E", b"\0" + struct.pack("!I", 0)) + _msg(b"S"))
        return self.until_ready()

    def read_paced(self, rate: float) -> int:
        """Read everything up to ReadyForQuery at `rate` bytes a second; returns the bytes read."""
        got, t0 = 0, time.monotonic()
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed by the pooler")
            got += len(chunk)
            self.buf += chunk
            if len(self.buf) > 8 * MIB:  # keep only the tail: the ReadyForQuery is all we look for
                del self.buf[: -64]
            if b"Z\0\0\0\x05I" in self.buf[-64:]:
                return got
            ahead = got / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        try:
            self.sock.sendall(_msg(b"X"))
        except OSError:
            pass
        self.sock.close()


class Sampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, procstats.rss_bytes(self.pids))
            time.sleep(0.02)


def _measure(pooler: PgDoorman, case: Callable[[], str]) -> tuple[float, float, str]:
    pid = pooler.pid()
    assert pid is not None
    pids = procstats.tree(pid)
    base = procstats.rss_bytes(pids)
    sampler = Sampler(pids)
    sampler.start()
    outcome = case()
    sampler.stop.set()
    sampler.join()
    return base / MIB, (sampler.peak - base) / MIB, outcome


def cases(host: str, port: int, args: argparse.Namespace) -> dict[str, Callable[[], str]]:
    def result() -> str:
        c = Client(host, port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        rows = args.result_mb  # rows of 1 MiB
        c.sock.sendall(_msg(b"Q", f"SELECT repeat('x', {MIB}) FROM generate_series(1, {rows})\0".encode()))
        t0 = time.monotonic()
        got = c.read_paced(args.rate * MIB)
        c.close()
        return f"{got / MIB:.0f} MiB read in {time.monotonic() - t0:.0f} s"

    def bind() -> str:
        c = Client(host, port)
        t0 = time.monotonic()
        replies = c.bind_bytea(256 * MIB)
        c.close()
        ok = any(k == b"D" for k, _ in replies)
        return f"{'answered' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s"

    def copy() -> str:
        c = Client(host, port)
        c.sock.sendall(_msg(b"Q", b"CREATE TEMP TABLE mem_copy(t text)\0"))
        c.until_ready()
        c.sock.sendall(_msg(b"Q", b"COPY mem_copy FROM STDIN\0"))
        kind, _ = c.message()
        assert kind == b"G", kind
        line = b"y" * 1023 + b"\n"
        chunk = _msg(b"d", line * 64)  # 64 KiB of rows per CopyData
        t0 = time.monotonic()
        for _ in range(200 * 16):
            c.sock.sendall(chunk)
        c.sock.sendall(_msg(b"c"))
        replies = c.until_ready()
        c.close()
        tag = next((b[:-1].decode() for k, b in replies if k == b"C"), "no CommandComplete")
        return f"{tag} in {time.monotonic() - t0:.1f} s"

    def flood() -> str:
        served, other = [0], [0]
        lock = threading.Lock()

        def one() -> None:
            try:
                c = Client(host, port)
                replies = c.bind_bytea(8 * MIB)
                c.close()
                kind = "ok" if any(k == b"D" for k, _ in replies) else "other"
            except (ConnectionError, OSError):
                kind = "other"
            with lock:
                (served if kind == "ok" else other)[0] += 1

        threads = [threading.Thread(target=one) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return f"{served[0]} served, {other[0]} refused (53200) or failed"

    return {"result": result, "bind": bind, "copy": copy, "flood": flood}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--workers", default="1,2", help="pgdoorman worker counts (1,2)")
    p.add_argument("--result-mb", type=int, default=1024, help="result size for 'result', MiB (1024)")
    p.add_argument("--rate", type=float, default=10.0, help="read rate for 'result', MiB/s (10)")
    args = p.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    if any(n not in CASES for n in names):
        print(f"cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    cluster = Cluster(roles=[Role(USER, None, "trust")], databases=[DATABASE])
    cluster.start()
    rows: list[str] = []
    try:
        for workers in [int(w) for w in args.workers.split(",")]:
            pooler = PgDoorman("pgdoorman", cluster.host, free_port(cluster.host), server_port=cluster.port,
                               database=DATABASE, user=USER, pool_size=110, max_client_conn=500,
                               workers=workers, log_level="warning",
                               general={"max_memory_usage": "256MB"})
            pooler.prepare()
            pooler.start()
            try:
                Client(cluster.host, pooler.port).close()  # warm: a server and a welcome cached
                table = cases(cluster.host, pooler.port, args)
                for name in names:
                    base, over, outcome = _measure(pooler, table[name])
                    verdict = "ok" if over < 64 else "OVER"
                    rows.append(f"| {name} | {workers} | {base:.0f} | {over:+.1f} | {verdict} | {outcome} |")
                    print(rows[-1], file=sys.stderr)
            finally:
                pooler.cleanup()
    finally:
        cluster.destroy()
    print("\n| case | workers | idle RSS MiB | max RSS over idle, MiB | < +64 MiB | outcome |")
    print("|---|---:|---:|---:|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
