"""The compiled per-transaction accounting (metrics/_account.c) and its pure-Python twin agree,
and the histograms give the percentiles and Prometheus buckets the console and /metrics show."""

from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgdoorman.metrics import _account, account  # type: ignore[attr-defined]
from pgdoorman.metrics.stats import BOUNDS, PoolStats, percentile, prometheus_buckets


@given(st.floats(min_value=0, max_value=1e4, allow_nan=False))
def test_bucket_twins_agree_and_match_the_bounds(seconds):
    at = _account.bucket(seconds)
    assert at == account.py_bucket(seconds)
    assert at == 96 or seconds <= BOUNDS[at]
    assert at == 0 or seconds > BOUNDS[at - 1]


@pytest.mark.parametrize("at", range(len(BOUNDS)))
def test_bucket_edges(at):
    """A bound itself is its bucket's top; the next float up starts the next bucket."""
    bound = BOUNDS[at]
    assert _account.bucket(bound) == account.py_bucket(bound) == at
    above = math.nextafter(bound, math.inf)
    assert _account.bucket(above) == account.py_bucket(above) == at + 1


@pytest.mark.parametrize("impl", ["c", "python"])
def test_begin_done_waited(impl):
    begin, done, waited = ((_account.begin, _account.done, _account.waited) if impl == "c"
                           else (account.py_begin, account.py_done, account.py_waited))
    stats = PoolStats()
    times = account.new_times()
    before = time.monotonic()
    now = done(times, stats.acc, stats.hist, True)  # nothing begun: nothing counted (a pooler query)
    assert before <= now <= time.monotonic()  # the clock it read: the server's last_used
    assert stats.totals()["queries"] == 0
    begin(times)
    first = memoryview(times).cast("d")[0]
    begin(times)  # a second chunk of the same request changes nothing
    assert memoryview(times).cast("d")[0] == first
    time.sleep(0.002)
    done(times, stats.acc, stats.hist, False)  # a request inside a transaction
    begin(times)
    done(times, stats.acc, stats.hist, True)  # the transaction's last
    waited(stats.acc, stats.hist, 0.5)
    stats.at_once += 3
    t = stats.totals()
    assert t["queries"] == 2 and t["xacts"] == 1 and t["waits"] == 4
    assert t["xact_time"] >= 0.002 and t["xact_time"] >= t["query_time"] * 0.99
    assert t["wait_time"] == 0.5 and t["wait_hist"][0] == 3
    assert stats.maxima()["wait"] == 0.5
    assert list(memoryview(times).cast("d")) == [0.0, 0.0]


def test_percentiles_and_prometheus_buckets():
    rng = random.Random(7)
    hist = [0] * 97
    values = sorted(rng.lognormvariate(-7, 1) for _ in range(10000))
    for v in values:
        hist[account.py_bucket(v)] += 1
    for q in (0.5, 0.9, 0.99):
        true = values[int(q * len(values)) - 1]
        assert true <= percentile(hist, q) <= true * 2 ** 0.25 * 1.0001  # one bucket: within 19 %
    buckets = prometheus_buckets(hist)
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and counts[-1] == len(values) and buckets[-1][0] == float("inf")
