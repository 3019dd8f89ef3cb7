"""Markdown and JSON reports of a benchmark run."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from bench.records import IdleRecord, RunRecord, Summary

MIB = 1024 * 1024


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


def _table(rows: list[Summary]) -> list[str]:
    out = [
        "| mode | clients | target | TPS (median) | TPS min–max | pgdoorman / PgBouncer "
        "| pgdoorman / direct | p50 ms | p99 ms | pooler CPU s / 1k tx | pooler peak RSS MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        if s.skipped:
            out.append(f"| {s.mode} | {s.clients} | {s.target} | n/a: {s.skipped} | | | | | | | |")
            continue
        tps = f"{s.tps:,.0f}" + (f" ({s.errors} failed)" if s.errors else "")
        rss = None if s.peak_rss_bytes is None else s.peak_rss_bytes / MIB
        out.append(
            f"| {s.mode} | {s.clients} | {s.target} | {tps} | {s.tps_min:,.0f}–{s.tps_max:,.0f} "
            f"| {_ratio(s.vs_pgbouncer)} "
            f"| {_ratio(s.vs_direct)} | {s.p50_ms:.3f} | {s.p99_ms:.3f} "
            f"| {_num(s.cpu_s_per_1k_tx, '.3f')} | {_num(rss, '.1f')} |"
        )
    return out


def _idle_table(idle: list[IdleRecord]) -> list[str]:
    out = [
        "| target | clients logged in | RSS before MiB | RSS with clients MiB | bytes per client |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in idle:
        per = "—" if r.per_client_bytes is None else f"{r.per_client_bytes:,.0f}"
        out.append(f"| {r.target} | {r.logged_in:,} / {r.requested:,} | {r.rss_before_bytes / MIB:.1f} "
                   f"| {r.rss_with_clients_bytes / MIB:.1f} | {per} |")
    return out


def markdown(meta: dict[str, Any], summaries: list[Summary], idle: list[IdleRecord],
             runs: list[RunRecord], notes: list[str]) -> str:
    tls = bool(meta["settings"].get("tls"))
    via = ", client TLS" if tls else ""  # on every heading, so no table is read as clear text
    lines = [f"# pgdoorman benchmark, {meta['timestamp']}" + (" (client TLS)" if tls else ""), ""]
    lines += [f"- {key}: {value}" for key, value in meta["environment"].items()]
    lines += [
        f"- settings: {meta['settings']}",
        "",
        "TPS, p50 and p99 are medians over the rounds; latency is per transaction, from pgbench's "
        "`-l` log. Pooler CPU is utime+stime of the pooler's process tree during the run; peak RSS "
        "is VmHWM summed over that tree, reset before each run.",
        "",
    ]
    if tls:
        lines += [f"**TLS on**: {meta['settings'].get('tls_setup', 'client TLS (sslmode=require)')}.", ""]
    select = [s for s in summaries if s.case == "select"]
    churn = [s for s in summaries if s.case == "churn"]
    with_settings = [s for s in summaries if s.case == "settings"]
    if select:
        lines += [f"## pgbench -S (select only{via})", "", *_table(select), ""]
    if with_settings:
        plain = {(s.clients, s.target): s.tps for s in select if s.mode == "simple"}
        lines += [f"## Settings at connect (pgbench -S, simple{via}; PGOPTIONS sets search_path and a "
                  "custom setting)", "", *_table(with_settings), ""]
        for s in with_settings:
            base = plain.get((s.clients, s.target))
            if base:
                lines.append(f"- {s.target} c={s.clients}: {s.tps / base:.2f}× the TPS without the settings")
        lines.append("")
    if churn:
        clients = churn[0].clients
        lines += [f"## Connection churn (pgbench -C -S, {clients} clients, simple{via}; each connection "
                  "a new TLS handshake)" if tls else
                  f"## Connection churn (pgbench -C -S, {clients} clients, simple)", "", *_table(churn), ""]
    if idle:
        how = "logged in over TLS" if tls else "fully logged in"
        lines += [f"## Idle clients (each {how}, then held open)", "", *_idle_table(idle), ""]
        for rec in idle:
            for err, count in rec.errors.items():
                lines.append(f"- {rec.target}: {count} logins failed: {err}")
        lines.append("")
    failures = [r for r in runs if r.error or r.returncode != 0]
    if notes or failures:
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in notes]
        for r in failures:
            detail = r.error.replace("\n", " / ")[:300]
            lines.append(f"- pgbench {r.case} {r.mode} c={r.clients} via {r.target} (round {r.round}) "
                         f"exited {r.returncode}: {detail}")
        lines.append("")
    return "\n".join(lines)


def to_json(meta: dict[str, Any], summaries: list[Summary], idle: list[IdleRecord],
            runs: list[RunRecord], notes: list[str]) -> str:
    doc = {
        **meta,
        "summary": [asdict(s) for s in summaries],
        "idle": [asdict(r) for r in idle],
        "runs": [asdict(r) for r in runs],
        "notes": notes,
    }
    return json.dumps(doc, indent=2) + "\n"
