"""Prometheus exposition of the merged worker snapshots, through prometheus_client.

Where prometheus-community's pgbouncer_exporter has a metric, ours has its name, labels and unit
(so its dashboards work on pgdoorman's own endpoint); the rest are pgdoorman_*.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pgdoorman.admin import columns
from pgdoorman.admin.views import VERSION, merged_pools, show
from pgdoorman.config import Config
from pgdoorman.metrics.stats import prometheus_buckets


class SnapshotCollector(Collector):
    def __init__(self, snapshots: list[dict[str, Any]], config: Config) -> None:
        self.snapshots = snapshots
        self.config = config

    def collect(self) -> Iterator[Metric]:
        snapshots, config = self.snapshots, self.config
        pools = merged_pools(snapshots)
        up = GaugeMetricFamily("pgbouncer_up", "The pooler answered this scrape")
        up.add_metric([], 1)
        yield up
        version = GaugeMetricFamily("pgbouncer_version_info", "The pooler's version", labels=["version"])
        version.add_metric([VERSION], 1)
        yield version
        yield _gauge(
            "pgbouncer_config_max_client_connections",
            "Config maximum number of client connections",
            [([], config.general.max_client_conn)],
        )

        pool_labels = ["database", "user"]
        gauges = {
            "cl_active": ("pgbouncer_pools_client_active_connections", "Clients linked to a server or idle"),
            "cl_waiting": ("pgbouncer_pools_client_waiting_connections", "Clients waiting for a server"),
            "sv_active": ("pgbouncer_pools_server_active_connections", "Servers linked to a client"),
            "sv_idle": ("pgbouncer_pools_server_idle_connections", "Servers idle and ready"),
            "sv_used": (
                "pgbouncer_pools_server_used_connections",
                "Servers idle longer than server_check_delay (checked before use)",
            ),
            "sv_tested": ("pgbouncer_pools_server_testing_connections", "Servers being reset or checked"),
            "sv_login": ("pgbouncer_pools_server_login_connections", "Servers logging in"),
            "maxwait": ("pgbouncer_pools_client_maxwait_seconds", "Age of the oldest waiting client"),
            "cl_pinned": (
                "pgdoorman_pools_client_pinned_connections",
                "Clients pinned to their server by session state that cannot move",
            ),
            "pool_size": ("pgdoorman_pools_pool_size", "Servers the pool may open (all workers)"),
        }
        for key, (name, doc) in gauges.items():
            yield _gauge(name, doc, [([p["database"], p["user"]], p[key]) for p in pools], pool_labels)
        # SHOW DATABASES, as the exporter labels it
        _cols, db_rows = show("databases", snapshots, config)  # type: ignore[misc]
        db_labels = ["name", "host", "port", "database", "force_user", "pool_mode"]
        for column, doc in (
            ("pool_size", "Maximum number of server connections"),
            ("reserve_pool_size", "Maximum number of additional connections"),
            ("max_connections", "Maximum number of allowed connections (0: no limit)"),
            ("current_connections", "Current number of server connections"),
            ("paused", "1 if this database is currently paused, else 0"),
            ("disabled", "1 if this database is currently disabled, else 0"),
        ):
            at = _DB_INDEX[column]
            name = "reserve_pool" if column == "reserve_pool_size" else column
            yield _gauge(
                f"pgbouncer_databases_{name}",
                doc,
                [([_label(row[_DB_INDEX[label]]) for label in db_labels], row[at]) for row in db_rows],
                db_labels,
            )

        counters = {
            "queries": (
                "pgbouncer_stats_totals_queries_pooled_total",
                "Requests answered (ReadyForQuery)",
                1,
            ),
            "query_time": (
                "pgbouncer_stats_totals_queries_duration_seconds_total",
                "Time spent in requests",
                1,
            ),
            "received": ("pgbouncer_stats_totals_received_bytes_total", "Bytes received from clients", 1),
            "sent": ("pgbouncer_stats_totals_sent_bytes_total", "Bytes sent to clients", 1),
            "wait_time": (
                "pgbouncer_stats_totals_client_wait_seconds_total",
                "Time clients waited for a server",
                1,
            ),
            "xacts": ("pgbouncer_stats_totals_sql_transactions_pooled_total", "Transactions pooled", 1),
            "xact_time": (
                "pgbouncer_stats_totals_server_in_transaction_seconds_total",
                "Time spent in transactions",
                1,
            ),
            "client_parses": ("pgbouncer_stats_totals_client_parses_total", "Parse messages from clients", 1),
            "server_parses": (
                "pgbouncer_stats_totals_server_parses_total",
                "Parse messages sent to servers",
                1,
            ),
            "binds": ("pgbouncer_stats_totals_binds_total", "Bind messages of prepared statements", 1),
            "waits": ("pgbouncer_stats_totals_server_assignments_total", "Servers lent to clients", 1),
            "prepared_hits": (
                "pgdoorman_prepared_statements_hits_total",
                "Client Parses of a statement the pool already had",
                1,
            ),
            "prepared_evictions": (
                "pgdoorman_prepared_statements_evictions_total",
                "Statements closed on a server to make room",
                1,
            ),
        }
        by_db: dict[str, dict[str, float]] = {}
        for p in pools:
            db = by_db.setdefault(p["database"], {})
            for key in counters:
                db[key] = db.get(key, 0) + p["totals"][key]
        for key, (name, doc, _scale) in counters.items():
            family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["database"])
            for db_name, values in by_db.items():
                family.add_metric([db_name], values[key])
            yield family
        misses = CounterMetricFamily(
            "pgdoorman_prepared_statements_misses",
            "Client Parses of a statement new to the pool",
            labels=["database"],
        )
        for db_name, values in by_db.items():
            misses.add_metric([db_name], max(0, values["client_parses"] - values["prepared_hits"]))
        yield misses
        errors = CounterMetricFamily(
            "pgdoorman_errors",
            "ErrorResponses to clients by SQLSTATE class",
            labels=["database", "user", "class"],
        )
        for p in pools:
            for cls, count in sorted(p["totals"]["error_classes"].items()):
                errors.add_metric([p["database"], p["user"], cls], count)
        yield errors

        for metric, doc in (
            ("xact", "Transaction time"),
            ("query", "Request time"),
            ("wait", "Time waiting for a server"),
        ):
            histogram = HistogramMetricFamily(f"pgdoorman_{metric}_duration_seconds", doc, labels=pool_labels)
            for p in pools:
                hist = p["totals"][f"{metric}_hist"]
                buckets = [(_le(bound), count) for bound, count in prometheus_buckets(hist)]
                histogram.add_metric([p["database"], p["user"]], buckets, p["totals"][f"{metric}_time"])
            yield histogram

        clients = GaugeMetricFamily("pgdoorman_clients", "Client connections by state", labels=["state"])
        servers = GaugeMetricFamily("pgdoorman_servers", "Server connections by state", labels=["state"])
        login = sum(s["logging_in"] for s in snapshots)
        clients.add_metric(["login"], login)
        clients.add_metric(["active"], sum(p["cl_active"] for p in pools))
        clients.add_metric(["waiting"], sum(p["cl_waiting"] for p in pools))
        for state in ("active", "idle", "used", "tested", "login"):
            servers.add_metric([state], sum(p[f"sv_{state}"] for p in pools))
        yield clients
        yield servers
        yield _gauge(
            "pgdoorman_clients_waiting",
            "Clients waiting for a server",
            [([], sum(p["cl_waiting"] for p in pools))],
        )
        yield _gauge(
            "pgdoorman_clients_max_wait_seconds",
            "The longest current wait for a server",
            [([], max((p["maxwait"] for p in pools), default=0.0))],
        )

        cpu = CounterMetricFamily(
            "pgdoorman_worker_cpu_seconds", "CPU time of each worker process", labels=["worker", "pid"]
        )
        rss = GaugeMetricFamily(
            "pgdoorman_worker_resident_memory_bytes", "RSS of each worker process", labels=["worker", "pid"]
        )
        for s in snapshots:
            cpu.add_metric([str(s["worker"]), str(s["pid"])], s["cpu"])
            rss.add_metric([str(s["worker"]), str(s["pid"])], s["rss"])
        yield cpu
        yield rss
        # max_memory_usage (limits.MemoryBudget), per worker: bytes held for messages in flight
        memory = [(s, s.get("memory", (0, 0, 0, 0))) for s in snapshots]
        for name, doc, at in (
                ("pgdoorman_memory_in_flight_bytes", "Bytes held for messages in flight", 0),
                ("pgdoorman_memory_in_flight_peak_bytes", "Peak of the bytes held for messages in flight", 1),
                ("pgdoorman_memory_limit_bytes", "This worker's share of max_memory_usage (0: none)", 2)):
            yield _gauge(name, doc, [([str(s["worker"])], m[at]) for s, m in memory], ["worker"])
        refused = CounterMetricFamily("pgdoorman_memory_refused_clients",
                                      "Clients ended with 53200 by max_memory_usage", labels=["worker"])
        for s, m in memory:
            refused.add_metric([str(s["worker"])], m[3])
        yield refused


_DB_INDEX = {name: i for i, (name, _oid) in enumerate(columns.DATABASES)}


def _label(value: Any) -> str:
    return "" if value is None else str(value)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else f"{bound:.6g}"


def _gauge(
    name: str, doc: str, samples: list[tuple[list[str], float]], labels: list[str] | None = None
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for values, value in samples:
        family.add_metric(values, value)
    return family


def exposition(snapshots: list[dict[str, Any]], config: Config) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshots, config))
    return generate_latest(registry)
