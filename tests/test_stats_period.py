"""Issue 10: averages and latency percentiles over stats_period, the periodic stats log line, and
log_format = "json"."""

from __future__ import annotations

import json
import time

from helpers import pconnect, pool_config, wait_until
from test_admin import ADMIN_PASSWORD, show


def test_period_averages_latency_and_stats_line(start_pooler):
    p = start_pooler(pool_config("tx", "transaction", pool_size=2, users=("trust_user",)),
                     {"workers": 2, "admin_password": ADMIN_PASSWORD, "stats_period": "1s"})
    conns = [pconnect(p) for _ in range(4)]
    try:
        deadline = time.monotonic() + 2.5  # traffic through at least one whole period
        while time.monotonic() < deadline:
            for c in conns:
                c.execute("SELECT pg_sleep(0.002)")
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: "stats: tx/trust_user:" in p.log(), timeout=5), p.log()
    line = next(x for x in p.log().splitlines() if "stats: tx/trust_user:" in x)
    assert "xacts/s" in line and "query p99" in line
    averages = {r["database"]: r for r in show(p, "STATS_AVERAGES")}["tx"]
    assert int(averages["xact_count"]) > 0 and int(averages["xact_time"]) >= 2000  # µs, pg_sleep(0.002)
    latency = {r["metric"]: r for r in show(p, "LATENCY")}
    query = latency["query"]
    assert query["count"] > 0 and 2000 <= query["p50_us"] <= query["p90_us"] <= query["p99_us"]
    assert query["max_us"] >= query["p50_us"] / 1.2  # exact max vs a bucket's upper bound


def test_json_log_format(start_pooler):
    p = start_pooler(pool_config("tx", "transaction", pool_size=1, users=("trust_user",)),
                     {"workers": 1, "log_format": "json"})
    with pconnect(p) as c:
        c.execute("SELECT 1")
    assert wait_until(lambda: "login ok" in p.log())
    records = [json.loads(line) for line in p.log().splitlines() if line.startswith("{")]
    assert records and all({"time", "level", "pid", "logger", "message"} <= r.keys() for r in records)
    assert any("login ok" in r["message"] and r["level"] == "info" for r in records)
    assert not [line for line in p.log().splitlines() if line.strip() and not line.startswith("{")]
