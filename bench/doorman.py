"""pgdoorman, run as users run it: `python -m pgdoorman -c generated.toml`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from bench.targets import PoolerProcess
from pgdoorman.config import render_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class PgDoorman(PoolerProcess):
    log_level: str = "info"
    workers: int = 0  # pgdoorman's default: one worker process per CPU core
    source_root: str = REPO_ROOT  # another checkout (a git worktree of --baseline) to run instead
    strict: bool = False  # pool strict = true: the session read back after every transaction
    general: dict[str, Any] = field(default_factory=dict)  # more [general] keys (bench/memory.py)

    def prepare(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pgdoorman-bench-pgdoorman-")
        self.version = self._version()
        config = render_config({
            "general": {
                "host": self.host,
                "port": self.port,
                "unix_socket_dir": "",
                "pool_mode": "transaction",
                "max_client_conn": self.max_client_conn,
                "query_wait_timeout": "120s",  # PgBouncer's default
                "prepared_statements": True,
                "log_level": self.log_level,
                "workers": self.workers,
                "log_client_connections": False,  # as PgBouncer's log_connections = 0
                "log_client_disconnections": False,
                **self._tls_settings(),
                **self.general,
            },
            "pools": {
                self.database: {
                    "server_host": self.host,
                    "server_port": self.server_port,
                    "server_database": self.database,
                    **({"strict": True} if self.strict else {}),
                    "users": [{"username": self.user, "password": "", "pool_size": self.pool_size}],
                },
            },
        })
        with open(os.path.join(self.workdir, "generated.toml"), "w") as f:
            f.write(config)

    def _tls_settings(self) -> dict[str, str]:
        """Client TLS as PgBouncer's client_tls_sslmode = require; server side in clear, as without --tls
        (server_tls_mode's default "prefer" would take up the TLS the bench's PostgreSQL then offers)."""
        if not self.tls_cert_file:
            return {}
        return {"tls_mode": "require", "tls_certificate": self.tls_cert_file,
                "tls_private_key": self.tls_key_file, "server_tls_mode": "disable"}

    def _version(self) -> str:
        """`pgdoorman 0.1.0` -> `0.1.0`; "?" when it does not say."""
        out = subprocess.run([sys.executable, "-m", "pgdoorman", "--version"], capture_output=True,
                             text=True, cwd=self.source_root, env=self.env())
        words = out.stdout.split()
        return words[-1] if out.returncode == 0 and words else "?"

    def env(self) -> dict[str, str] | None:
        """Make the checkout importable even when pgdoorman is not pip-installed."""
        path = os.environ.get("PYTHONPATH", "")
        return {**os.environ, "PYTHONPATH": self.source_root + (os.pathsep + path if path else "")}

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pgdoorman", "-c", os.path.join(self.workdir, "generated.toml")]
