"""Run pgbench once and read its summary and its per-transaction log (-l)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass
class PgbenchSpec:
    bindir: str
    host: str
    port: int
    user: str
    database: str
    mode: str  # simple | extended | prepared
    clients: int
    duration: int  # seconds (pgbench -T takes whole seconds)
    connect_each: bool = False  # -C: a new connection per transaction
    options: str = ""  # PGOPTIONS: settings every connection asks for at startup
    sslmode: str = ""  # PGSSLMODE (e.g. "require" for --tls); "" leaves libpq's default (or ours)


@dataclass
class PgbenchOutput:
    returncode: int
    tps: float
    transactions: int
    failed: int
    latencies_us: list[int]
    error: str  # stderr tail when pgbench failed or reported aborted clients


def command(spec: PgbenchSpec, log_prefix: str) -> list[str]:
    argv = [
        os.path.join(spec.bindir, "pgbench"), "-n", "-S", "-M", spec.mode,
        "-c", str(spec.clients), "-j", str(min(2, spec.clients)), "-T", str(spec.duration),
        "-h", spec.host, "-p", str(spec.port), "-U", spec.user,
        "-l", f"--log-prefix={log_prefix}",
    ]
    if spec.connect_each:
        argv.append("-C")
    return [*argv, spec.database]


def run(spec: PgbenchSpec) -> PgbenchOutput:
    logdir = tempfile.mkdtemp(prefix="pgdoorman-bench-log-")
    prefix = os.path.join(logdir, "pgbench_log")
    try:
        try:
            extra = {"PGOPTIONS": spec.options} if spec.options else {}
            if spec.sslmode:
                extra["PGSSLMODE"] = spec.sslmode
            env = {**os.environ, **extra} if extra else None
            proc = subprocess.run(command(spec, prefix), capture_output=True, text=True, cwd=logdir,
                                  timeout=spec.duration * 3 + 120, env=env)
        except subprocess.TimeoutExpired as e:
            return PgbenchOutput(-1, 0.0, 0, 0, [], f"pgbench did not finish in {e.timeout:.0f} s")
        latencies = read_latencies(glob.glob(prefix + ".*"))
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    summary = parse_summary(proc.stdout)
    error = ""
    if proc.returncode != 0 or "aborted" in proc.stderr:
        error = "\n".join(proc.stderr.strip().splitlines()[-5:])
    elif summary["transactions"] == 0:
        error = "no transaction completed (is --duration shorter than connecting all clients?)"
    return PgbenchOutput(proc.returncode, summary["tps"], int(summary["transactions"]),
                         int(summary["failed"]), latencies, error)


_SUMMARY = {
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
}


def parse_summary(stdout: str) -> dict[str, float]:
    """tps, transactions and failed transactions from pgbench's report (0 where absent)."""
    out: dict[str, float] = {}
    for key, pattern in _SUMMARY.items():
        m = pattern.search(stdout)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def read_latencies(paths: list[str]) -> list[int]:
    """Latency column (3rd, microseconds) of pgbench's per-transaction logs.

    Lines are `client_id transaction_no time script_no time_epoch time_us [...]`; failed or
    skipped transactions carry a word instead of a number in the time column and are left out.
    """
    latencies: list[int] = []
    for path in paths:
        with open(path) as f:
            for line in f:
                fields = line.split(maxsplit=3)
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]))
    return latencies


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return float(sorted_values[min(len(sorted_values), int(rank)) - 1])
