"""Debian's PgBouncer in transaction mode, run as the postgres OS user (it refuses to run as root)."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from bench import procstats
from bench.targets import PoolerProcess

PREPARED_MIN_VERSION = (1, 21)


def find_or_install() -> str:
    """Path of the pgbouncer binary, installing Debian's package with apt-get if it is missing."""
    found = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer")
                                          else None)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("pgbouncer is not installed and we are not root: apt-get install pgbouncer")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "pgbouncer"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    return shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def version_of(binary: str) -> tuple[str, tuple[int, ...]]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        return out.strip(), (0,)
    parts = tuple(int(x) for x in m.groups() if x is not None)
    return ".".join(map(str, parts)), parts


@dataclass
class PgBouncer(PoolerProcess):
    binary: str = ""

    def prepare(self) -> None:
        """Find (or install) PgBouncer and write its config into a temp dir owned by postgres."""
        self.binary = self.binary or find_or_install()
        self.version, parts = version_of(self.binary)
        self.supports_prepared = parts >= PREPARED_MIN_VERSION
        if not self.supports_prepared:
            self.notes.append(f"PgBouncer {self.version} < 1.21 has no max_prepared_statements: "
                              "pgbench -M prepared is not run against it")
        self.workdir = tempfile.mkdtemp(prefix="pgdoorman-bench-pgbouncer-")
        lines = [
            "[databases]",
            f"{self.database} = host={self.host} port={self.server_port} dbname={self.database}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.workdir}/userlist.txt",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            f"max_client_conn = {self.max_client_conn}",
            "listen_backlog = 4096",
            "log_connections = 0",
            "log_disconnections = 0",
            f"logfile = {self.workdir}/pgbouncer.log",
            f"pidfile = {self.workdir}/pgbouncer.pid",
        ]
        if self.supports_prepared:
            lines.append("max_prepared_statements = 200")
        if self.tls_cert_file:  # --tls: clients must use TLS; to PostgreSQL in clear (its default)
            lines += ["client_tls_sslmode = require", f"client_tls_cert_file = {self.tls_cert_file}",
                      f"client_tls_key_file = {self.tls_key_file}", "server_tls_sslmode = disable"]
        self._write("pgbouncer.ini", "\n".join(lines) + "\n")
        self._write("userlist.txt", f'"{self.user}" ""\n')
        if os.geteuid() == 0:
            for name in ("", "pgbouncer.ini", "userlist.txt"):
                shutil.chown(os.path.join(self.workdir, name), "postgres", "postgres")

    def _write(self, name: str, text: str) -> None:
        with open(os.path.join(self.workdir, name), "w") as f:
            f.write(text)

    def fd_limit(self) -> int:
        """Open files PgBouncer should get: its clients and servers, capped by our hard limit."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        want = self.max_client_conn + 2 * self.pool_size + 100
        return want if hard == resource.RLIM_INFINITY else min(want, hard)

    def command(self) -> list[str]:
        # runuser's PAM session (pam_limits) resets RLIMIT_NOFILE to the system default (often
        # 1024), so raise it again in a shell that then execs pgbouncer (same pid, comm "pgbouncer").
        run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        raise_limit = f'ulimit -n {self.fd_limit()} && exec "$0" "$@"'
        return [*run_as, "sh", "-c", raise_limit, self.binary, os.path.join(self.workdir, "pgbouncer.ini")]

    def start(self) -> None:
        super().start()
        limit = open_files_limit(self.pid())
        if limit is not None and limit < self.max_client_conn:
            self.notes.append(f"PgBouncer runs with an open-file limit of {limit}, "
                              f"below max_client_conn {self.max_client_conn}")

    def pid(self) -> int | None:
        """The pgbouncer process itself, not the runuser wrapper above it."""
        root = super().pid()
        if root is None:
            return None
        for p in procstats.tree(root):
            try:
                with open(f"/proc/{p}/comm") as f:
                    if f.read().strip() == "pgbouncer":
                        return p
            except OSError:
                continue
        return root



def open_files_limit(pid: int | None) -> int | None:
    """Soft RLIMIT_NOFILE of a live process, from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        pass
    return None
