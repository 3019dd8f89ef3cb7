"""SHOW results: every worker's snapshot (admin/worker.py) merged into one view of the pooler,
laid out as PgBouncer 1.25 lays them out (admin/columns.py), plus pgdoorman's own SHOWs."""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

from pgdoorman import __version__
from pgdoorman.admin import columns as c
from pgdoorman.config import RESTART_KEYS, SIZE_KEYS, Config, GeneralConfig, format_duration, format_size
from pgdoorman.metrics.stats import add, percentile

Row = list[Any]
Result = tuple[c.Columns, list[Row]]
VERSION = f"pgdoorman {__version__} (PgBouncer 1.25 console)"
# Our own columns, after PgBouncer's (which exporters read by name, so extras at the end are safe).
POOLS_EXTRA: c.Columns = (("cl_pinned", c.INT4),)
LEGACY_STATS: c.Columns = (("total_requests", c.NUMERIC),)
LEGACY_DATABASES: c.Columns = (("reserve_pool", c.INT4),)
PREPARED_STATEMENTS: c.Columns = (
    ("database", c.TEXT),
    ("user", c.TEXT),
    ("server_name", c.TEXT),
    ("query", c.TEXT),
    ("uses", c.INT8),
    ("clients", c.INT4),
    ("servers", c.TEXT),
)
WORKERS: c.Columns = (
    ("worker", c.INT4),
    ("pid", c.INT4),
    ("clients", c.INT4),
    ("servers", c.INT4),
    ("uptime", c.INT8),
    ("cpu_seconds", c.NUMERIC),
    ("rss", c.INT8),
)
LATENCY: c.Columns = (
    ("database", c.TEXT),
    ("user", c.TEXT),
    ("metric", c.TEXT),
    ("count", c.INT8),
    ("p50_us", c.INT8),
    ("p90_us", c.INT8),
    ("p99_us", c.INT8),
    ("max_us", c.INT8),
)
HELP = """SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|STATE
SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|LISTS|MEM
SHOW PREPARED_STATEMENTS|WORKERS|LATENCY
SET key = arg
RELOAD
PAUSE [<db>]
RESUME [<db>]
DISABLE <db>
ENABLE <db>
RECONNECT [<db>]
KILL [<db>]
KILL_CLIENT <client_id>
WAIT_CLOSE [<db>]
SHUTDOWN
SHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS"""


def merged_pools(snapshots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (database, user), summed over workers, in config order."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    summed = (
        "pool_size",
        "min_pool_size",
        "cl_active",
        "cl_waiting",
        "cl_pinned",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
    )
    for snap in snapshots:
        for pool in snap["pools"]:
            key = (pool["database"], pool["user"])
            have = out.get(key)
            if have is None:
                out[key] = dict(pool)
                continue
            for name in summed:
                have[name] += pool[name]
            have["maxwait"] = max(have["maxwait"], pool["maxwait"])
            have["paused"] = have["paused"] or pool["paused"]
            _add_counters(have, pool)
            maxima = dict(have["maxima"])
            for name, value in pool["maxima"].items():
                maxima[name] = max(value, maxima.get(name, 0.0))
            have["maxima"] = maxima
    return list(out.values())


def _add_counters(have: dict[str, Any], other: dict[str, Any]) -> None:
    """have += other: totals, and the last period's deltas (None until a worker has a period)."""
    have["totals"] = add(have["totals"], other["totals"])
    if other["period"] is not None:
        have["period"] = other["period"] if have["period"] is None else add(have["period"], other["period"])
        have["period_seconds"] = max(have["period_seconds"], other["period_seconds"])


def _by_database(pools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pool in pools:
        db = pool["database"]
        have = out.get(db)
        if have is None:
            out[db] = {
                "totals": pool["totals"],
                "period": pool["period"],
                "period_seconds": pool["period_seconds"],
            }
        else:
            _add_counters(have, pool)
    return out


_US = 1e6


def _total_values(t: dict[str, Any]) -> Row:
    return [
        t["waits"],
        t["xacts"],
        t["queries"],
        t["received"],
        t["sent"],
        round(t["xact_time"] * _US),
        round(t["query_time"] * _US),
        round(t["wait_time"] * _US),
        t["client_parses"],
        t["server_parses"],
        t["binds"],
    ]


def _average_values(p: dict[str, Any] | None, seconds: float) -> Row:
    if p is None or not seconds:
        return [0] * 11

    def rate(n: float) -> int:
        return round(n / seconds)

    def mean(total: float, count: int) -> int:
        return round(total / count * _US) if count else 0

    return [
        rate(p["waits"]),
        rate(p["xacts"]),
        rate(p["queries"]),
        rate(p["received"]),
        rate(p["sent"]),
        mean(p["xact_time"], p["xacts"]),
        mean(p["query_time"], p["queries"]),
        mean(p["wait_time"], p["waits"]),
        rate(p["client_parses"]),
        rate(p["server_parses"]),
        rate(p["binds"]),
    ]


def _stamp(wall: float) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall)) if wall else None


def _id_number(conn_id: str) -> int:
    return int(conn_id.split("-", 1)[1])


def show(what: str, snapshots: list[dict[str, Any]], config: Config) -> Result | None:
    """The columns and rows of SHOW `what` (lower case); None for a command there is not."""
    pools = merged_pools(snapshots)
    legacy = config.general.admin_legacy_columns
    if what == "pools":
        rows = [
            [
                p["database"],
                p["user"],
                p["cl_active"],
                p["cl_waiting"],
                0,
                0,
                p["sv_active"],
                0,
                0,
                p["sv_idle"],
                p["sv_used"],
                p["sv_tested"],
                p["sv_login"],
                int(p["maxwait"]),
                int(p["maxwait"] % 1 * _US),
                p["mode"],
                None,
                p["cl_pinned"],
            ]
            for p in pools
        ]
        return c.POOLS + POOLS_EXTRA, rows
    if what in ("stats", "stats_totals", "stats_averages"):
        rows = []
        for db, d in _by_database(pools).items():
            totals, averages = _total_values(d["totals"]), _average_values(d["period"], d["period_seconds"])
            if what == "stats":
                rows.append([db, *totals, *averages] + ([d["totals"]["queries"]] if legacy else []))
            else:
                rows.append([db, *(totals if what == "stats_totals" else averages)])
        if what == "stats":
            return c.STATS + (LEGACY_STATS if legacy else ()), rows
        return (c.STATS_TOTALS if what == "stats_totals" else c.STATS_AVERAGES), rows
    if what == "totals":
        merged = _by_database(
            [
                {
                    "database": "",
                    "totals": p["totals"],
                    "period": p["period"],
                    "period_seconds": p["period_seconds"],
                }
                for p in pools
            ]
        ).get("")
        totals = _total_values(merged["totals"]) if merged else [0] * 11
        averages = _average_values(merged["period"], merged["period_seconds"]) if merged else [0] * 11
        return c.TOTALS, [[name, value] for name, value in zip(c.TOTALS_ROWS, totals + averages, strict=True)]
    if what == "clients":
        rows = []
        for snap in snapshots:
            for r in snap.get("client_rows", ()):
                state = r["state"]
                if state == "active" and not r["link"]:
                    state = "idle"
                wait = r["wait"]
                rows.append(
                    [
                        "C",
                        r["user"],
                        r["database"],
                        "none",
                        state,
                        r["addr"],
                        r["port"],
                        r["local_addr"],
                        r["local_port"],
                        _stamp(r["connect_time"]),
                        _stamp(r["request_time"]),
                        int(wait),
                        int(wait % 1 * _US),
                        0,
                        r["id"],
                        r["link"],
                        r["remote_pid"],
                        r.get("tls"),
                        r["application_name"],
                        r["prepared_statements"],
                        _id_number(r["id"]),
                    ]
                )
        return c.CLIENTS, rows
    if what == "servers":
        rows = []
        for snap in snapshots:
            for r in snap.get("server_rows", ()):
                rows.append(
                    [
                        "S",
                        r["user"],
                        r["database"],
                        "none",
                        r["state"],
                        r["addr"],
                        r["port"],
                        r["local_addr"],
                        r["local_port"],
                        _stamp(r["connect_time"]),
                        _stamp(r["request_time"]),
                        0,
                        0,
                        int(r["close_needed"]),
                        r["id"],
                        r["link"],
                        r["remote_pid"],
                        r.get("tls"),
                        r["application_name"],
                        r["prepared_statements"],
                        _id_number(r["id"]),
                    ]
                )
        return c.SERVERS, rows
    if what == "databases":
        return _databases(pools, snapshots, config, legacy)
    if what == "users":
        users: dict[str, list[int]] = {}
        for p in pools:
            counts = users.setdefault(p["user"], [0, 0])
            counts[0] += p["sv_active"] + p["sv_idle"] + p["sv_used"] + p["sv_tested"] + p["sv_login"]
            counts[1] += p["cl_active"] + p["cl_waiting"]
        sizes = {u.username: u for pool in config.pools.values() for u in pool.users.values()}
        rows = [
            [
                name,
                f"{sizes[name].pool_size:9d}" if name in sizes else "",
                "",
                sizes[name].pool_mode if name in sizes else None,
                0,
                servers,
                0,
                clients,
            ]
            for name, (servers, clients) in users.items()
        ]
        return c.USERS, rows
    if what == "config":
        return c.CONFIG, config_rows(config)
    if what == "version":
        return c.VERSION, [[VERSION]]
    if what == "lists":
        clients = sum(s["clients"] for s in snapshots)
        login = sum(s["logging_in"] for s in snapshots)
        used_servers = sum(p["sv_active"] + p["sv_tested"] + p["sv_login"] for p in pools)
        free_servers = sum(p["sv_idle"] + p["sv_used"] for p in pools)
        values = {
            "databases": len(config.pools),
            "users": len({p["user"] for p in pools}),
            "peers": 0,
            "pools": len(pools),
            "peer_pools": 0,
            "free_clients": 0,
            "used_clients": clients - login,
            "login_clients": login,
            "free_servers": free_servers,
            "used_servers": used_servers,
        }
        return c.LISTS, [[name, values.get(name, 0)] for name in c.LISTS_ROWS]
    if what == "state":
        paused = any(s["paused"] for s in snapshots)
        down = any(s["shutting_down"] for s in snapshots)
        return c.STATE, [
            ["active", "no" if paused or down else "yes"],
            ["paused", "yes" if paused else "no"],
            ["suspended", "no"],
        ]
    if what == "mem":
        return c.MEM, _mem(snapshots)
    if what == "prepared_statements":
        rows = []
        for snap in snapshots:
            for r in snap.get("prepared", ()):
                rows.append(
                    [
                        r["database"],
                        r["user"],
                        r["server_name"],
                        r["query"],
                        r["uses"],
                        r["clients"],
                        ",".join(r["servers"]),
                    ]
                )
        return PREPARED_STATEMENTS, _merge_prepared(rows)
    if what == "workers":
        now = time.time()
        rows = [
            [
                s["worker"],
                s["pid"],
                s["clients"],
                s["servers"],
                int(now - s["started"]),
                f"{s['cpu']:.2f}",
                s["rss"],
            ]
            for s in sorted(snapshots, key=lambda s: s["worker"])
        ]
        return WORKERS, rows
    if what == "latency":
        rows = []
        for p in pools:
            last = p["period"] or {}
            for metric in ("xact", "query", "wait"):
                hist = last.get(f"{metric}_hist") or [0]
                rows.append(
                    [
                        p["database"],
                        p["user"],
                        metric,
                        sum(hist),
                        *(round(percentile(hist, q) * _US) for q in (0.5, 0.9, 0.99)),
                        round(p["maxima"].get(metric, 0.0) * _US),
                    ]
                )
        return LATENCY, rows
    return None


def _merge_prepared(rows: list[Row]) -> list[Row]:
    """Statements of one pool are the same statement in every worker only by their text: merge by it."""
    out: dict[tuple[str, str, str], Row] = {}
    for row in rows:
        key = (row[0], row[1], row[3])
        have = out.get(key)
        if have is None:
            out[key] = row
        else:
            have[2] = f"{have[2]},{row[2]}"
            have[4] += row[4]
            have[5] += row[5]
            have[6] = ",".join(x for x in (have[6], row[6]) if x)
    return list(out.values())


def _databases(
    pools: list[dict[str, Any]], snapshots: list[dict[str, Any]], config: Config, legacy: bool
) -> Result:
    paused = {db for s in snapshots for db in s["paused"]}
    disabled = {db for s in snapshots for db in s["disabled"]}
    rows = []
    for name, pool_cfg in config.pools.items():
        mine = [p for p in pools if p["database"] == name]
        users = list(pool_cfg.users.values())
        servers = sum(
            p["sv_active"] + p["sv_idle"] + p["sv_used"] + p["sv_tested"] + p["sv_login"] for p in mine
        )
        clients = sum(p["cl_active"] + p["cl_waiting"] for p in mine)
        size = max((u.pool_size for u in users), default=0)
        row = [
            name,
            pool_cfg.server_host,
            pool_cfg.server_port,
            pool_cfg.server_database,
            users[0].server_username
            if len(users) == 1 and users[0].server_username != users[0].username
            else None,
            size,
            max((u.min_pool_size for u in users), default=0),
            0,
            int(pool_cfg.server_lifetime),
            pool_cfg.pool_mode,
            None,
            0,
            servers,
            0,
            clients,
            int("" in paused or name in paused),
            int(name in disabled),
        ]
        rows.append(row + ([0] if legacy else []))
    return c.DATABASES + (LEGACY_DATABASES if legacy else ()), rows


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


_DURATIONS = frozenset(f.name for f in fields(GeneralConfig) if f.type == "float")


def config_rows(config: Config) -> list[Row]:
    """SHOW CONFIG: each [general] key (secrets hidden), its value and default, and whether a
    RELOAD or SET changes it at run time."""
    default = GeneralConfig()
    rows = []
    for f in sorted(fields(GeneralConfig), key=lambda f: f.name):
        value, dflt = getattr(config.general, f.name), getattr(default, f.name)
        if f.name == "admin_password":
            value = "********" if value else ""
        if f.name in _DURATIONS:
            value, dflt = format_duration(value), format_duration(dflt)
        elif f.name in SIZE_KEYS:
            value, dflt = format_size(value), format_size(dflt)
        rows.append([f.name, _text(value), _text(dflt), "no" if f.name in RESTART_KEYS else "yes"])
    return rows


def _mem(snapshots: list[dict[str, Any]]) -> list[Row]:
    """SHOW MEM: pgdoorman has no slabs; it reports what it holds in PgBouncer's layout: clients,
    servers and prepared statements (counts; sizes are estimates). SHOW WORKERS has each RSS."""
    clients = sum(s["clients"] for s in snapshots)
    servers = sum(s["servers"] for s in snapshots)
    statements = sum(p["prepared_stats"]["statements"] for s in snapshots for p in s["pools"])
    # Bytes held for messages in flight (max_memory_usage), summed over workers; the peak is the
    # sum of each worker's own peak (an upper bound of the pooler's).
    used, peak, limit, refused = (sum(s.get("memory", (0, 0, 0, 0))[i] for s in snapshots) for i in range(4))
    return [
        ["messages_in_flight", 1, used, max(0, limit - used) if limit else 0, used],
        ["messages_in_flight_peak", 1, peak, 0, peak],
        ["messages_refused_for_memory", 1, refused, 0, 0],
        ["client_cache", 1024, clients, 0, 1024 * clients],
        ["server_cache", 2048, servers, 0, 2048 * servers],
        ["server_prepared_statement_cache", 256, statements, 0, 256 * statements],
    ]
