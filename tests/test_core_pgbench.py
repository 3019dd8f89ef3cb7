"""pgbench through the pooler: 32 clients over a transaction pool of 4, simple and extended protocol."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

CLIENTS = 32
DURATION_S = 5


def run_pgbench(pg, pooler, *args: str, dbname: str = "tx") -> tuple[subprocess.CompletedProcess[str], str]:
    env = dict(os.environ, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    env.pop("PGPASSWORD", None)
    argv = [pg.tool("pgbench"), "-h", pooler.host, "-p", str(pooler.port), "-U", "trust_user",
            "-c", str(CLIENTS), "-j", "2", *args, dbname]
    # Generous upper bound: a hung pooler must fail this test, not stall the suite.
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION_S + 60, env=env)
    return proc, proc.stdout + proc.stderr


def processed_and_failed(output: str) -> tuple[int, int]:
    m = re.search(r"number of transactions actually processed: (\d+)", output)
    assert m, "pgbench printed no 'transactions actually processed' line:\n" + output
    f = re.search(r"number of failed transactions: (\d+)", output)
    assert f, "pgbench printed no 'number of failed transactions' line:\n" + output
    return int(m.group(1)), int(f.group(1))


@pytest.mark.parametrize("script", ["select-only", "tpcb-like"])
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_pgbench(pg, pooler, protocol, script):
    args = ["-M", protocol, "-T", str(DURATION_S), "-b", script]
    proc, out = run_pgbench(pg, pooler, *args)
    assert proc.returncode == 0, f"pgbench exit code {proc.returncode}:\n{out}"
    processed, failed = processed_and_failed(out)
    assert failed == 0, out
    assert processed > 0, out
    assert "error" not in proc.stderr.lower(), out
