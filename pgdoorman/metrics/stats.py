"""Per-pool counters and latency histograms, cheap enough for the hot path.

The relay adds to plain slot attributes (a few per transaction) and drops a latency into a fixed
bucket (one C bisect); nothing here allocates per transaction. Everything the console and the
Prometheus endpoint show is derived from these at read time: totals, the last `stats_period`'s
averages (PeriodStats) and percentiles from bucket counts, so memory stays fixed however many
transactions run.
"""

from __future__ import annotations

from typing import Any

from pgdoorman.metrics import account

# Latency buckets: upper bounds in seconds, four per octave from 10 µs to about 2.8 min (bucket
# 0 is "at most 10 µs", the last one is everything above; account.bucket computes the index). A
# percentile read from them is within 19 % of the true value, which is what p50/p90/p99 need;
# every fourth bound is a power-of-two multiple of 10 µs, the coarser buckets Prometheus gets
# (PROMETHEUS_BOUNDS).
BOUNDS = account.BOUNDS
PROMETHEUS_EVERY = 4
PROMETHEUS_BOUNDS: tuple[float, ...] = BOUNDS[::PROMETHEUS_EVERY]


class PoolStats:
    """One pool's counters in one process. Times are float seconds. The relay's request,
    transaction and wait times go through account.py into `acc` and `hist` (bytearrays: one call
    per transaction); counts of transactions, requests and server assignments are the sums of
    their histograms."""

    __slots__ = ("received", "sent", "errors", "error_classes", "acc", "hist", "at_once")

    def __init__(self) -> None:
        # bytes from and to the clients that have left (and moved on to another worker); the
        # current ones' are read from the kernel when asked (ClientConn.traffic)
        self.received = 0
        self.sent = 0
        self.errors = 0
        self.error_classes: dict[str, int] = {}  # SQLSTATE class (2 characters) -> count
        self.acc = account.new_acc()
        self.hist = account.new_hist()
        self.at_once = 0  # servers lent without a wait: they count in the wait histogram's bucket 0

    def waited(self, seconds: float) -> None:
        account.waited(self.acc, self.hist, seconds)

    def error(self, sqlstate: str) -> None:
        self.errors += 1
        cls = sqlstate[:2]
        self.error_classes[cls] = self.error_classes.get(cls, 0) + 1

    def maxima(self) -> dict[str, float]:
        acc = memoryview(self.acc).cast("d")
        return {"xact": acc[account.X_MAX], "query": acc[account.Q_MAX], "wait": acc[account.W_MAX]}

    def reset_maxima(self) -> None:
        acc = memoryview(self.acc).cast("d")
        acc[account.X_MAX] = acc[account.Q_MAX] = acc[account.W_MAX] = 0.0

    def totals(self) -> dict[str, Any]:
        """Plain data (for the channel between processes, and for merging)."""
        acc = memoryview(self.acc).cast("d")
        hist = memoryview(self.hist).cast("q").tolist()
        out: dict[str, Any] = {"received": self.received, "sent": self.sent, "errors": self.errors,
                               "xact_time": acc[account.X_TIME], "query_time": acc[account.Q_TIME],
                               "wait_time": acc[account.W_TIME]}
        for name, at in account.HISTOGRAMS.items():
            out[f"{name}_hist"] = hist[at : at + account.NB]
        out["wait_hist"][0] += self.at_once
        out["xacts"] = sum(out["xact_hist"])
        out["queries"] = sum(out["query_hist"])  # requests answered with ReadyForQuery
        out["waits"] = sum(out["wait_hist"])  # servers lent to clients: immediate ones wait 0
        out["error_classes"] = dict(self.error_classes)
        return out


class PeriodStats:
    """What one pool did in the last stats_period: rolled by housekeeping at each period's end."""

    __slots__ = ("previous", "last", "seconds", "maxima")

    def __init__(self) -> None:
        self.previous: dict[str, Any] | None = None  # totals when the current period began
        self.last: dict[str, Any] | None = None  # deltas over the last complete period
        self.seconds = 0.0
        self.maxima: dict[str, float] = {}

    def roll(self, stats: PoolStats, now: dict[str, Any], seconds: float) -> dict[str, Any] | None:
        """End a period of `seconds` at totals `now`: the deltas since the last roll become `last`
        (None for the first)."""
        maxima = stats.maxima()
        stats.reset_maxima()
        if self.previous is not None:
            self.last = subtract(now, self.previous)
            self.seconds = seconds
            self.maxima = maxima
        self.previous = now
        return self.last


def subtract(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in a.items():
        old = b.get(key)
        if isinstance(value, list):
            out[key] = [x - y for x, y in zip(value, old or [0] * len(value), strict=True)]
        elif isinstance(value, dict):
            old = old or {}
            out[key] = {k: v - old.get(k, 0) for k, v in value.items()}
        else:
            out[key] = value - (old or 0)
    return out


def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge two totals (or deltas) dicts, as from two workers."""
    out = dict(a)
    for key, value in b.items():
        old = out.get(key)
        if old is None:
            out[key] = value
        elif isinstance(value, list):
            out[key] = [x + y for x, y in zip(old, value, strict=True)]
        elif isinstance(value, dict):
            merged = dict(old)
            for k, v in value.items():
                merged[k] = merged.get(k, 0) + v
            out[key] = merged
        else:
            out[key] = old + value
    return out


def percentile(hist: list[int], fraction: float) -> float:
    """The upper bound of the bucket holding the given fraction of the samples (0 without any);
    the overflow bucket reports the last bound."""
    total = sum(hist)
    if not total:
        return 0.0
    rank = fraction * total
    seen = 0
    for index, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            return BOUNDS[min(index, len(BOUNDS) - 1)]
    return BOUNDS[-1]


def prometheus_buckets(hist: list[int]) -> list[tuple[float, int]]:
    """Cumulative (upper bound, count) pairs at PROMETHEUS_BOUNDS, then (+Inf, total)."""
    out: list[tuple[float, int]] = []
    running = 0
    for index, count in enumerate(hist):
        running += count
        if index < len(BOUNDS) and index % PROMETHEUS_EVERY == 0:
            out.append((BOUNDS[index], running))
    out.append((float("inf"), running))
    return out
