"""What pgbench can be pointed at: PostgreSQL directly, or a pooler process we start and watch."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from bench import procstats


@dataclass
class Target:
    """PostgreSQL reached directly; poolers override start/stop/pid."""

    name: str
    host: str
    port: int
    version: str = ""
    supports_prepared: bool = True
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        """Nothing to start: the cluster is already up."""

    def stop(self) -> None:
        """Nothing to stop."""

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and remove whatever start() left behind."""
        self.stop()

    def pid(self) -> int | None:
        """Root process of the pooler (CPU and RSS are summed over its tree); None for direct."""
        return None

    def died(self) -> str:
        """Why the pooler process is gone ("" while it runs, and always for direct)."""
        return ""


@dataclass
class PoolerProcess(Target):
    """A pooler run as a child process in front of one PostgreSQL database, logging to a file in its
    work dir."""

    server_port: int = 0
    database: str = ""
    user: str = ""
    pool_size: int = 20
    max_client_conn: int = 1000
    workdir: str = ""
    log_path: str = ""
    # --tls: certificate and key the pooler presents to its clients, which must then use TLS
    # ("require"); its own connections to PostgreSQL stay in clear text either way
    tls_cert_file: str = ""
    tls_key_file: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """Environment of the child; None inherits ours."""
        return None

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cleanup(self) -> None:
        self.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def died(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return f"exited with {self.proc.returncode}: {log_tail(self.log_path, 5).strip()}"

    def start(self) -> None:
        self.log_path = os.path.join(self.workdir, f"{self.name}.stderr.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir, env=self.env(),
                                         start_new_session=True)
        wait_listening(self.host, self.port, self.proc, self.log_path)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for pid in reversed(procstats.tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in procstats.tree(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=15)


def log_tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], log_path: str,
                   timeout: float = 30.0) -> None:
    """Wait until host:port accepts connections; fail early (with the log) if proc exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s:\n"
                                   f"{log_tail(log_path)}") from None
            time.sleep(0.1)
