"""Typed, immutable configuration objects produced by the loader.

Field defaults here are the single source of truth for [general] defaults: the loader falls back to
them for keys a file leaves out. Durations are float seconds; 0 means "disabled / never".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POOL_MODES = ("session", "transaction", "statement")
# What to do with a client whose session holds state that cannot move (frontend/pins.py).
PIN_POLICIES = ("pin", "refuse")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# TLS towards clients (PgBouncer's client_tls_sslmode): verify-* ask for a client certificate.
TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# TLS towards servers (libpq's sslmode, without allow: "prefer" is what libpq and PgBouncer default to)
SERVER_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
CHANNEL_BINDINGS = ("disable", "prefer", "require")
# Keys whose values are sizes in bytes (config/sizes.py: "1MB" or a number of bytes)
SIZE_KEYS = ("max_message_size", "message_size_to_be_stream", "max_memory_usage")
# Keys read only at start: a reload that changes them says they need a restart.
RESTART_KEYS = ("host", "port", "unix_socket_dir", "workers", "log_format", "pidfile")


class ConfigError(Exception):
    """A configuration problem; str() is `FILE:LINE: key: what is wrong`.

    The parts are also kept as attributes (None when not applicable, e.g. an unreadable file).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class UserConfig:
    username: str
    # "" = trust; plain text, "md5<32 hex>" or a SCRAM-SHA-256 verifier. Secrets stay out of repr/logs.
    password: str = field(repr=False)
    pool_size: int = 20
    min_pool_size: int = 0
    pool_mode: str = "transaction"  # resolved: user > pool > general
    server_username: str = ""  # resolved by the loader: defaults to username
    server_password: str | None = field(default=None, repr=False)


# PgBouncer's auth_query default (1.21+): an expired or NOLOGIN role has no password to match
DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                      "FROM pg_authid WHERE rolname = $1 AND rolcanlogin")


@dataclass(frozen=True, slots=True)
class AuthQueryConfig:
    """Users not in the config log in with the secret a query on the server returns for them
    (frontend/authquery.py): [pools.X.auth_query], or PgBouncer's auth_user + auth_query."""

    query: str = DEFAULT_AUTH_QUERY  # $1 is the user name, as a quoted literal
    user: str = ""  # the server role the lookup logs in as
    password: str = field(default="", repr=False)  # its password: plain text or md5 ("" = trust)
    database: str = ""  # resolved by the loader: defaults to the pool's server_database
    lookup_pool_size: int = 1  # server connections for lookups, per worker
    pool_size: int = 20  # servers of each looked-up user's pool (or of the server_user pool)
    cache_ttl: float = 300.0  # a found secret is used this long before it is looked up again
    negative_cache_ttl: float = 30.0  # an unknown user is not looked up again for this long
    # All looked-up users share one pool that logs in as server_user (with server_password);
    # "" = each user its own pool, logged in by pass-through with the user's own secret.
    server_user: str = ""
    server_password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str  # the client-facing database name
    server_host: str = "127.0.0.1"  # a path starting with "/" means a unix-socket directory
    server_port: int = 5432
    server_database: str = ""  # resolved by the loader: defaults to name
    pool_mode: str = "transaction"
    application_name: str = "pgdoorman"
    idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    query_wait_timeout: float = 5.0
    prepared_statements_cache_size: int = 8192
    server_reset_query: str = "DISCARD ALL"
    # Read the server's session settings after every transaction, not only after those whose
    # replies show a change (SET, RESET, DISCARD, DO): for set_config() inside functions.
    strict: bool = False
    pin_policy: str = "pin"
    connect_query: str = ""  # run on every new server connection before it is lent
    auth_query: AuthQueryConfig | None = None  # users not listed below: looked up on the server
    users: dict[str, UserConfig] = field(default_factory=dict)  # keyed by username


@dataclass(frozen=True, slots=True)
class GeneralConfig:
    host: tuple[str, ...] = ("127.0.0.1",)
    port: int = 6432
    unix_socket_dir: str = ""  # "" = no unix socket
    pidfile: str = ""  # written at start (and by an upgrade's successor); `pgdoorman upgrade` reads it
    pool_mode: str = "transaction"
    max_client_conn: int = 5000
    server_connect_timeout: float = 3.0
    query_wait_timeout: float = 5.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    client_login_timeout: float = 60.0
    client_idle_timeout: float = 0.0
    idle_transaction_timeout: float = 0.0
    server_reset_query: str = "DISCARD ALL"
    server_reset_query_always: bool = False
    strict: bool = False  # the default of each pool's `strict`
    pin_policy: str = "pin"  # the default of each pool's `pin_policy`
    server_check_delay: float = 30.0
    server_check_query: str = ";"  # "" = no check; ";" is an empty query (cheapest round trip)
    connect_query: str = ""  # the default of each pool's `connect_query`
    application_name: str = "pgdoorman"
    admin_username: str = "admin"
    admin_password: str = field(default="", repr=False)
    admin_users: tuple[str, ...] = ()  # pool users with full console rights
    stats_users: tuple[str, ...] = ()  # pool users who may only SHOW
    # SHOW STATS and SHOW DATABASES also carry total_requests / reserve_pool, the columns of
    # PgBouncer < 1.8 that exporters of that age read (Debian's prometheus-pgbouncer-exporter)
    admin_legacy_columns: bool = False
    stats_period: float = 60.0
    log_stats: bool = True
    shutdown_timeout: float = 30.0
    prepared_statements: bool = True
    prepared_statements_cache_size: int = 8192
    client_prepared_statements_cache_size: int = 0
    log_level: str = "info"
    log_format: str = "text"
    log_client_connections: bool = True
    log_client_disconnections: bool = True
    workers: int = 0  # worker processes; 0 = one per CPU core
    max_message_size: int = 0  # bytes; 0 = PostgreSQL's own limit (1 GB)
    # A message longer than this is relayed as it arrives, never held whole (client.py, server.py)
    message_size_to_be_stream: int = 1 << 20
    # Bytes held for messages in flight, all workers together (limits.MemoryBudget); 0 = no limit
    max_memory_usage: int = 256 << 20
    tcp_keepalive: bool = True
    # TCP options of every client and server socket (0 = the system's): keepalive probes notice a
    # dead idle peer, TCP_USER_TIMEOUT a peer that stopped acknowledging what was sent (pgdoorman/tcp.py)
    tcp_keepidle: float = 0.0
    tcp_keepintvl: float = 0.0
    tcp_keepcnt: int = 0
    tcp_user_timeout: float = 0.0
    # PgBouncer's: a query (a request owed a reply) running longer ends its client and its server;
    # a transaction open longer ends its client (PostgreSQL 17's transaction_timeout, 25P04)
    query_timeout: float = 0.0
    transaction_timeout: float = 0.0
    # After a failed server login, the next attempt of that pool waits this long (PgBouncer: 15s;
    # shorter here so a restarted PostgreSQL is served again within about a second)
    server_login_retry: float = 1.0
    # TLS towards clients (frontend/tls.py). Paths are as given or relative to the config file.
    tls_mode: str = "disable"
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_file: str = ""  # CAs client certificates are checked against
    tls_ciphers: str = ""  # "" = the ssl module's secure default list (TLS 1.3 suites are fixed)
    tls_protocols: str = "secure"  # "secure" = TLS 1.2 and 1.3; or "tlsv1.2", "tlsv1.3", "tlsv1.2,tlsv1.3"
    # TLS towards servers (backend/tls.py)
    server_tls_mode: str = "prefer"
    server_tls_ca_file: str = ""
    server_tls_certificate: str = ""  # a client certificate for mutual TLS
    server_tls_key: str = ""
    server_tls_protocols: str = "secure"
    server_channel_binding: str = "prefer"  # SCRAM-SHA-256-PLUS towards servers when on TLS
    # Access rules in pg_hba.conf format (auth/hba.py): a file, or the same text inline
    hba_file: str = ""
    hba: str = ""
    # JWT logins (auth/jwt.py): a user whose password is "jwt-pkey-fpath:/path/public.pem"
    jwt_claim: str = "sub"  # the claim that must equal the user name
    jwt_leeway: float = 30.0  # clock skew allowed on exp, nbf and iat
    jwt_audience: str = ""  # "" = tokens with an aud claim are refused; else aud must hold this
    jwt_allow_cleartext: bool = False  # a token is a bearer credential: TLS only unless allowed
    # Limits (0 = none): clients per user and per database over all workers, servers per database
    max_user_client_connections: int = 0
    max_db_client_connections: int = 0
    max_db_connections: int = 0
    # Failed logins from one address wait this long before their error, doubling per failure up to
    # the max; a success, or a quiet minute, forgets them. 0 = no delay.
    auth_failure_delay: float = 0.1
    auth_failure_delay_max: float = 5.0
    # PgBouncer's form of auth_query, the default of every pool: auth_user (its password from a
    # pool's users) runs auth_query in auth_dbname ("" = the pool's own server database)
    auth_user: str = ""
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_dbname: str = ""


@dataclass(frozen=True, slots=True)
class PrometheusConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9127  # pgbouncer_exporter's port


@dataclass(frozen=True, slots=True)
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    pools: dict[str, PoolConfig] = field(default_factory=dict)  # keyed by pool (database) name
    path: str = "<config>"
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    text: str = field(default="", repr=False, compare=False)  # the TOML it came from (reload, SET)
    # The parsed hba rules of general.hba_file / general.hba (auth/hba.py HbaRules), None: none
    hba_rules: Any = field(default=None, repr=False, compare=False)
