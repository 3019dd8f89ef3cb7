"""Throwaway PostgreSQL clusters for `pgdoorman demo`, the test suite and the benchmarks.

initdb refuses to run as root, so when we are root the cluster is owned by and run as the
`postgres` OS user (via runuser) in a temp dir made theirs.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

SUPERUSER = "postgres"


def find_pg_bin() -> str:
    """Directory holding initdb/pg_ctl/pgbench: PGBIN, Debian's layout, or PATH."""
    env = os.environ.get("PGBIN")
    if env:
        return env
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    for preferred in ("/usr/lib/postgresql/15/bin/initdb", *candidates):
        if os.path.exists(preferred):
            return os.path.dirname(preferred)
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(initdb)
    raise RuntimeError("PostgreSQL server binaries not found: install postgresql-15 or set PGBIN")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class Role:
    name: str
    password: str | None  # None: no password (trust in pg_hba)
    method: str  # pg_hba method: trust, md5, scram-sha-256, password


@dataclass
class Cluster:
    """A PostgreSQL cluster in a temp dir on a free port, listening on 127.0.0.1 and a unix socket."""

    roles: list[Role] = field(default_factory=list)
    databases: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    hba: list[str] | None = None  # pg_hba.conf lines instead of the default (one line per role)
    files: dict[str, bytes] = field(default_factory=dict)  # written into the data dir (TLS keys)
    host: str = "127.0.0.1"
    port: int = 0
    datadir: str = ""
    socket_dir: str = ""
    bindir: str = ""
    _tmp: str = ""

    def start(self) -> Cluster:
        self.bindir = self.bindir or find_pg_bin()
        self._tmp = tempfile.mkdtemp(prefix="pgdoorman-pg-")
        self.datadir = os.path.join(self._tmp, "data")
        self.socket_dir = self._tmp
        self.port = self.port or free_port()
        if os.geteuid() == 0:
            shutil.chown(self._tmp, "postgres", "postgres")
        os.chmod(self._tmp, 0o755)
        self._run(["initdb", "-D", self.datadir, "-U", SUPERUSER, "-A", "trust", "--no-sync",
                   "-E", "UTF8", "--locale=C"])
        self._write_conf()
        self._run(["pg_ctl", "-D", self.datadir, "-l", os.path.join(self._tmp, "postgres.log"),
                   "-w", "-t", "60", "start"])
        wait_for_port(self.host, self.port)
        self._create_roles()
        return self

    def _write_conf(self) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            **self.settings,
        }
        conf = os.path.join(self.datadir, "postgresql.conf")
        with open(conf, "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        hba = ["local all all trust", f"host all {SUPERUSER} 127.0.0.1/32 trust"]
        hba += [f"host all {r.name} 127.0.0.1/32 {r.method}" for r in self.roles]
        hba.append("host all all 127.0.0.1/32 scram-sha-256")
        if self.hba is not None:
            hba = ["local all all trust", *self.hba]
        for name, data in self.files.items():
            path = os.path.join(self.datadir, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)  # PostgreSQL refuses a key file others may read
            if os.geteuid() == 0:
                shutil.chown(path, "postgres", "postgres")
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write("\n".join(hba) + "\n")

    def _create_roles(self) -> None:
        for r in self.roles:
            # One psql session per role, so password_encryption applies to its CREATE ROLE.
            encryption = "md5" if r.method == "md5" else "scram-sha-256"
            pw = "NULL" if r.password is None else "'" + r.password.replace("'", "''") + "'"
            self.psql(f"SET password_encryption = '{encryption}'; "
                      f'CREATE ROLE "{r.name}" LOGIN SUPERUSER PASSWORD {pw};')
        for db in self.databases:
            self.psql(f'CREATE DATABASE "{db}";')

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(
            [os.path.join(self.bindir, "psql"), "-h", self.socket_dir, "-p", str(self.port),
             "-U", SUPERUSER, "-d", db, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def dsn(self, user: str = SUPERUSER, password: str | None = None, dbname: str = "postgres") -> str:
        pw = f" password={password}" if password else ""
        return f"host={self.host} port={self.port} user={user} dbname={dbname}{pw}"

    def tool(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def _run(self, argv: list[str]) -> None:
        argv = [*_as_postgres(), os.path.join(self.bindir, argv[0]), *argv[1:]]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def restart(self) -> None:
        self._run(["pg_ctl", "-D", self.datadir, "-w", "-m", "fast", "restart",
                   "-l", os.path.join(self._tmp, "postgres.log")])
        wait_for_port(self.host, self.port)

    def stop_server(self) -> None:
        self._run(["pg_ctl", "-D", self.datadir, "-w", "-m", "fast", "stop"])

    def start_server(self) -> None:
        self._run(["pg_ctl", "-D", self.datadir, "-w", "-l", os.path.join(self._tmp, "postgres.log"),
                   "start"])
        wait_for_port(self.host, self.port)

    def destroy(self) -> None:
        if not self._tmp:
            return
        try:
            self._run(["pg_ctl", "-D", self.datadir, "-w", "-m", "immediate", "stop"])
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = ""

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
