"""Fixtures: one real PostgreSQL 15 per session (`pg`), pgdoorman subprocesses (`start_pooler`, `pooler`).

    def test_x(pooler):                                  # shared: pools tx / sess / stmt on testdb
        with psycopg.connect(pooler.dsn("tx")) as c: ...

    def test_y(start_pooler):                            # private pooler for this test
        p = start_pooler(pool_config("tx", pool_size=1), {"query_wait_timeout": "1s"})

Helpers (pool_config, pconnect, aconnect, RawConn, ...) live in tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import (  # noqa: E402
    ALL_USERS,
    PASSWORDS,
    Pooler,
    PoolerLauncher,
    pool_config,
    set_cluster,
)

from pgdoorman.devcluster import Cluster, Role  # noqa: E402

__all__ = ["ALL_USERS", "PASSWORDS", "Pooler", "PoolerLauncher", "pool_config"]


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    cluster = Cluster(
        roles=[
            Role("trust_user", None, "trust"),
            Role("md5_user", "md5_pass", "md5"),
            Role("scram_user", "scram_pass", "scram-sha-256"),
            Role("clear_user", "clear_pass", "password"),  # server asks for a cleartext password
        ],
        databases=["testdb"],
    )
    cluster.start()
    try:
        subprocess.run(
            [cluster.tool("pgbench"), "-i", "-s", "1", "-q", "-h", cluster.socket_dir,
             "-p", str(cluster.port), "-U", "postgres", "testdb"],
            check=True, capture_output=True, text=True,
        )
        cluster.psql("CREATE TABLE t_hygiene(id int, v text)", db="testdb")
        # md5_user must really have an md5 secret, or server-side md5 auth goes untested
        assert cluster.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5_user'").startswith("md5")
        set_cluster(cluster)
        yield cluster
    finally:
        set_cluster(None)
        cluster.destroy()


@pytest.fixture
def start_pooler(pg: Cluster, tmp_path: Path) -> Iterator[PoolerLauncher]:
    """Factory: start_pooler(pools: dict, general: dict | None = None) -> Pooler; all stopped at teardown."""
    launcher = PoolerLauncher(tmp_path, pg)
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def pooler(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pooler]:
    """The shared pooler: pools tx (transaction), sess (session), stmt (statement); pool_size 4, all users."""
    launcher = PoolerLauncher(tmp_path_factory.mktemp("pooler"), pg)
    try:
        pools = (pool_config("tx", "transaction", 4)
                 | pool_config("sess", "session", 4)
                 | pool_config("stmt", "statement", 4))
        yield launcher.start(pools)
    finally:
        launcher.stop_all()


@pytest.fixture(name="pool_config")
def _pool_config_fixture(pg: Cluster):
    """The helpers.pool_config function, for tests that prefer a fixture to an import."""
    return pool_config


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """When a test fails, attach the tail of each pooler log it used to the report."""
    rep = yield
    if rep.when == "call" and rep.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in ("pooler", "start_pooler"):
            obj = funcargs.get(name)
            if obj is None:
                continue
            poolers = obj.poolers if isinstance(obj, PoolerLauncher) else [obj]
            for p in poolers:
                tail = "\n".join(p.log().splitlines()[-60:])
                rep.sections.append((f"pgdoorman log {p.config_path.name} (tail)", tail))
    return rep
