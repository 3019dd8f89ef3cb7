"""Per-transaction accounting on the hot path: one call when a client request begins (begin) and
one at the ReadyForQuery that ends it (done), each on bytearrays, so the relay does no float
arithmetic or histogram work of its own. Compiled (_account.c) with this pure-Python twin, which
PGDOORMAN_PURE_PYTHON selects and the same tests run.

Layouts (native doubles and int64):
- times, per server: [request start, transaction start] (monotonic seconds; 0 = none open);
- acc, per pool: ACC_FIELDS;
- hist, per pool: the xact, query and wait histograms, NB buckets each (metrics/stats.py BOUNDS).
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left

NB = 97
ACC_FIELDS = ("query_time", "query_max", "xact_time", "xact_max", "wait_time", "wait_max")
Q_TIME, Q_MAX, X_TIME, X_MAX, W_TIME, W_MAX = range(6)
H_XACT, H_QUERY, H_WAIT = 0, NB, 2 * NB
HISTOGRAMS = {"xact": H_XACT, "query": H_QUERY, "wait": H_WAIT}


def new_times() -> bytearray:
    return bytearray(16)


def new_acc() -> bytearray:
    return bytearray(8 * len(ACC_FIELDS))


def new_hist() -> bytearray:
    return bytearray(8 * 3 * NB)


# The histogram's upper bounds (stats.BOUNDS is this table; _account.c computes the same by pow).
BOUNDS: tuple[float, ...] = tuple(1e-5 * 2 ** (i / 4) for i in range(NB - 1))


def py_bucket(seconds: float) -> int:
    """Bucket i holds (BOUNDS[i-1], BOUNDS[i]]; 0 is up to 1e-5 (and NaN), 96 the rest."""
    if not seconds > 1e-5:
        return 0
    return bisect_left(BOUNDS, seconds)


def _add(acc: memoryview[float], hist: memoryview[int], time_at: int, hist_at: int, seconds: float) -> None:
    acc[time_at] += seconds
    if seconds > acc[time_at + 1]:
        acc[time_at + 1] = seconds
    hist[hist_at + py_bucket(seconds)] += 1


def py_begin(times: bytearray) -> None:
    t: memoryview[float] = memoryview(times).cast("d")
    if t[0] == 0.0:
        now = time.monotonic()
        t[0] = now
        if t[1] == 0.0:
            t[1] = now


def py_done(times: bytearray, acc: bytearray, hist: bytearray, idle: bool) -> float:
    """Returns the monotonic time it read (the server's last_used)."""
    now = time.monotonic()
    t: memoryview[float] = memoryview(times).cast("d")
    if t[0] == 0.0:
        return now
    a: memoryview[float] = memoryview(acc).cast("d")
    h: memoryview[int] = memoryview(hist).cast("q")
    _add(a, h, Q_TIME, H_QUERY, now - t[0])
    t[0] = 0.0
    if idle:
        _add(a, h, X_TIME, H_XACT, now - t[1])
        t[1] = 0.0
    return now


def py_waited(acc: bytearray, hist: bytearray, seconds: float) -> None:
    a: memoryview[float] = memoryview(acc).cast("d")
    h: memoryview[int] = memoryview(hist).cast("q")
    _add(a, h, W_TIME, H_WAIT, seconds)


begin, done, waited, bucket = py_begin, py_done, py_waited, py_bucket
COMPILED = False
if not os.environ.get("PGDOORMAN_PURE_PYTHON"):
    try:
        from pgdoorman.metrics import _account  # type: ignore[attr-defined]
    except ImportError:  # not compiled: the twins above do the same, slower
        pass
    else:
        begin, done, waited, bucket = _account.begin, _account.done, _account.waited, _account.bucket
        COMPILED = True
