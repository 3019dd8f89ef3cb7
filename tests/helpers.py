"""Shared test helpers: run pgdoorman as a subprocess, build pool configs, speak raw protocol bytes.

Used by tests/conftest.py (fixtures `pg`, `start_pooler`, `pooler`) and directly by test modules:

    from helpers import pool_config, RawConn, pconnect
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pgdoorman.devcluster import Cluster, free_port
from pgdoorman.protocol import messages

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Passwords of the roles the session cluster creates (trust_user has none).
PASSWORDS: dict[str, str] = {"trust_user": "", "md5_user": "md5_pass", "scram_user": "scram_pass",
                             "clear_user": "clear_pass"}
ALL_USERS = ("trust_user", "md5_user", "scram_user")
#: Keys that belong to a `[pools.X.users.N]` table rather than to `[pools.X]`.
USER_KEYS = frozenset({"password", "server_password", "server_username", "min_pool_size", "pool_size"})

STARTUP_TIMEOUT = 15.0

_cluster: Cluster | None = None  # the session cluster, registered by the `pg` fixture


def set_cluster(pg: Cluster | None) -> None:
    global _cluster
    _cluster = pg


# --------------------------------------------------------------------------------------------
# configuration


def render_toml(data: Mapping[str, Any]) -> str:
    """pgdoorman.config.render_config when it imports, else a small writer of our own."""
    try:
        from pgdoorman.config import render_config
    except Exception:  # the config module is written concurrently; never let that break the harness
        return _render_toml(data)
    return render_config(data)


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {v!r} as TOML")


def _render_toml(data: Mapping[str, Any], path: tuple[str, ...] = ()) -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    out = []
    if path and (scalars or not tables):
        out.append("[" + ".".join(str(p) for p in path) + "]")
    out += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    text = "\n".join(out) + ("\n\n" if out else "")
    for k, v in tables.items():
        text += _render_toml(v, (*path, str(k)))
    return text


def pool_config(
    db: str = "tx",
    mode: str = "transaction",
    pool_size: int = 4,
    users: Iterable[str] = ALL_USERS,
    *,
    pg: Cluster | None = None,
    server_database: str = "testdb",
    user_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **pool_overrides: Any,
) -> dict[str, dict[str, Any]]:
    """One pool, as `{db: {...}}`, ready to merge into the `pools` dict given to `start_pooler`.

        start_pooler(pool_config("tx") | pool_config("s", mode="session", pool_size=1))

    Every user gets its password (PASSWORDS) as both `password` and `server_password`. Keyword
    overrides named in USER_KEYS (password, server_password, min_pool_size, ...) apply to every
    user; `user_overrides={"md5_user": {...}}` applies to one user; the rest go to the pool table.
    The server is `pg` (default: the session cluster).
    """
    cluster = pg or _cluster
    if cluster is None:
        raise RuntimeError("pool_config needs the `pg` fixture (or pg=Cluster)")
    per_user = {k: v for k, v in pool_overrides.items() if k in USER_KEYS}
    pool = {k: v for k, v in pool_overrides.items() if k not in USER_KEYS}
    user_tables: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(users):
        pw = PASSWORDS.get(name, "")
        u: dict[str, Any] = {"username": name, "password": pw, "pool_size": pool_size,
                             "server_password": pw}
        u.update(per_user)
        u.update((user_overrides or {}).get(name, {}))
        user_tables[str(i)] = u
    entry: dict[str, Any] = {
        "server_host": cluster.host,
        "server_port": cluster.port,
        "server_database": server_database,
        "pool_mode": mode,
        **pool,
        "users": user_tables,
    }
    return {db: entry}


# --------------------------------------------------------------------------------------------
# the pooler process


def _kw(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Pooler:
    """A running `python -m pgdoorman -c FILE` subprocess."""

    host: str
    port: int
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    _log_file: Any = field(default=None, repr=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def dsn(self, dbname: str = "tx", user: str = "trust_user", password: str | None = None,
            **extra: Any) -> str:
        """libpq keyword string. password=None uses the role's known password; "" sends none."""
        if password is None:
            password = PASSWORDS.get(user, "")
        parts = {"host": self.host, "port": str(self.port), "dbname": dbname, "user": user,
                 "sslmode": "disable", "connect_timeout": "10"}
        if password:
            parts["password"] = password
        parts.update({k: str(v) for k, v in extra.items()})
        return " ".join(f"{k}={_kw(v)}" for k, v in parts.items())

    def url(self, dbname: str = "tx", user: str = "trust_user", password: str | None = None) -> str:
        """postgresql:// URL (asyncpg, node-postgres, pgx); same password rule as dsn()."""
        from urllib.parse import quote

        if password is None:
            password = PASSWORDS.get(user, "")
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}?sslmode=disable"

    def stop(self, sig: int = signal.SIGQUIT) -> None:
        """SIGQUIT: shut down at once (SIGTERM would wait for the clients, SIGINT for the servers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class PoolerLauncher:
    """Writes configs into `workdir`, starts poolers, stops them all at `stop_all()`.

    Usable at any fixture scope: the function-scoped `start_pooler` and the session-scoped
    `pooler` fixtures each own one.
    """

    def __init__(self, workdir: Path, pg: Cluster | None = None) -> None:
        self.workdir = Path(workdir)
        self.pg = pg
        self.poolers: list[Pooler] = []

    def __call__(self, pools: Mapping[str, Any], general: Mapping[str, Any] | None = None,
                 **tables: Mapping[str, Any]) -> Pooler:
        return self.start(pools, general, **tables)

    def start(self, pools: Mapping[str, Any], general: Mapping[str, Any] | None = None,
              **tables: Mapping[str, Any]) -> Pooler:
        """tables: other top-level tables of the config, e.g. prometheus={"enabled": True}."""
        host = "127.0.0.1"
        port = free_port(host)
        gen: dict[str, Any] = {"host": host, "port": port, **(general or {})}
        # Tests fail logins on purpose, all from 127.0.0.1: the failed-login delay (on by default)
        # would make each next failure wait longer. Its own tests set it.
        gen.setdefault("auth_failure_delay", 0)
        if "workers" not in gen and os.environ.get("PGDOORMAN_TEST_WORKERS"):
            gen["workers"] = int(os.environ["PGDOORMAN_TEST_WORKERS"])  # scripts/test.sh runs both
        host, port = gen["host"], int(gen["port"])
        text = render_toml({"general": gen, "pools": dict(pools), **tables})
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / f"pgdoorman-{port}.toml"
        config_path.write_text(text)
        log_path = self.workdir / f"pgdoorman-{port}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Pooler.stop
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgdoorman", "-c", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT), env=env,
        )
        pooler = Pooler(host, port, config_path, log_path, proc, log_file)
        self.poolers.append(pooler)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pooler.stop()
                pytest.fail(f"pgdoorman exited with code {proc.returncode} before listening.\n"
                            f"config:\n{text}\nlog:\n{pooler.log()}", pytrace=False)
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pooler.stop()
                pytest.fail(f"pgdoorman does not listen on {host}:{port} after {STARTUP_TIMEOUT}s.\n"
                            f"config:\n{text}\nlog:\n{pooler.log()}", pytrace=False)
            time.sleep(0.05)
        return pooler

    def stop_all(self) -> None:
        while self.poolers:
            self.poolers.pop().stop()


# --------------------------------------------------------------------------------------------
# drivers


def pconnect(pooler: Pooler, dbname: str = "tx", user: str = "trust_user", password: str | None = None,
             *, autocommit: bool = True, **kwargs: Any):
    """A psycopg 3 connection through the pooler using unnamed statements only (prepare_threshold=None)."""
    import psycopg

    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(pooler.dsn(dbname, user, password), autocommit=autocommit, **kwargs)


async def apconnect(pooler: Pooler, dbname: str = "tx", user: str = "trust_user",
                    password: str | None = None, *, autocommit: bool = True, **kwargs: Any):
    import psycopg

    kwargs.setdefault("prepare_threshold", None)
    return await psycopg.AsyncConnection.connect(pooler.dsn(dbname, user, password),
                                                 autocommit=autocommit, **kwargs)


async def aconnect(pooler: Pooler, dbname: str = "tx", user: str = "trust_user",
                   password: str | None = None, **kwargs: Any):
    """An asyncpg connection through the pooler (statement_cache_size=0 unless given)."""
    import asyncpg

    kwargs.setdefault("statement_cache_size", 0)
    kwargs.setdefault("timeout", 10)
    return await asyncpg.connect(pooler.url(dbname, user, password), **kwargs)


# --------------------------------------------------------------------------------------------
# stored secrets


def md5_secret(password: str, user: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def scram_secret(password: str, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier (ASCII passwords; SASLprep is then the identity)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def scram_secret_matches(verifier: str, password: str) -> bool:
    """Does a SCRAM-SHA-256 verifier belong to this (ASCII) password? Recomputes it with hashlib."""
    try:
        _, rest = verifier.split("$", 1)
        iter_salt, _keys = rest.split("$", 1)
        iterations, salt_b64 = iter_salt.split(":", 1)
        salt = base64.b64decode(salt_b64)
    except ValueError:
        return False
    return scram_secret(password, salt, int(iterations)) == verifier


# --------------------------------------------------------------------------------------------
# raw protocol

PROTOCOL_3 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def startup_packet(params: Mapping[str, str], version: int = PROTOCOL_3) -> bytes:
    body = struct.pack("!I", version)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!II", 8, GSSENC_REQUEST_CODE)


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid & 0xFFFFFFFF, key & 0xFFFFFFFF)


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


TERMINATE = message(b"X")


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse body -> {"S": "FATAL", "V": ..., "C": "08P01", "M": "...", ...}."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def data_row_values(body: bytes) -> list[str | None]:
    """The columns of a DataRow body, as text (None for NULL); bad UTF-8 fails the test."""
    return messages.data_row_values(body, errors="strict")


class ProtocolEOF(Exception):
    pass


class RawConn:
    """A blocking socket speaking just enough of the v3 protocol to misbehave on purpose."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.backend_key: tuple[int, int] | None = None
        self.params: dict[str, str] = {}

    @classmethod
    def for_pooler(cls, pooler: Pooler, timeout: float = 10.0) -> RawConn:
        return cls(pooler.host, pooler.port, timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ProtocolEOF(f"EOF after {len(self.buf)} buffered bytes")
            self.buf += chunk

    def recv_byte(self) -> bytes:
        self._fill(1)
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def recv_message(self) -> tuple[bytes, bytes]:
        self._fill(5)
        mtype = self.buf[:1]
        (length,) = struct.unpack("!I", self.buf[1:5])
        if length < 4 or length > 1 << 24:
            raise AssertionError(f"bad length {length} in message {mtype!r} from the pooler")
        self._fill(1 + length)
        body = self.buf[5:1 + length]
        self.buf = self.buf[1 + length:]
        return mtype, body

    def read_all(self, timeout: float = 10.0) -> tuple[bytes, bool]:
        """Everything until EOF: (bytes, closed). closed=False means the deadline passed first."""
        deadline = time.monotonic() + timeout
        data = self.buf
        self.buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return data, False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return data, False
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk

    def startup(self, user: str, database: str, version: int = PROTOCOL_3,
                password: str | None = None, **params: str) -> list[tuple[bytes, bytes]]:
        """Startup through ReadyForQuery (trust, cleartext or md5 auth); returns the messages."""
        self.send(startup_packet({"user": user, "database": database, **params}, version))
        return self.read_until_ready(user=user, password=password)

    def read_until_ready(self, user: str = "", password: str | None = None) -> list[tuple[bytes, bytes]]:
        msgs = []
        while True:
            mtype, body = self.recv_message()
            msgs.append((mtype, body))
            if mtype == b"R":
                (code,) = struct.unpack("!I", body[:4])
                if code == 3:  # cleartext
                    self.send(message(b"p", (password or "").encode() + b"\0"))
                elif code == 5:  # md5
                    inner = hashlib.md5(((password or "") + user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    self.send(message(b"p", b"md5" + outer.encode() + b"\0"))
                elif code != 0:
                    raise AssertionError(f"RawConn cannot do auth method {code}")
            elif mtype == b"K":
                self.backend_key = struct.unpack("!II", body[:8])
            elif mtype == b"S":
                k, v = body[:-1].split(b"\0", 1)
                self.params[k.decode()] = v.decode()
            elif mtype == b"E":
                raise AssertionError(f"ErrorResponse: {parse_error_fields(body)}")
            elif mtype == b"Z":
                return msgs

    def query(self, sql: str) -> tuple[list[list[str | None]], list[dict[str, str]], bytes]:
        """Simple query: (rows as text, errors, final transaction status byte)."""
        self.send(query_message(sql))
        rows: list[list[str | None]] = []
        errors: list[dict[str, str]] = []
        while True:
            mtype, body = self.recv_message()
            if mtype == b"D":
                rows.append(data_row_values(body))
            elif mtype == b"E":
                errors.append(parse_error_fields(body))
            elif mtype == b"Z":
                return rows, errors, body[:1]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0): the most abrupt way for a client to vanish."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NotifyListener:
    """A service manager's $NOTIFY_SOCKET (sd_notify datagrams): set NOTIFY_SOCKET to `path`
    before the pooler starts."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(timeout)
        self.messages: list[str] = []

    def until(self, word: str) -> str:
        """The next message that contains word (the ones before it are kept in messages)."""
        while True:
            data = self.sock.recv(4096).decode()
            self.messages.append(data)
            if word in data:
                return data

    def drain(self) -> list[str]:
        """Every message sent so far, without waiting for more."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        return self.messages

    def close(self) -> None:
        self.sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)



def wait_for_active_query(pg: Cluster, query: str, timeout: float = 10.0) -> None:
    """Block until PostgreSQL runs `query` (exact text) for some backend, e.g. before cancelling it."""
    sql = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '"
           + query.replace("'", "''") + "'")
    if not wait_until(lambda: pg.psql(sql) != "0", timeout=timeout, interval=0.05):
        raise AssertionError(f"{query!r} never became active on the server within {timeout}s")


class ScramClient:
    """Just enough SCRAM-SHA-256 for RawConn (no channel binding), independent of pgdoorman's:
    send initial(), then final(server-first-message from AuthenticationSASLContinue)."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.bare = b"n=,r=" + base64.b64encode(os.urandom(18))

    def initial(self) -> bytes:
        first = b"n,," + self.bare
        return message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
        salted = hashlib.pbkdf2_hmac("sha256", self.password, base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = b"c=biws,r=" + attrs[b"r"]
        auth = self.bare + b"," + server_first + b"," + without_proof
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return message(b"p", without_proof + b",p=" + base64.b64encode(proof))
