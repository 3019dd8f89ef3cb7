"""Parse and validate TOML into the typed schema; every error names FILE:LINE: key."""

from __future__ import annotations

import base64
import datetime
import difflib
import importlib.resources
import re
import tomllib
from dataclasses import fields, replace
from typing import Any

from .durations import parse_duration
from .locate import LineIndex, Path
from .schema import (
    CHANNEL_BINDINGS,
    LOG_FORMATS,
    LOG_LEVELS,
    PIN_POLICIES,
    POOL_MODES,
    SERVER_TLS_MODES,
    TLS_MODES,
    AuthQueryConfig,
    Config,
    ConfigError,
    GeneralConfig,
    PoolConfig,
    PrometheusConfig,
    UserConfig,
)
from .sizes import parse_size
from .tlsfiles import check_ca, check_pair, parse_protocols, resolve

_GENERAL_KEYS = tuple(f.name for f in fields(GeneralConfig))
# auth_user / auth_dbname: PgBouncer's form of auth_query, resolved into PoolConfig.auth_query
_POOL_KEYS = (*(f.name for f in fields(PoolConfig) if f.name != "name"), "auth_user", "auth_dbname")
_AUTH_QUERY_KEYS = tuple(f.name for f in fields(AuthQueryConfig))
_USER_KEYS = tuple(f.name for f in fields(UserConfig))
_PROMETHEUS_KEYS = tuple(f.name for f in fields(PrometheusConfig))
_MD5 = re.compile(r"md5[0-9a-fA-F]{32}")
_B64 = r"((?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?)"
_SCRAM = re.compile(rf"SCRAM-SHA-256\$([0-9]{{1,10}}):{_B64}\${_B64}:{_B64}")
_REQUIRED: Any = object()
MAX_WORKERS = 64
_POOL_DEFAULTS = PoolConfig(name="")  # slotted dataclasses keep no class-level defaults
_AUTH_QUERY_DEFAULTS = AuthQueryConfig()


def _type_name(v: object) -> str:
    # TOML's names, not Python's; bool first because it is an int subclass, datetime before date.
    for t, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "float"),
        (str, "string"),
        (list, "array"),
        (dict, "table"),
        (datetime.datetime, "datetime"),
        (datetime.date, "date"),
        (datetime.time, "time"),
    ):
        if isinstance(v, t):
            return name
    return type(v).__name__


class _Table:
    """One TOML table being read: typed getters that raise ConfigError pointing at the offending key."""

    def __init__(self, lines: LineIndex, file: str, path: Path, data: dict[str, Any],
                 known: tuple[str, ...] | None) -> None:
        self.lines, self.file, self.path, self.data = lines, file, path, data
        if known is not None:  # unknown keys first: a typo explains a "missing" key better than the miss
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise self.error(key, f"unknown key{hint}")

    def error(self, key: str | Path | None, what: str) -> ConfigError:
        """Error at this table (key None), one of its keys, or a path below it such as ("host", "1")."""
        path = (*self.path, *((key,) if isinstance(key, str) else key or ()))
        line = self.lines.line_of(path)
        dotted = ".".join(path)
        return ConfigError(f"{self.file}:{line}: {dotted}: {what}", path=self.file, line=line, key=dotted,
                           reason=what)

    def _get(self, key: str, default: Any, kind: type | tuple[type, ...], kind_name: str) -> Any:
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "missing required key")
            return default
        v = self.data[key]
        if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):  # bool is an int subclass
            raise self.error(key, f"expected {kind_name}, got {_type_name(v)}")
        return v

    def table(self, key: str, known: tuple[str, ...] | None) -> _Table:
        return _Table(self.lines, self.file, (*self.path, key), self._get(key, {}, dict, "table"), known)

    def string(self, key: str, default: str = _REQUIRED, *, nonempty: bool = False) -> str:
        v: str = self._get(key, default, str, "string")
        if nonempty and not v:
            raise self.error(key, "must not be empty")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v: bool = self._get(key, default, bool, "boolean")
        return v

    def integer(self, key: str, default: int, lo: int = 0, hi: int | None = None) -> int:
        v: int = self._get(key, default, int, "integer")
        if hi is not None and not lo <= v <= hi:
            raise self.error(key, f"must be between {lo} and {hi}, got {v}")
        if v < lo:
            raise self.error(key, f"must be at least {lo}, got {v}")
        return v

    def enum(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        v = self.string(key, default)
        if v not in allowed:
            raise self.error(key, f"invalid value {v!r} (expected one of: {', '.join(allowed)})")
        return v

    def duration(self, key: str, default: float) -> float:
        if key not in self.data:
            return default
        v = self._get(key, default, (int, float, str), "duration (milliseconds or a string like '5s')")
        try:
            return parse_duration(v)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def size(self, key: str, default: int) -> int:
        if key not in self.data:
            return default
        v = self._get(key, default, (int, str), "size (bytes or a string like '1MB')")
        try:
            return parse_size(v)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def names(self, key: str) -> tuple[str, ...]:
        """A list of user names: an array of strings, or one comma-separated string (PgBouncer's)."""
        v = self._get(key, (), (str, list), "array of strings or a comma-separated string")
        items = [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)
        for i, name in enumerate(items):
            if not isinstance(name, str):
                raise self.error((key, str(i)), f"expected string, got {_type_name(name)}")
        return tuple(name for name in items if name)

    def hosts(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self._get(key, default, (str, list), "string or array of strings")
        items = [v] if isinstance(v, str) else list(v)
        if not items:
            raise self.error(key, "must not be empty")
        for i, h in enumerate(items):
            where = key if isinstance(v, str) else (key, str(i))
            if not isinstance(h, str):
                raise self.error(where, f"expected string, got {_type_name(h)}")
            if not h:
                raise self.error(where, "must not be empty")
        return tuple(items)


def _password_problem(pw: str, *, server: bool) -> str | None:
    """Why `pw` is not a usable password, or None. Like PostgreSQL, only "md5" + 32 hex digits is a
    hash: any other text starting with "md5" is a plain password."""
    if pw.startswith("SCRAM-SHA-256$"):
        if server:
            return "a SCRAM verifier cannot log in to the server; give the plain text password"
        m = _SCRAM.fullmatch(pw)  # the regex admits only well-formed base64, so decoding cannot fail
        if (m is None or not 1 <= int(m[1]) <= 2**31 - 1 or not m[2]  # PostgreSQL keeps it in an int
                or len(base64.b64decode(m[3])) != 32 or len(base64.b64decode(m[4])) != 32):
            return ("invalid SCRAM verifier (expected "
                    "'SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>')")
    return None


def _md5_lower(pw: str) -> str:
    # MD5 hashes are compared as lowercase hex, the way PostgreSQL stores them.
    return pw.lower() if _MD5.fullmatch(pw) else pw


def _user(users: _Table, key: str, pool_mode: str, seen: dict[str, str]) -> UserConfig:
    """One [pools.X.users.KEY] entry; `seen` maps usernames already defined in this pool to their entry."""
    u = users.table(key, _USER_KEYS)
    username = u.string("username", nonempty=True)
    if username in seen:
        raise u.error("username", f"duplicate username {username!r} (already in "
                                  f"{'.'.join(users.path)}.{seen[username]})")
    seen[username] = key
    password = u.string("password")
    if (problem := _password_problem(password, server=False)) is not None:
        raise u.error("password", problem)
    pool_size = u.integer("pool_size", 20, lo=1)
    min_pool_size = u.integer("min_pool_size", 0)
    if min_pool_size > pool_size:
        raise u.error("min_pool_size", f"must not exceed pool_size ({pool_size}), got {min_pool_size}")
    pool_mode = u.enum("pool_mode", pool_mode, POOL_MODES)
    server_username = u.string("server_username", username, nonempty=True)
    server_password: str | None = None
    if "server_password" in u.data:
        server_password = u.string("server_password")
        if (problem := _password_problem(server_password, server=True)) is not None:
            raise u.error("server_password", problem)
    elif server_username != username and (_MD5.fullmatch(password) or password.startswith("SCRAM-SHA-256$")):
        # an md5 hash is salted with its own user name, and pass-through proves the client's own
        # role: neither can log in as another role
        raise u.error("server_username", f"logging in as {server_username!r} needs server_password: the "
                                         f"password of {username!r} is a hash, which only logs in as itself")
    return UserConfig(
        username=username,
        password=_md5_lower(password),
        pool_size=pool_size,
        min_pool_size=min_pool_size,
        pool_mode=pool_mode,
        server_username=server_username,
        server_password=None if server_password is None else _md5_lower(server_password),
    )


def _pool(pools: _Table, name: str, g: GeneralConfig) -> PoolConfig:
    p = pools.table(name, _POOL_KEYS)
    if not name:
        raise p.error(None, "pool name must not be empty")
    pool = PoolConfig(
        name=name,
        server_host=p.string("server_host", _POOL_DEFAULTS.server_host, nonempty=True),
        server_port=p.integer("server_port", _POOL_DEFAULTS.server_port, lo=1, hi=65535),
        server_database=p.string("server_database", name, nonempty=True),
        pool_mode=p.enum("pool_mode", g.pool_mode, POOL_MODES),
        application_name=p.string("application_name", g.application_name),
        idle_timeout=p.duration("idle_timeout", g.server_idle_timeout),
        server_lifetime=p.duration("server_lifetime", g.server_lifetime),
        query_wait_timeout=p.duration("query_wait_timeout", g.query_wait_timeout),
        prepared_statements_cache_size=p.integer(
            "prepared_statements_cache_size", g.prepared_statements_cache_size),
        server_reset_query=p.string("server_reset_query", g.server_reset_query),
        strict=p.boolean("strict", g.strict),
        pin_policy=p.enum("pin_policy", g.pin_policy, PIN_POLICIES),
        connect_query=p.string("connect_query", g.connect_query),
        auth_query=_auth_query_table(p, name) if isinstance(p.data.get("auth_query"), dict) else None,
    )
    # Users come after the pool's own keys so errors surface in file order.
    users_table = p.table("users", None)  # entry names are free-form ("0", "1", ...)
    seen: dict[str, str] = {}
    for key in users_table.data:
        user = _user(users_table, key, pool.pool_mode, seen)
        pool.users[user.username] = user  # the dict is ours until parse_config returns
    return pool


def _auth_query_table(p: _Table, name: str) -> AuthQueryConfig:
    """PgDoorman's [pools.X.auth_query] table."""
    t = p.table("auth_query", _AUTH_QUERY_KEYS)
    d = _AUTH_QUERY_DEFAULTS
    for key in ("auth_user", "auth_dbname"):
        if key in p.data:
            raise p.error(key, "give auth_user/auth_dbname with an auth_query string (PgBouncer's form), "
                               "or user/database in the [auth_query] table, not both")
    out = AuthQueryConfig(
        query=_lookup_query(t, "query", t.string("query", d.query, nonempty=True)),
        user=t.string("user", nonempty=True),
        password=_server_secret(t, "password"),
        database=t.string("database", p.data.get("server_database", name) or name, nonempty=True),
        lookup_pool_size=t.integer("lookup_pool_size", d.lookup_pool_size, lo=1),
        pool_size=t.integer("pool_size", d.pool_size, lo=1),
        cache_ttl=t.duration("cache_ttl", d.cache_ttl),
        negative_cache_ttl=t.duration("negative_cache_ttl", d.negative_cache_ttl),
        server_user=t.string("server_user", d.server_user),
        server_password=_server_secret(t, "server_password"),
    )
    if out.server_password and not out.server_user:
        raise t.error("server_password", "needs server_user (the role every looked-up user logs in as)")
    return out


def _lookup_query(t: _Table, key: str, query: str) -> str:
    if "$1" not in query:
        raise t.error(key, "must contain $1 (where the user name goes)")
    return query


def _server_secret(t: _Table, key: str) -> str:
    secret = t.string(key, "")
    if (problem := _password_problem(secret, server=True)) is not None:
        raise t.error(key, problem)
    return _md5_lower(secret)


def _auth_queries(root: _Table, pools_table: _Table, pools: dict[str, PoolConfig],
                  g: GeneralConfig) -> dict[str, PoolConfig]:
    """PgBouncer's form: a pool's (or [general]'s) auth_user runs its auth_query; the auth user's
    password is its entry in that pool's users (or, failing that, in any pool's)."""
    out: dict[str, PoolConfig] = {}
    general = root.table("general", None)
    for name, pool in pools.items():
        p = pools_table.table(name, None)
        auth_user = p.data.get("auth_user", g.auth_user)
        if pool.auth_query is not None or not auth_user:
            if "auth_query" in p.data and pool.auth_query is None:
                raise p.error("auth_query", "needs auth_user (here or in [general])")
            out[name] = pool
            continue
        where = p if "auth_user" in p.data else general
        auth_user = where.string("auth_user", nonempty=True)
        owner = pool if auth_user in pool.users else next(
            (other for other in pools.values() if auth_user in other.users), None)
        if owner is None:
            raise where.error("auth_user", f"{auth_user!r} has no entry in any pool's users (its password "
                                           "for the lookup comes from there)")
        password = owner.users[auth_user].password
        if password.startswith(("SCRAM-SHA-256$", "jwt-pkey-fpath:")):
            raise where.error("auth_user", f"{auth_user!r} needs a plain-text or md5 password in "
                                           f"[pools.{owner.name}.users] to log in for lookups")
        if "auth_query" in p.data:
            query = _lookup_query(p, "auth_query", p.string("auth_query", nonempty=True))
        else:
            query = _lookup_query(general, "auth_query", g.auth_query) if "auth_query" in general.data \
                else g.auth_query
        database = p.string("auth_dbname", g.auth_dbname) or pool.server_database
        out[name] = replace(pool, auth_query=AuthQueryConfig(
            query=query, user=auth_user, password=password, database=database))
    return out


def _general(root: _Table) -> GeneralConfig:
    g = root.table("general", _GENERAL_KEYS)
    d = GeneralConfig()
    return GeneralConfig(
        host=g.hosts("host", d.host),
        port=g.integer("port", d.port, lo=1, hi=65535),
        unix_socket_dir=g.string("unix_socket_dir", d.unix_socket_dir),
        pidfile=g.string("pidfile", d.pidfile),
        pool_mode=g.enum("pool_mode", d.pool_mode, POOL_MODES),
        max_client_conn=g.integer("max_client_conn", d.max_client_conn, lo=1),
        server_connect_timeout=g.duration("server_connect_timeout", d.server_connect_timeout),
        query_wait_timeout=g.duration("query_wait_timeout", d.query_wait_timeout),
        server_idle_timeout=g.duration("server_idle_timeout", d.server_idle_timeout),
        server_lifetime=g.duration("server_lifetime", d.server_lifetime),
        client_login_timeout=g.duration("client_login_timeout", d.client_login_timeout),
        client_idle_timeout=g.duration("client_idle_timeout", d.client_idle_timeout),
        idle_transaction_timeout=g.duration("idle_transaction_timeout", d.idle_transaction_timeout),
        server_reset_query=g.string("server_reset_query", d.server_reset_query),
        server_reset_query_always=g.boolean("server_reset_query_always", d.server_reset_query_always),
        strict=g.boolean("strict", d.strict),
        pin_policy=g.enum("pin_policy", d.pin_policy, PIN_POLICIES),
        server_check_delay=g.duration("server_check_delay", d.server_check_delay),
        server_check_query=g.string("server_check_query", d.server_check_query),
        connect_query=g.string("connect_query", d.connect_query),
        application_name=g.string("application_name", d.application_name),
        admin_username=g.string("admin_username", d.admin_username),
        admin_password=g.string("admin_password", d.admin_password),
        admin_users=g.names("admin_users"),
        stats_users=g.names("stats_users"),
        admin_legacy_columns=g.boolean("admin_legacy_columns", d.admin_legacy_columns),
        stats_period=g.duration("stats_period", d.stats_period),
        log_stats=g.boolean("log_stats", d.log_stats),
        shutdown_timeout=g.duration("shutdown_timeout", d.shutdown_timeout),
        prepared_statements=g.boolean("prepared_statements", d.prepared_statements),
        prepared_statements_cache_size=g.integer(
            "prepared_statements_cache_size", d.prepared_statements_cache_size),
        client_prepared_statements_cache_size=g.integer(
            "client_prepared_statements_cache_size", d.client_prepared_statements_cache_size),
        log_level=g.enum("log_level", d.log_level, LOG_LEVELS),
        log_format=g.enum("log_format", d.log_format, LOG_FORMATS),
        log_client_connections=g.boolean("log_client_connections", d.log_client_connections),
        log_client_disconnections=g.boolean("log_client_disconnections", d.log_client_disconnections),
        workers=g.integer("workers", d.workers, lo=0, hi=MAX_WORKERS),
        max_message_size=g.size("max_message_size", d.max_message_size),
        message_size_to_be_stream=g.size("message_size_to_be_stream", d.message_size_to_be_stream),
        max_memory_usage=g.size("max_memory_usage", d.max_memory_usage),
        tcp_keepalive=g.boolean("tcp_keepalive", d.tcp_keepalive),
        tcp_keepidle=g.duration("tcp_keepidle", d.tcp_keepidle),
        tcp_keepintvl=g.duration("tcp_keepintvl", d.tcp_keepintvl),
        tcp_keepcnt=g.integer("tcp_keepcnt", d.tcp_keepcnt, hi=127),
        tcp_user_timeout=g.duration("tcp_user_timeout", d.tcp_user_timeout),
        query_timeout=g.duration("query_timeout", d.query_timeout),
        transaction_timeout=g.duration("transaction_timeout", d.transaction_timeout),
        server_login_retry=g.duration("server_login_retry", d.server_login_retry),
        **_tls(g, d),
        **_security(g, d),
    )


def _security(g: _Table, d: GeneralConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "hba_file": resolve(g.string("hba_file", d.hba_file), g.file),
        "hba": g.string("hba", d.hba),
        "jwt_claim": g.string("jwt_claim", d.jwt_claim, nonempty=True),
        "jwt_leeway": g.duration("jwt_leeway", d.jwt_leeway),
        "jwt_audience": g.string("jwt_audience", d.jwt_audience),
        "jwt_allow_cleartext": g.boolean("jwt_allow_cleartext", d.jwt_allow_cleartext),
        **{key: g.integer(key, getattr(d, key)) for key in (
            "max_user_client_connections", "max_db_client_connections", "max_db_connections")},
        "auth_failure_delay": g.duration("auth_failure_delay", d.auth_failure_delay),
        "auth_failure_delay_max": g.duration("auth_failure_delay_max", d.auth_failure_delay_max),
        "auth_user": g.string("auth_user", d.auth_user),
        "auth_query": g.string("auth_query", d.auth_query, nonempty=True),
        "auth_dbname": g.string("auth_dbname", d.auth_dbname),
    }
    if out["hba_file"] and out["hba"]:
        raise g.error("hba", "give hba_file or hba, not both")
    return out


def _hba_rules(root: _Table, general: GeneralConfig) -> Any:
    """Parse the hba rules; an error names the rule's file and line (the config file's own line for
    inline `hba` text)."""
    from pgdoorman.auth.hba import HbaError, parse_hba

    offset: int | None = 0  # the file line of the text's line 0; None: all on one line
    if general.hba_file:
        try:
            with open(general.hba_file, encoding="utf-8") as f:
                text, path = f.read(), general.hba_file
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise root.error(("general", "hba_file"), f"cannot read {general.hba_file}: {why}") from None
    elif general.hba:
        text, path = general.hba, root.file
        key_line = root.lines.line_of(("general", "hba"))
        raw_lines = root.lines.source_lines
        opener = raw_lines[key_line - 1].rstrip() if 0 < key_line <= len(raw_lines) else ""
        triple = ('"' * 3, "'" * 3)
        if not any(quote in opener for quote in triple):
            offset = None  # a one-line string with \n escapes: every rule is on the key's line
        else:  # a triple quote then a newline: TOML drops that newline, the first rule is below
            offset = key_line if opener.endswith(triple) else key_line - 1
    else:
        return None
    try:
        return parse_hba(text, path)
    except HbaError as e:
        line = root.lines.line_of(("general", "hba")) if offset is None else e.line + offset
        raise ConfigError(f"{path}:{line}: {e.message}", path=path, line=line,
                          key="general.hba_file" if general.hba_file else "general.hba",
                          reason=e.message) from None


def _tls(g: _Table, d: GeneralConfig) -> dict[str, Any]:
    """The TLS keys of [general], with their files checked: an error names the key that points at
    the broken file, so the operator knows which line to fix."""
    def path(key: str) -> str:
        return resolve(g.string(key, getattr(d, key)), g.file)

    out: dict[str, Any] = {
        "tls_mode": g.enum("tls_mode", d.tls_mode, TLS_MODES),
        "tls_certificate": path("tls_certificate"),
        "tls_private_key": path("tls_private_key"),
        "tls_ca_file": path("tls_ca_file"),
        "tls_ciphers": g.string("tls_ciphers", d.tls_ciphers),
        "tls_protocols": g.string("tls_protocols", d.tls_protocols),
        "server_tls_mode": g.enum("server_tls_mode", d.server_tls_mode, SERVER_TLS_MODES),
        "server_tls_ca_file": path("server_tls_ca_file"),
        "server_tls_certificate": path("server_tls_certificate"),
        "server_tls_key": path("server_tls_key"),
        "server_tls_protocols": g.string("server_tls_protocols", d.server_tls_protocols),
        "server_channel_binding": g.enum("server_channel_binding", d.server_channel_binding,
                                         CHANNEL_BINDINGS),
    }
    for key in ("tls_protocols", "server_tls_protocols"):
        try:
            parse_protocols(out[key])
        except ValueError as exc:
            raise g.error(key, str(exc)) from None
    if out["tls_mode"] != "disable":
        for key in ("tls_certificate", "tls_private_key"):
            if not out[key]:
                raise g.error("tls_mode", f"tls_mode = {out['tls_mode']!r} needs {key}")
    if out["tls_mode"] in ("verify-ca", "verify-full") and not out["tls_ca_file"]:
        raise g.error("tls_mode", f"tls_mode = {out['tls_mode']!r} needs tls_ca_file to check client "
                                  "certificates against")
    if out["server_tls_mode"] in ("verify-ca", "verify-full") and not out["server_tls_ca_file"]:
        raise g.error("server_tls_mode", f"server_tls_mode = {out['server_tls_mode']!r} needs "
                                         "server_tls_ca_file")
    if bool(out["server_tls_certificate"]) != bool(out["server_tls_key"]):
        missing = "server_tls_key" if out["server_tls_certificate"] else "server_tls_certificate"
        raise g.error("server_tls_certificate" if missing == "server_tls_key" else "server_tls_key",
                      f"needs {missing} too")
    checks: list[tuple[str, Any]] = []
    if out["tls_certificate"] and out["tls_private_key"]:
        checks.append(("tls_certificate", lambda: check_pair(out["tls_certificate"], out["tls_private_key"])))
    if out["tls_ca_file"]:
        checks.append(("tls_ca_file", lambda: check_ca(out["tls_ca_file"])))
    if out["server_tls_ca_file"]:
        checks.append(("server_tls_ca_file", lambda: check_ca(out["server_tls_ca_file"])))
    if out["server_tls_certificate"]:
        checks.append(("server_tls_certificate",
                       lambda: check_pair(out["server_tls_certificate"], out["server_tls_key"])))
    for key, check in checks:
        try:
            check()
        except ValueError as exc:
            raise g.error(key, str(exc)) from None
    return out


def _syntax_error(path: str, text: str, e: tomllib.TOMLDecodeError) -> ConfigError:
    msg = str(e)
    m = re.search(r" \(at line (\d+), column (\d+)\)$", msg)
    if m is not None:
        line, msg = int(m.group(1)), f"{msg[:m.start()]} (column {m.group(2)})"
    else:  # "(at end of document)"
        line, msg = text.count("\n") + 1, msg.replace(" (at end of document)", " at end of file")
    return ConfigError(f"{path}:{line}: syntax error: {msg}", path=path, line=line, reason=msg)


def parse_config(text: str, path: str = "<config>") -> Config:
    """Parse TOML text into a validated Config; `path` is only used in error messages and Config.path."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(path, text, e) from None
    root = _Table(LineIndex(text), path, (), data, ("general", "pools", "prometheus"))
    general = _general(root)
    pools_table = root.table("pools", None)
    pools = {name: _pool(pools_table, name, general) for name in pools_table.data}
    pools = _auth_queries(root, pools_table, pools, general)
    prom = root.table("prometheus", _PROMETHEUS_KEYS)
    d = PrometheusConfig()
    prometheus = PrometheusConfig(enabled=prom.boolean("enabled", d.enabled),
                                  host=prom.string("host", d.host, nonempty=True),
                                  port=prom.integer("port", d.port, lo=1, hi=65535))
    return Config(general=general, pools=pools, path=path, prometheus=prometheus, text=text,
                  hba_rules=_hba_rules(root, general))


def load_config(path: str) -> Config:
    """Read and parse a config file. An unreadable file is reported as `FILE: reason` (there is no line)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}", path=path,
                          reason=str(e.strerror or e)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: syntax error: invalid UTF-8", path=path, line=line,
                          reason="invalid UTF-8") from None
    return parse_config(text, path)


def default_config() -> Config:
    """The embedded default.toml: listen on 127.0.0.1:6432, pool "postgres" -> 127.0.0.1:5432, trust."""
    resource = importlib.resources.files("pgdoorman.config").joinpath("default.toml")
    return parse_config(resource.read_text(encoding="utf-8"), str(resource))
