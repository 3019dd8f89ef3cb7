"""`python -m bench`: direct PostgreSQL vs PgBouncer vs pgdoorman, side by side.

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from bench import cases, chart, pgbench, report, tlscert
from bench.cluster import DATABASE, USER, start_cluster
from bench.doorman import PgDoorman
from bench.idle import raise_fd_limit
from bench.pgbench import PgbenchSpec
from bench.pgbouncer import PgBouncer
from bench.records import MODES, TARGETS, IdleRecord, RunRecord, Summary, sort_key, summarize
from bench.targets import Target
from pgdoorman.devcluster import free_port

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
POOL_SIZE = 20
# The settings case (--settings-case): what Django and Rails set on each connection, as options.
SETTINGS_AT_CONNECT = "-c search_path=public,pg_catalog -c myapp.tenant=42"
TLS_SETUP = ("client TLS on every target: pgbench PGSSLMODE=require, idle clients SSLRequest; "
             "pgdoorman tls_mode = require, PgBouncer client_tls_sslmode = require, PostgreSQL ssl = on "
             f"(direct is TLS too); {tlscert.KEY_DESCRIPTION}; poolers -> PostgreSQL in clear text")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration (3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run (-T, 10)")
    p.add_argument("--clients", type=_int_list, default=[1, 32, 500], help="client counts (1,32,500)")
    p.add_argument("--modes", type=_str_list, default=list(MODES), help="pgbench -M modes")
    p.add_argument("--settings-case", action="store_true",
                   help="also run -S (simple) with every client setting search_path and a custom "
                        "setting at connect (PGOPTIONS), as Django and Rails do")
    p.add_argument("--targets", type=_str_list, default=None,
                   help=",".join(TARGETS) + " (default: all but -strict, and -base unless --baseline)")
    p.add_argument("--churn-clients", type=int, default=32, help="clients of the -C case (0: skip)")
    p.add_argument("--idle-clients", type=int, default=10_000, help="idle logins per pooler (0: skip)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (10)")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per target (0: none)")
    p.add_argument("--results-dir", default=RESULTS_DIR, help="where the .md/.json/.png go")
    p.add_argument("--baseline", default="",
                   help="git revision to compare with: targets pgdoorman-base(-1w) run it (before/after)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 2 s, clients 1,8, simple only, 200 idle clients")
    p.add_argument("--tls", action="store_true",
                   help="clients use TLS: every pooler requires it (self-signed certificate made at run "
                        "time), PostgreSQL runs with ssl = on, pgbench and the idle clients connect with "
                        "sslmode=require; poolers reach PostgreSQL in clear text as without --tls. "
                        "pgdoorman-base targets are skipped (the --baseline checkout may not know tls_*)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.clients, args.modes = 1, 2, [1, 8], ["simple"]
        args.idle_clients, args.churn_clients, args.warmup = 200, 8, 1
    if args.targets is None:
        args.targets = [t for t in TARGETS if (args.baseline or "-base" not in t) and "-strict" not in t]
    bad = [m for m in args.modes if m not in MODES] + [t for t in args.targets if t not in TARGETS]
    if bad:
        p.error(f"unknown mode or target: {', '.join(bad)}")
    args.notes = []
    if args.tls:
        base = [t for t in args.targets if "-base" in t]
        if base:
            args.targets = [t for t in args.targets if "-base" not in t]
            if not args.targets:
                p.error(f"--tls leaves no target: {', '.join(base)} cannot be run with TLS")
            note = (f"--tls: {', '.join(base)} skipped: the --baseline checkout "
                    f"({args.baseline or 'none given'}) may predate tls_mode, tls_certificate and "
                    "tls_private_key, so it is not run with TLS")
            args.notes.append(note)
            log(note)
    if args.rounds < 1 or args.duration <= 0 or not args.clients:
        p.error("--rounds, --duration and --clients must be positive")
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Bench:
    args: argparse.Namespace
    targets: list[Target] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    idle: list[IdleRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bindir: str = ""

    def spec(self, target: Target, mode: str, clients: int, duration: int,
             connect_each: bool = False, options: str = "") -> PgbenchSpec:
        return PgbenchSpec(self.bindir, target.host, target.port, USER, DATABASE, mode, clients,
                           duration, connect_each, options, sslmode="require" if self.args.tls else "")

    def measure(self, target: Target, case: str, mode: str, clients: int, round_no: int) -> None:
        why = target.died()
        if why:
            self.notes.append(f"{target.name} {why} (found before round {round_no} {case} {mode} "
                              f"c={clients}); restarted")
            log(f"{target.name} {why}; restarting")
            target.restart()
        spec = self.spec(target, mode, clients, self.args.duration, connect_each=case == "churn",
                         options=SETTINGS_AT_CONNECT if case == "settings" else "")
        r = cases.pgbench_run(target, spec, case, round_no)
        self.runs.append(r)
        cpu = "" if r.cpu_s_per_1k_tx is None else f" cpu {r.cpu_s_per_1k_tx * 1000:.1f} µs/tx"
        fail = f" FAILED rc={r.returncode}: {r.error.splitlines()[-1:]}" if r.error or r.returncode else ""
        log(f"round {round_no} {case} {mode} c={clients} {target.name}: {r.tps:,.0f} tps "
            f"p50 {r.p50_ms:.3f} ms p99 {r.p99_ms:.3f} ms{cpu}{fail}")

    def idle_case(self) -> None:
        for t in self.targets:
            if t.pid() is None:
                continue
            # one served transaction first, so the pool and its server parameters exist
            pgbench.run(self.spec(t, "simple", 1, 1))
            rec = cases.idle_clients(t, USER, DATABASE, self.args.idle_clients, tls=self.args.tls)
            self.idle.append(rec)
            per = "—" if rec.per_client_bytes is None else f"{rec.per_client_bytes:,.0f}"
            log(f"idle clients {t.name}: {rec.logged_in}/{rec.requested} logged in, {per} bytes/client"
                + (f", errors {rec.errors}" if rec.errors else ""))

    def pgbench_cases(self) -> None:
        a = self.args
        for t in self.targets:
            if a.warmup > 0:
                pgbench.run(self.spec(t, "simple", min(POOL_SIZE, max(a.clients)), a.warmup))
        for round_no in range(1, a.rounds + 1):
            for mode in a.modes:
                for clients in a.clients:
                    for t in self.targets:
                        if mode == "prepared" and not t.supports_prepared:
                            continue
                        self.measure(t, "select", mode, clients, round_no)
            if a.settings_case:
                for clients in a.clients:
                    for t in self.targets:
                        # PgBouncer refuses startup `options`; a --baseline may predate them
                        if t.name != "pgbouncer" and "-base" not in t.name:
                            self.measure(t, "settings", "simple", clients, round_no)
            if a.churn_clients > 0:
                for t in self.targets:
                    self.measure(t, "churn", "simple", a.churn_clients, round_no)

    def summaries(self) -> list[Summary]:
        out = summarize(self.runs)
        for t in self.targets:
            if not t.supports_prepared and "prepared" in self.args.modes:
                for clients in self.args.clients:
                    out.append(Summary(
                        case="select", mode="prepared", clients=clients, target=t.name, rounds=0,
                        tps=0.0, p50_ms=0.0, p99_ms=0.0, cpu_s_per_1k_tx=None, peak_rss_bytes=None,
                        skipped=f"{t.name} {t.version} has no max_prepared_statements (needs ≥ 1.21)"))
        out.sort(key=sort_key)
        return out


def make_targets(args: argparse.Namespace, host: str, server_port: int,
                 cert: tlscert.ServerCert | None = None) -> list[Target]:
    max_client = max(max(args.clients), args.churn_clients, args.idle_clients) + 1000
    cert_file, key_file = (cert.cert_path, cert.key_path) if cert is not None else ("", "")
    made: list[Target] = []
    for name in args.targets:
        if name == "direct":
            made.append(Target("direct", host, server_port))
        elif name == "pgbouncer":
            pgb = PgBouncer("pgbouncer", host, free_port(host), server_port=server_port, database=DATABASE,
                            user=USER, pool_size=POOL_SIZE, max_client_conn=max_client,
                            tls_cert_file=cert_file, tls_key_file=key_file)
            pgb.prepare()
            made.append(pgb)
        else:
            if "-base" in name and not args.baseline_root:
                raise SystemExit(f"target {name} needs --baseline REV")
            pgd = PgDoorman(name, host, free_port(host), server_port=server_port, database=DATABASE,
                            user=USER, pool_size=POOL_SIZE, max_client_conn=max_client,
                            workers=1 if name.endswith("-1w") else 0, strict=name.endswith("-strict"),
                            tls_cert_file=cert_file, tls_key_file=key_file,
                            **({"source_root": args.baseline_root} if "-base" in name else {}))
            pgd.prepare()
            made.append(pgd)
    return made


def write_results(bench: Bench, meta: dict[str, Any]) -> str:
    os.makedirs(bench.args.results_dir, exist_ok=True)
    stem = os.path.join(bench.args.results_dir, meta["timestamp"])
    summaries = bench.summaries()
    png = stem + ".png"
    if chart.write_png(png, summaries, bench.args.modes, tls=bench.args.tls):
        meta["chart"] = os.path.basename(png)
    else:
        bench.notes.append("matplotlib is not installed: no chart (pip install matplotlib)")
    md = report.markdown(meta, summaries, bench.idle, bench.runs, bench.notes)
    if "chart" in meta:
        md += f"\n![TPS and p99 per client count]({meta['chart']})\n"
    doc = report.to_json(meta, summaries, bench.idle, bench.runs, bench.notes)
    latest = os.path.join(bench.args.results_dir, "latest.md")
    for path, text in ((stem + ".md", md), (latest, md), (stem + ".json", doc)):
        with open(path, "w") as f:
            f.write(text)
    print(md)
    log(f"wrote {stem}.md, {stem}.json" + (f", {png}" if "chart" in meta else ""))
    return stem + ".json"


def checkout_baseline(rev: str) -> str:
    """A git worktree of rev beside this checkout, its frame scanner compiled: the "before"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tempfile.mkdtemp(prefix="pgdoorman-bench-base-")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "-f", path, rev], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=path, check=True,
                   capture_output=True)
    log(f"baseline {rev} checked out in {path}")
    return path


def remove_baseline(path: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["git", "-C", root, "worktree", "remove", "--force", path], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needs_base = any("-base" in t for t in args.targets)
    args.baseline_root = checkout_baseline(args.baseline) if args.baseline and needs_base else ""
    timestamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    fd_limit = raise_fd_limit(2 * args.idle_clients + 4096)
    if fd_limit < args.idle_clients + 100:
        log(f"open-file limit {fd_limit} is too low for {args.idle_clients} idle clients")
    max_conn = max(max(args.clients), args.churn_clients) + 2 * POOL_SIZE + 60
    log(f"starting PostgreSQL (max_connections {max_conn}) and pgbench -i -s {args.scale}")
    cert = tlscert.make_server_cert(owner="postgres") if args.tls else None
    try:
        cluster = start_cluster(args.scale, max_conn, tls=cert)
    except BaseException:
        if cert is not None:
            cert.cleanup()
        raise
    bench = Bench(args, bindir=cluster.bindir, notes=list(args.notes))
    status = 0
    try:
        bench.targets = make_targets(args, cluster.host, cluster.port, cert)
        for t in bench.targets:
            t.start()
            log(f"{t.name} {t.version} on {t.host}:{t.port}")
        if args.idle_clients > 0:
            bench.idle_case()
            for t in bench.targets:
                t.restart()  # fresh processes for the throughput runs
        try:
            bench.pgbench_cases()
        except Exception as e:  # keep what was measured
            bench.notes.append(f"benchmark stopped early: {e!r}")
            log(f"benchmark stopped early: {e!r}")
            status = 1
        for t in bench.targets:
            bench.notes.extend(t.notes)
        pg_version = cluster.psql("SHOW server_version")
        meta: dict[str, Any] = {
            "timestamp": timestamp,
            "environment": {
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
                "python": platform.python_version(),
                "PostgreSQL": pg_version,
                **{t.name: t.version for t in bench.targets if t.version},
                "pool size": POOL_SIZE,
                "load average at start (1, 5, 15 min)": load_at_start,
                "load average at end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            },
            "settings": {
                "rounds": args.rounds, "duration_s": args.duration, "clients": args.clients,
                "modes": args.modes, "targets": args.targets, "churn_clients": args.churn_clients,
                "idle_clients": args.idle_clients, "scale": args.scale, "quick": args.quick,
                "baseline": args.baseline, "tls": args.tls,
                **({"tls_setup": TLS_SETUP} if args.tls else {}),
            },
        }
        write_results(bench, meta)
    finally:
        for t in bench.targets:
            t.cleanup()
        cluster.destroy()
        if cert is not None:
            cert.cleanup()
        if args.baseline_root:
            remove_baseline(args.baseline_root)
    return status
