"""Smoke test of the benchmark harness: `python -m bench --quick` runs end to end.

Asserts only that it finishes and measured something through every target; no timing or ratio.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(330)
def test_bench_quick(tmp_path: Path) -> None:
    if not glob.glob("/usr/lib/postgresql/*/bin/pgbench") and not os.environ.get("PGBIN"):
        pytest.skip("PostgreSQL server binaries and pgbench are not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--settings-case", "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    [json_path] = [p for p in tmp_path.glob("*.json")]
    doc = json.loads(json_path.read_text())
    select = [s for s in doc["summary"] if s["case"] == "select" and not s["skipped"]]
    for target in ("direct", "pgbouncer", "pgdoorman", "pgdoorman-1w"):
        rows = [s for s in select if s["target"] == target]
        assert rows, f"no pgbench result for {target}"
        assert all(s["tps"] > 0 for s in rows), f"{target}: {rows}"
    with_settings = {s["target"] for s in doc["summary"] if s["case"] == "settings" and s["tps"] > 0}
    assert with_settings == {"direct", "pgdoorman", "pgdoorman-1w"}, with_settings  # no PgBouncer
    assert "the TPS without the settings" in (tmp_path / "latest.md").read_text()
    assert (tmp_path / "latest.md").exists()
    assert {r["target"] for r in doc["idle"]} == {"pgbouncer", "pgdoorman", "pgdoorman-1w"}


@pytest.mark.timeout(120)
def test_bench_tls(tmp_path: Path) -> None:
    """--tls: the poolers require TLS, so any TPS through them was measured over TLS."""
    if not glob.glob("/usr/lib/postgresql/*/bin/pgbench") and not os.environ.get("PGBIN"):
        pytest.skip("PostgreSQL server binaries and pgbench are not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tls", "--rounds", "1", "--duration", "2", "--clients", "4",
         "--modes", "simple", "--targets", "direct,pgbouncer,pgdoorman", "--idle-clients", "20",
         "--churn-clients", "4", "--warmup", "0", "--scale", "1", "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    [json_path] = [p for p in tmp_path.glob("*.json")]
    doc = json.loads(json_path.read_text())
    assert doc["settings"]["tls"] is True
    assert "PGSSLMODE=require" in doc["settings"]["tls_setup"]
    for case in ("select", "churn"):
        rows = {s["target"]: s for s in doc["summary"] if s["case"] == case}
        for target in ("direct", "pgbouncer", "pgdoorman"):
            assert rows.get(target) and rows[target]["tps"] > 0 and not rows[target]["errors"], (case, rows)
    assert {r["target"]: r["logged_in"] for r in doc["idle"]} == {"pgbouncer": 20, "pgdoorman": 20}
    md = (tmp_path / "latest.md").read_text()
    assert "'tls': True" in md and "**TLS on**" in md
    assert "## pgbench -S (select only, client TLS)" in md


def test_bench_tls_skips_baseline() -> None:
    from bench.run import parse_args

    args = parse_args(["--tls", "--baseline", "HEAD~1"])
    assert not [t for t in args.targets if "-base" in t] and "pgdoorman" in args.targets
    assert any("pgdoorman-base" in n and "skipped" in n for n in args.notes), args.notes
    with pytest.raises(SystemExit):
        parse_args(["--tls", "--baseline", "HEAD~1", "--targets", "pgdoorman-base"])


def test_pgbench_output_parsing(tmp_path: Path) -> None:
    from bench.pgbench import parse_summary, percentile, read_latencies

    out = ("number of transactions actually processed: 1234\n"
           "number of failed transactions: 2 (0.162%)\n"
           "tps = 123.456789 (without initial connection time)\n")
    assert parse_summary(out) == {"tps": 123.456789, "transactions": 1234.0, "failed": 2.0}
    log = tmp_path / "pgbench_log.77"
    log.write_text("0 1 250 0 1700000000 123\n1 1 100 0 1700000000 124\n2 1 failed 0 1700000000 125\n")
    (tmp_path / "pgbench_log.77.1").write_text("3 1 175 0 1700000000 126\n")
    latencies = sorted(read_latencies([str(log), str(tmp_path / "pgbench_log.77.1")]))
    assert latencies == [100, 175, 250]
    assert percentile(latencies, 50) == 175
    assert percentile(latencies, 99) == 250
    assert percentile([], 99) == 0.0


def test_summary_ratios() -> None:
    from bench.records import RunRecord, summarize

    def run(target: str, tps: float, round_no: int) -> RunRecord:
        return RunRecord("select", "simple", 32, target, round_no, tps, 100, 0, 0.1, 1.0,
                         None, None, None, 0)

    runs = [run("direct", 100, 1), run("direct", 300, 2), run("direct", 200, 3),
            run("pgbouncer", 50, 1), run("pgdoorman", 100, 1)]
    by_target = {s.target: s for s in summarize(runs)}
    assert by_target["direct"].tps == 200
    assert by_target["pgdoorman"].vs_pgbouncer == 2.0
    assert by_target["pgdoorman"].vs_direct == 0.5
