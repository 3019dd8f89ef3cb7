"""Named prepared statements through the pooler with every major driver (issue #3).

Each program under tests/drivers/ runs WORKERS concurrent workers for ITERATIONS rounds, checks every
value it selects (values only that worker knows: its id, its counter) and exits non-zero on any
mismatch or error. Here each runs through a pgdoorman pool in two modes:

- transaction, pool_size 2 for 8 workers: the statements a client prepared on one server connection
  are used on others, so the pooler must re-prepare them there;
- session, pool_size 8: one server per client, the easy case.

Programs: pgJDBC (Java), node-postgres and postgres.js (Node), pgx v4 (Go). Toolchains are built or
installed once per session: javac into a temp dir, `npm install` into tests/drivers/node/node_modules,
`go build` in GOPATH mode against Debian's pgx packages (installed with apt-get when missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
from helpers import pool_config

DRIVERS = Path(__file__).resolve().parent / "drivers"
WORKERS = 8
ITERATIONS = 200
RUN_TIMEOUT = 120
USER = "md5_user"

PGJDBC_JAR = Path.home() / ".m2/repository/org/postgresql/postgresql/42.7.13/postgresql-42.7.13.jar"
GOCODE = Path("/usr/share/gocode")
PGX_SRC = GOCODE / "src/github.com/jackc/pgx/v4/pgxpool"

MODES = [
    pytest.param("transaction", 2, id="transaction-pool2"),
    pytest.param("session", WORKERS, id="session-pool8"),
]


def _run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


def _tool_failure(what: str, proc: subprocess.CompletedProcess[str]) -> str:
    return f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


# --------------------------------------------------------------------------------------------
# toolchains, once per session


@pytest.fixture(scope="session")
def java_program(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    javac, java = shutil.which("javac"), shutil.which("java")
    if not javac or not java:
        pytest.skip("javac/java not on PATH")
    if not PGJDBC_JAR.exists():
        pytest.skip(f"pgJDBC jar missing: {PGJDBC_JAR}")
    out = tmp_path_factory.mktemp("java")
    source = DRIVERS / "java/PreparedCheck.java"
    proc = _run([javac, "-d", str(out), "-cp", str(PGJDBC_JAR), str(source)], 120)
    assert proc.returncode == 0, _tool_failure("javac", proc)
    return [java, "-cp", f"{out}{os.pathsep}{PGJDBC_JAR}", "PreparedCheck"]


@pytest.fixture(scope="session")
def node_dir() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not on PATH")
    here = DRIVERS / "node"
    modules = here / "node_modules"
    if not ((modules / "pg/package.json").exists() and (modules / "postgres/package.json").exists()):
        # --no-package-lock: keep the tree clean; the ranges in package.json pin the versions.
        proc = _run([npm, "install", "--no-audit", "--no-fund", "--no-package-lock"], 300, cwd=here)
        assert proc.returncode == 0, _tool_failure("npm install", proc)
    return here


def _apt_install_go() -> str | None:
    """Install Go and Debian's pgx v4; return an error text, or None on success."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = _run(["apt-get", "install", "-y", "golang-go", "golang-github-jackc-pgx-v4-dev"], 600, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if proc.returncode != 0:
        return proc.stderr[-2000:]
    return None


@pytest.fixture(scope="session")
def go_program(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if not shutil.which("go") or not PGX_SRC.is_dir():
        err = _apt_install_go()
        if err is not None or not shutil.which("go") or not PGX_SRC.is_dir():
            pytest.skip(f"Go/pgx v4 unavailable and apt-get install failed: {err}")
    out = tmp_path_factory.mktemp("go")
    gopath = out / "gopath"
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}{os.pathsep}{GOCODE}", GOPROXY="off",
               GOFLAGS="")
    env.setdefault("GOCACHE", str(Path.home() / ".cache/go-build") if "HOME" in os.environ
                   else str(out / "gocache"))
    binary = out / "pgx_check"
    proc = _run([shutil.which("go") or "go", "build", "-o", str(binary), str(DRIVERS / "go/pgx_check.go")],
                300, env=env, cwd=out)
    assert proc.returncode == 0, _tool_failure("go build", proc)
    return [str(binary)]


# --------------------------------------------------------------------------------------------
# running a program through a fresh pooler


def driver_env(pooler, dbname: str) -> dict[str, str]:
    """PG* variables naming the pooler (taken from pooler.dsn, so they always match what it expects)."""
    info = psycopg.conninfo.conninfo_to_dict(pooler.dsn(dbname, USER))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGHOST=str(info["host"]), PGPORT=str(info["port"]), PGUSER=str(info["user"]),
               PGPASSWORD=str(info.get("password", "")), PGDATABASE=str(info["dbname"]),
               PGSSLMODE="disable", WORKERS=str(WORKERS), ITERATIONS=str(ITERATIONS))
    return env


def run_through_pooler(start_pooler, argv: list[str], mode: str, pool_size: int,
                       cwd: Path | None = None) -> None:
    db = f"drv_{mode[:2]}"
    pooler = start_pooler(pool_config(db, mode, pool_size, users=[USER]))
    proc = _run(argv, RUN_TIMEOUT, env=driver_env(pooler, db), cwd=cwd)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, (
        f"{Path(argv[-1]).name} failed in {mode} mode (pool_size {pool_size}, {WORKERS} workers), "
        f"exit {proc.returncode}:\n{out[-6000:]}")
    assert " OK:" in proc.stdout, out


@pytest.mark.parametrize(("mode", "pool_size"), MODES)
def test_pgjdbc(start_pooler, java_program, mode, pool_size):
    run_through_pooler(start_pooler, java_program, mode, pool_size)


@pytest.mark.parametrize(("mode", "pool_size"), MODES)
def test_node_pg(start_pooler, node_dir, mode, pool_size):
    run_through_pooler(start_pooler, ["node", "pg_check.js"], mode, pool_size, cwd=node_dir)


@pytest.mark.parametrize(("mode", "pool_size"), MODES)
def test_node_postgres_js(start_pooler, node_dir, mode, pool_size):
    run_through_pooler(start_pooler, ["node", "postgres_check.js"], mode, pool_size, cwd=node_dir)


@pytest.mark.parametrize(("mode", "pool_size"), MODES)
def test_pgx(start_pooler, go_program, mode, pool_size):
    run_through_pooler(start_pooler, go_program, mode, pool_size)
