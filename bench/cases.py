"""The measured cases: a pgbench run with the pooler's CPU and RSS around it, and the idle clients."""

from __future__ import annotations

import asyncio
import time

from bench import pgbench, procstats
from bench.idle import IdleClients
from bench.records import IdleRecord, RunRecord
from bench.targets import Target


def pgbench_run(target: Target, spec: pgbench.PgbenchSpec, case: str, round_no: int) -> RunRecord:
    """Run pgbench against target; sample the pooler's /proc before and after."""
    pid = target.pid()
    sample = None
    if pid is not None:
        procstats.reset_peak_rss(procstats.tree(pid))
        sample = procstats.CpuSample.take(pid)
    out = pgbench.run(spec)
    cpu = sample.delta() if sample is not None else None
    peak = procstats.peak_rss_bytes(procstats.tree(pid)) if pid is not None else None
    latencies = sorted(out.latencies_us)
    per_1k = cpu / out.transactions * 1000 if cpu is not None and out.transactions > 0 else None
    return RunRecord(
        case=case, mode=spec.mode, clients=spec.clients, target=target.name, round=round_no,
        tps=out.tps, transactions=out.transactions, failed=out.failed,
        p50_ms=pgbench.percentile(latencies, 50) / 1000, p99_ms=pgbench.percentile(latencies, 99) / 1000,
        pooler_cpu_s=cpu, cpu_s_per_1k_tx=per_1k, peak_rss_bytes=peak,
        returncode=out.returncode, error=out.error,
    )


async def _idle(target: Target, root: int, user: str, database: str, count: int,
                batch: int, tls: bool) -> IdleRecord:
    before = procstats.rss_bytes(procstats.tree(root))
    clients = IdleClients()
    try:
        await clients.open(target.host, target.port, user, database, count, batch=batch, tls=tls)
        await asyncio.sleep(1.0)  # let the pooler settle (and free any per-login garbage)
        with_clients = procstats.rss_bytes(procstats.tree(root))
        n = len(clients.writers)
    finally:
        await clients.close()
    per_client = (with_clients - before) / n if n else None
    return IdleRecord(target.name, count, n, before, with_clients, per_client, dict(clients.errors))


def idle_clients(target: Target, user: str, database: str, count: int, batch: int = 250,
                 tls: bool = False) -> IdleRecord:
    """RSS of the pooler before and with `count` logged-in idle clients (over TLS if `tls`); bytes per
    client."""
    root = target.pid()
    if root is None:
        raise ValueError(f"{target.name} has no pooler process to measure")
    started = time.monotonic()
    record = asyncio.run(_idle(target, root, user, database, count, batch, tls))
    time.sleep(min(2.0, time.monotonic() - started))  # let the pooler finish closing the clients
    return record
