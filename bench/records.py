"""Plain records of what was measured, and their per-configuration summaries."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# -1w: one worker process; -base: the same, run from the --baseline git revision (before/after)
TARGETS = ("direct", "pgbouncer", "pgdoorman", "pgdoorman-1w", "pgdoorman-strict", "pgdoorman-base",
           "pgdoorman-base-1w")
MODES = ("simple", "extended", "prepared")


@dataclass
class RunRecord:
    """One pgbench run against one target."""

    case: str  # "select" (pgbench -S), "settings" (-S with PGOPTIONS) or "churn" (pgbench -C -S)
    mode: str
    clients: int
    target: str
    round: int
    tps: float
    transactions: int
    failed: int
    p50_ms: float
    p99_ms: float
    pooler_cpu_s: float | None
    cpu_s_per_1k_tx: float | None
    peak_rss_bytes: int | None
    returncode: int
    error: str = ""


@dataclass
class Summary:
    """Medians over the rounds of one (case, mode, clients, target)."""

    case: str
    mode: str
    clients: int
    target: str
    rounds: int
    tps: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k_tx: float | None
    peak_rss_bytes: int | None
    tps_min: float = 0.0  # spread over the rounds: how much to trust the median
    tps_max: float = 0.0
    vs_pgbouncer: float | None = None
    vs_direct: float | None = None
    skipped: str = ""  # why this target was not run in this configuration
    errors: int = 0


@dataclass
class IdleRecord:
    target: str
    requested: int
    logged_in: int
    rss_before_bytes: int
    rss_with_clients_bytes: int
    per_client_bytes: float | None
    errors: dict[str, int] = field(default_factory=dict)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarize(runs: list[RunRecord]) -> list[Summary]:
    groups: dict[tuple[str, str, int, str], list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.case, r.mode, r.clients, r.target), []).append(r)
    out: list[Summary] = []
    for (case, mode, clients, target), rs in groups.items():
        cpu = [r.cpu_s_per_1k_tx for r in rs if r.cpu_s_per_1k_tx is not None]
        rss = [r.peak_rss_bytes for r in rs if r.peak_rss_bytes is not None]
        out.append(Summary(
            case=case, mode=mode, clients=clients, target=target, rounds=len(rs),
            tps=_median([r.tps for r in rs]),
            tps_min=min(r.tps for r in rs),
            tps_max=max(r.tps for r in rs),
            p50_ms=_median([r.p50_ms for r in rs]),
            p99_ms=_median([r.p99_ms for r in rs]),
            cpu_s_per_1k_tx=_median(cpu) if cpu else None,
            peak_rss_bytes=max(rss) if rss else None,
            errors=sum(1 for r in rs if r.error or r.returncode != 0),
        ))
    by_key = {(s.case, s.mode, s.clients, s.target): s for s in out}
    for s in out:
        if not s.target.startswith("pgdoorman"):
            continue
        for other, attr in (("pgbouncer", "vs_pgbouncer"), ("direct", "vs_direct")):
            base = by_key.get((s.case, s.mode, s.clients, other))
            if base is not None and base.tps > 0:
                setattr(s, attr, s.tps / base.tps)
    out.sort(key=sort_key)
    return out


def sort_key(s: Summary) -> tuple[bool, int, int, int]:
    mode = MODES.index(s.mode) if s.mode in MODES else len(MODES)
    target = TARGETS.index(s.target) if s.target in TARGETS else len(TARGETS)
    return (s.case != "select", mode, s.clients, target)
