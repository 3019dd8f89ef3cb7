"""Column layouts of PgBouncer's admin console SHOW commands.

The console of pgdoorman answers PgBouncer's ``SHOW`` commands so that exporters written for PgBouncer
(prometheus-community's pgbouncer_exporter and others) work against it unchanged. This module is the
single place that says which columns each command returns, in which order, and with which type OID in
the RowDescription. It holds data only; no behaviour.

Source of truth: PgBouncer 1.25 (``src/admin.c`` and ``src/stats.c`` of pgbouncer/pgbouncer, the
``pktbuf_write_RowDescription`` calls; ``doc/usage.md`` for meanings). PgBouncer maps its format letters
to type OIDs like this: ``s`` -> text, ``i`` -> int4, ``q`` -> int8, ``N`` -> numeric, ``T`` (a
timestamp) -> text (sent as e.g. ``2025-11-09 12:00:00 UTC``), ``b`` -> bytea. Every value is sent in
text format; a NULL is sent where PgBouncer has no value (e.g. ``force_user`` when unset).

``PGBOUNCER_1_18_COLUMNS`` records what the Debian PgBouncer 1.18 binary really sends (captured from its
RowDescriptions); it is there for tests that compare against that reference binary, not for serving.
"""

from __future__ import annotations

Columns = tuple[tuple[str, int], ...]

# PostgreSQL type OIDs (pg_type.oid).
BOOL = 16
BYTEA = 17
INT8 = 20
INT4 = 23
TEXT = 25
NUMERIC = 1700
TIMESTAMPTZ = 1184  # not used by PgBouncer: its timestamps are text

# ---------------------------------------------------------------------------------------------------
# PgBouncer 1.25
# ---------------------------------------------------------------------------------------------------

# SHOW POOLS: one row per (database, user) pool. admin.c format "ssiiiiiiiiiiiiiss".
# load_balance_hosts is NULL unless the database's host is a comma-separated list.
POOLS: Columns = (
    ("database", TEXT),
    ("user", TEXT),
    ("cl_active", INT4),
    ("cl_waiting", INT4),
    ("cl_active_cancel_req", INT4),
    ("cl_waiting_cancel_req", INT4),
    ("sv_active", INT4),
    ("sv_active_cancel", INT4),
    ("sv_being_canceled", INT4),
    ("sv_idle", INT4),
    ("sv_used", INT4),
    ("sv_tested", INT4),
    ("sv_login", INT4),
    ("maxwait", INT4),
    ("maxwait_us", INT4),
    ("pool_mode", TEXT),
    ("load_balance_hosts", TEXT),
)

# SHOW STATS: one row per database. stats.c format "s" + 22 x "N".
STATS: Columns = (
    ("database", TEXT),
    ("total_server_assignment_count", NUMERIC),
    ("total_xact_count", NUMERIC),
    ("total_query_count", NUMERIC),
    ("total_received", NUMERIC),
    ("total_sent", NUMERIC),
    ("total_xact_time", NUMERIC),
    ("total_query_time", NUMERIC),
    ("total_wait_time", NUMERIC),
    ("total_client_parse_count", NUMERIC),
    ("total_server_parse_count", NUMERIC),
    ("total_bind_count", NUMERIC),
    ("avg_server_assignment_count", NUMERIC),
    ("avg_xact_count", NUMERIC),
    ("avg_query_count", NUMERIC),
    ("avg_recv", NUMERIC),
    ("avg_sent", NUMERIC),
    ("avg_xact_time", NUMERIC),
    ("avg_query_time", NUMERIC),
    ("avg_wait_time", NUMERIC),
    ("avg_client_parse_count", NUMERIC),
    ("avg_server_parse_count", NUMERIC),
    ("avg_bind_count", NUMERIC),
)

# SHOW STATS_TOTALS: the total_* half of SHOW STATS, without the prefix, and with total_received/sent
# renamed bytes_received/bytes_sent. stats.c format "s" + 11 x "N".
STATS_TOTALS: Columns = (
    ("database", TEXT),
    ("server_assignment_count", NUMERIC),
    ("xact_count", NUMERIC),
    ("query_count", NUMERIC),
    ("bytes_received", NUMERIC),
    ("bytes_sent", NUMERIC),
    ("xact_time", NUMERIC),
    ("query_time", NUMERIC),
    ("wait_time", NUMERIC),
    ("client_parse_count", NUMERIC),
    ("server_parse_count", NUMERIC),
    ("bind_count", NUMERIC),
)

# SHOW STATS_AVERAGES: the avg_* half of SHOW STATS. Note PgBouncer's own quirk: the prepared-statement
# columns keep their avg_ prefix while the others drop it.
STATS_AVERAGES: Columns = (
    ("database", TEXT),
    ("server_assignment_count", NUMERIC),
    ("xact_count", NUMERIC),
    ("query_count", NUMERIC),
    ("bytes_received", NUMERIC),
    ("bytes_sent", NUMERIC),
    ("xact_time", NUMERIC),
    ("query_time", NUMERIC),
    ("wait_time", NUMERIC),
    ("avg_client_parse_count", NUMERIC),
    ("avg_server_parse_count", NUMERIC),
    ("avg_bind_count", NUMERIC),
)

# SHOW TOTALS: SHOW STATS summed over all databases, as (name, value) rows; see TOTALS_ROWS.
TOTALS: Columns = (
    ("name", TEXT),
    ("value", NUMERIC),
)

# The name column of SHOW TOTALS, in order. These come from the C struct field names
# ("total_" / "avg_" + field), hence client_bytes/server_bytes and the ps_ prefix.
TOTALS_ROWS: tuple[str, ...] = (
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_client_bytes",
    "total_server_bytes",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_ps_client_parse_count",
    "total_ps_server_parse_count",
    "total_ps_bind_count",
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_client_bytes",
    "avg_server_bytes",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_ps_client_parse_count",
    "avg_ps_server_parse_count",
    "avg_ps_bind_count",
)

# SHOW CLIENTS and SHOW SERVERS share one header (admin.c SKF_STD "ssssssisiTTiiississii").
# type is "C" or "S"; replication is none/logical/physical; connect_time/request_time are text
# timestamps; ptr/link are text; link is "" when unpaired; id is the unique socket id (int4 on the wire).
_SOCKET_COLUMNS: Columns = (
    ("type", TEXT),
    ("user", TEXT),
    ("database", TEXT),
    ("replication", TEXT),
    ("state", TEXT),
    ("addr", TEXT),
    ("port", INT4),
    ("local_addr", TEXT),
    ("local_port", INT4),
    ("connect_time", TEXT),
    ("request_time", TEXT),
    ("wait", INT4),
    ("wait_us", INT4),
    ("close_needed", INT4),
    ("ptr", TEXT),
    ("link", TEXT),
    ("remote_pid", INT4),
    ("tls", TEXT),
    ("application_name", TEXT),
    ("prepared_statements", INT4),
    ("id", INT4),
)
CLIENTS: Columns = _SOCKET_COLUMNS
SERVERS: Columns = _SOCKET_COLUMNS

# State values PgBouncer 1.25 puts in the state column, in the order it lists the sockets.
# (Clients: "active" is reported as "idle" when the client has no server linked.)
CLIENT_STATES: tuple[str, ...] = ("active", "idle", "waiting", "active_cancel_req", "waiting_cancel_req")
SERVER_STATES: tuple[str, ...] = (
    "active",
    "idle",
    "used",
    "tested",
    "new",
    "active_cancel",
    "being_canceled",
)

# SHOW SOCKETS / ACTIVE_SOCKETS: the socket header plus debug columns (SKF_DBG).
SOCKETS: Columns = _SOCKET_COLUMNS + (
    ("recv_pos", INT4),
    ("pkt_pos", INT4),
    ("pkt_remain", INT4),
    ("send_pos", INT4),
    ("send_remain", INT4),
    ("pkt_avail", INT4),
    ("send_avail", INT4),
)

# SHOW DATABASES: admin.c format "ssissiiiissiiiiii". "database" is the real server-side dbname,
# "name" the configured entry. force_user, pool_mode (NULL = inherits the global one) and
# load_balance_hosts (NULL unless host lists several) may be NULL. 1.24 renamed reserve_pool.
DATABASES: Columns = (
    ("name", TEXT),
    ("host", TEXT),
    ("port", INT4),
    ("database", TEXT),
    ("force_user", TEXT),
    ("pool_size", INT4),
    ("min_pool_size", INT4),
    ("reserve_pool_size", INT4),
    ("server_lifetime", INT4),
    ("pool_mode", TEXT),
    ("load_balance_hosts", TEXT),
    ("max_connections", INT4),
    ("current_connections", INT4),
    ("max_client_connections", INT4),
    ("current_client_connections", INT4),
    ("paused", INT4),
    ("disabled", INT4),
)

# SHOW USERS: admin.c format "ssssiiii". pool_size and reserve_pool_size are *text*: "" when the user
# has no override, else the number printed with "%9d" (right-aligned, width 9). pool_mode is NULL when
# not overridden.
USERS: Columns = (
    ("name", TEXT),
    ("pool_size", TEXT),
    ("reserve_pool_size", TEXT),
    ("pool_mode", TEXT),
    ("max_user_connections", INT4),
    ("current_connections", INT4),
    ("max_user_client_connections", INT4),
    ("current_client_connections", INT4),
)

# SHOW CONFIG: one row per setting, sorted by key. value/default are text (NULL where unset, e.g.
# auth_user); changeable is the text "yes" or "no".
CONFIG: Columns = (
    ("key", TEXT),
    ("value", TEXT),
    ("default", TEXT),
    ("changeable", TEXT),
)

# SHOW VERSION: one row, e.g. "PgBouncer 1.25.0" (PACKAGE_STRING).
VERSION: Columns = (("version", TEXT),)

# SHOW LISTS: (list, items) rows, names in LISTS_ROWS order.
LISTS: Columns = (
    ("list", TEXT),
    ("items", INT4),
)
LISTS_ROWS: tuple[str, ...] = (
    "databases",
    "users",
    "peers",
    "pools",
    "peer_pools",
    "free_clients",
    "used_clients",
    "login_clients",
    "free_servers",
    "used_servers",
    "dns_names",
    "dns_zones",
    "dns_queries",
    "dns_pending",
)

# SHOW STATE (new in 1.23): (key, value) rows; each value is "yes" or "no".
STATE: Columns = (
    ("key", TEXT),
    ("value", TEXT),
)
STATE_KEYS: tuple[str, ...] = ("active", "paused", "suspended")

# SHOW MEM: one row per slab allocator: name, object size in bytes, objects in use, free objects kept,
# and memtotal = size * (used + free). Rows come in slab creation order; PgBouncer 1.25's slabs are
# MEM_ROWS. A pooler without slabs may report its own object kinds in the same layout.
MEM: Columns = (
    ("name", TEXT),
    ("size", INT4),
    ("used", INT4),
    ("free", INT4),
    ("memtotal", INT4),
)
MEM_ROWS: tuple[str, ...] = (
    "user_cache",
    "credentials_cache",
    "db_cache",
    "peer_cache",
    "peer_pool_cache",
    "pool_cache",
    "outstanding_request_cache",
    "server_cache",
    "client_cache",
    "iobuf_cache",
    "var_list_cache",
    "server_prepared_statement_cache",
)

# Other SHOW commands of 1.25 that no exporter discussed here reads (kept for completeness).
PEERS: Columns = (("peer_id", INT4), ("host", TEXT), ("port", INT4), ("pool_size", INT4))
PEER_POOLS: Columns = (
    ("peer_id", INT4),
    ("cl_active_cancel_req", INT4),
    ("cl_waiting_cancel_req", INT4),
    ("sv_active_cancel", INT4),
    ("sv_login", INT4),
)
DNS_HOSTS: Columns = (("hostname", TEXT), ("ttl", INT8), ("addrs", TEXT))
DNS_ZONES: Columns = (("zonename", TEXT), ("serial", INT8), ("count", INT4))

# The commands named by the SHOW word, lower-case, as PgBouncer matches them case-insensitively.
SHOW_COLUMNS: dict[str, Columns] = {
    "pools": POOLS,
    "stats": STATS,
    "stats_totals": STATS_TOTALS,
    "stats_averages": STATS_AVERAGES,
    "totals": TOTALS,
    "clients": CLIENTS,
    "servers": SERVERS,
    "databases": DATABASES,
    "users": USERS,
    "config": CONFIG,
    "version": VERSION,
    "lists": LISTS,
    "state": STATE,
    "mem": MEM,
}

OTHER_SHOW_COLUMNS: dict[str, Columns] = {
    "sockets": SOCKETS,
    "active_sockets": SOCKETS,
    "peers": PEERS,
    "peer_pools": PEER_POOLS,
    "dns_hosts": DNS_HOSTS,
    "dns_zones": DNS_ZONES,
}

# SHOW <param> (and SELECT <param>) that PgBouncer answers with a fake one-column, one-row result named
# after the parameter; any other name is an unknown command.
FAKE_PARAMS: dict[str, str] = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}

# ---------------------------------------------------------------------------------------------------
# PgBouncer 1.18 (Debian bookworm's /usr/sbin/pgbouncer), as captured from its RowDescriptions.
# ---------------------------------------------------------------------------------------------------

_SOCKET_COLUMNS_1_18: Columns = tuple(
    c for c in _SOCKET_COLUMNS if c[0] not in ("replication", "prepared_statements", "id")
)

PGBOUNCER_1_18_COLUMNS: dict[str, Columns] = {
    "pools": POOLS[:-1],
    "stats": (
        ("database", TEXT),
        ("total_xact_count", NUMERIC),
        ("total_query_count", NUMERIC),
        ("total_received", NUMERIC),
        ("total_sent", NUMERIC),
        ("total_xact_time", NUMERIC),
        ("total_query_time", NUMERIC),
        ("total_wait_time", NUMERIC),
        ("avg_xact_count", NUMERIC),
        ("avg_query_count", NUMERIC),
        ("avg_recv", NUMERIC),
        ("avg_sent", NUMERIC),
        ("avg_xact_time", NUMERIC),
        ("avg_query_time", NUMERIC),
        ("avg_wait_time", NUMERIC),
    ),
    "stats_totals": (("database", TEXT),) + STATS_TOTALS[2:9],
    "stats_averages": (("database", TEXT),) + STATS_AVERAGES[2:9],
    "totals": TOTALS,
    "clients": _SOCKET_COLUMNS_1_18,
    "servers": _SOCKET_COLUMNS_1_18,
    "databases": (
        ("name", TEXT),
        ("host", TEXT),
        ("port", INT4),
        ("database", TEXT),
        ("force_user", TEXT),
        ("pool_size", INT4),
        ("min_pool_size", INT4),
        ("reserve_pool", INT4),
        ("pool_mode", TEXT),
        ("max_connections", INT4),
        ("current_connections", INT4),
        ("paused", INT4),
        ("disabled", INT4),
    ),
    "users": (("name", TEXT), ("pool_mode", TEXT)),
    "config": CONFIG,
    "version": VERSION,
    "lists": LISTS,
    "mem": MEM,
}

PGBOUNCER_1_18_TOTALS_ROWS: tuple[str, ...] = (
    "total_xact_count",
    "total_query_count",
    "total_client_bytes",
    "total_server_bytes",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "avg_xact_count",
    "avg_query_count",
    "avg_client_bytes",
    "avg_server_bytes",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
)
PGBOUNCER_1_18_LISTS_ROWS: tuple[str, ...] = tuple(n for n in LISTS_ROWS if n not in ("peers", "peer_pools"))
PGBOUNCER_1_18_MEM_ROWS: tuple[str, ...] = (
    "user_cache",
    "db_cache",
    "pool_cache",
    "server_cache",
    "client_cache",
    "iobuf_cache",
)
