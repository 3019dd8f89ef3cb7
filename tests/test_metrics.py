"""Issue 10: the Prometheus endpoint (every worker merged, names as pgbouncer_exporter's), /health,
latency histograms, and Debian's prometheus-pgbouncer-exporter scraping the console."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import psycopg
import pytest
from helpers import free_port, pconnect, pool_config, wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_admin import ADMIN_PASSWORD, aconnect, show


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_agree_with_show_over_two_workers(start_pooler):
    port = free_port("127.0.0.1")
    p = start_pooler(pool_config("tx", "transaction", pool_size=3),
                     {"admin_password": ADMIN_PASSWORD, "workers": 2},
                     prometheus={"enabled": True, "port": port})
    conns = [pconnect(p) for _ in range(6)]
    try:
        for i in range(20):
            for c in conns:
                c.execute("SELECT %s::int", (i,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conns[0].execute("SELECT 1/0")
        status, text = scrape(port)
        assert status == 200
        got = samples(text)
        stats = {r["database"]: r for r in show(p, "STATS")}["tx"]
        db = (("database", "tx"),)
        xacts = int(stats["total_xact_count"])
        assert got[("pgbouncer_stats_totals_sql_transactions_pooled_total", db)] == xacts
        assert got[("pgbouncer_stats_totals_queries_pooled_total", db)] == int(stats["total_query_count"])
        assert got[("pgbouncer_stats_totals_received_bytes_total", db)] == int(stats["total_received"])
        assert int(stats["total_xact_count"]) >= 121
        pool = (("database", "tx"), ("user", "trust_user"))
        pools = show(p, "POOLS")[0]
        assert got[("pgbouncer_pools_client_active_connections", pool)] == pools["cl_active"] == 6 + 0
        assert got[("pgdoorman_errors_total", (("class", "22"), *pool))] == 1
        # the histogram counts every transaction; its buckets are cumulative and end at +Inf
        count = got[("pgdoorman_xact_duration_seconds_count", pool)]
        assert count == int(stats["total_xact_count"])
        assert got[("pgdoorman_xact_duration_seconds_bucket", (pool[0], ("le", "+Inf"), pool[1]))] == count
        workers = {labels for name, labels in got if name == "pgdoorman_worker_resident_memory_bytes"}
        assert len(workers) == 2
        assert got[("pgbouncer_up", ())] == 1
        # /health: 200 serving, 503 paused
        assert scrape(port, "/health")[0] == 200
        with aconnect(p) as admin:
            admin.execute("PAUSE")
            assert scrape(port, "/health")[0] == 503
            admin.execute("RESUME")
        assert scrape(port, "/health")[0] == 200
        assert scrape(port, "/nothing")[0] == 404
    finally:
        for c in conns:
            c.close()


EXPORTER = shutil.which("prometheus-pgbouncer-exporter") or "/usr/bin/prometheus-pgbouncer-exporter"


def test_debian_exporter_scrapes_the_console(start_pooler):
    assert os.path.exists(EXPORTER), "scripts/test.sh installs Debian's prometheus-pgbouncer-exporter"
    p = start_pooler(pool_config("tx", "transaction", pool_size=2),
                     {"admin_password": ADMIN_PASSWORD, "workers": 2, "admin_legacy_columns": True})
    with pconnect(p) as c:
        for _ in range(7):
            c.execute("SELECT 1")
    port = free_port("127.0.0.1")
    env = dict(os.environ, PGPASSWORD=ADMIN_PASSWORD)
    proc = subprocess.Popen([EXPORTER, "--host", "127.0.0.1", "--port", str(port), "--pgbouncer-host", p.host,
                             "--pgbouncer-port", str(p.port), "--pgbouncer-user", "admin"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        text = ""

        def scraped() -> bool:
            nonlocal text
            try:
                status, text = scrape(port)
            except OSError:
                return False
            return status == 200 and "pgbouncer_received_bytes_total" in text
        assert wait_until(scraped, timeout=20), (text, proc.poll())
        got = samples(text)
        assert got[("pgbouncer_active_clients", (("database", "tx"), ("user", "trust_user")))] == 0
        assert got[("pgbouncer_databases", ())] == 1
        # it labels databases by the server's name for them
        assert got[("pgbouncer_pool_size", (("database", "testdb"),))] == 2
        time.sleep(0.2)
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
    assert "Traceback" not in out, out


def test_single_process_serves_metrics_too(start_pooler):
    port = free_port("127.0.0.1")
    p = start_pooler(pool_config("tx", "transaction", pool_size=1),
                     {"admin_password": ADMIN_PASSWORD, "workers": 1},
                     prometheus={"enabled": True, "port": port})
    with pconnect(p) as c:
        for _ in range(3):
            c.execute("SELECT 1")
    status, text = scrape(port)
    assert status == 200
    got = samples(text)
    assert got[("pgbouncer_stats_totals_sql_transactions_pooled_total", (("database", "tx"),))] == 3
    assert scrape(port, "/health")[0] == 200
