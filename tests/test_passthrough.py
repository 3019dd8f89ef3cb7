"""SCRAM pass-through: the pooler holds only a user's SCRAM verifier (no password anywhere) and logs
in to a PostgreSQL whose pg_hba demands scram-sha-256 with the ClientKey of the client's own proof."""

from __future__ import annotations

import psycopg
import pytest
from helpers import PASSWORDS, PoolerLauncher, scram_secret

from pgdoorman.devcluster import Cluster


def _verifier(pg: Cluster, role: str) -> str:
    return pg.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'")


def _pools(pg: Cluster, password: str, user: str = "scram_user", **extra: object) -> dict[str, object]:
    return {"tx": {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
                   "users": {"0": {"username": user, "password": password, "pool_size": 2, **extra}}}}


@pytest.mark.parametrize("workers", [1, 2])
def test_login_with_the_clients_proof(pg: Cluster, start_pooler: PoolerLauncher,
                                      workers: int) -> None:
    verifier = _verifier(pg, "scram_user")
    assert verifier.startswith("SCRAM-SHA-256$")
    p = start_pooler(_pools(pg, verifier), {"workers": workers})
    assert PASSWORDS["scram_user"] not in p.config_path.read_text()  # only the verifier is there
    conns = [psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True) for _ in range(3)]
    try:
        for conn in conns:
            assert conn.execute("SELECT current_user").fetchone() == ("scram_user",)
    finally:
        for conn in conns:
            conn.close()
    # a wrong password proves nothing: refused by the pooler, and no server login is tried with it
    with pytest.raises(psycopg.OperationalError,
                       match='password authentication failed for user "scram_user"'):
        psycopg.connect(p.dsn("tx", "scram_user", "wrong"))


def test_no_server_login_before_a_client_proved(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(_pools(pg, _verifier(pg, "scram_user"), min_pool_size=1))
    assert "server connect failed" not in p.log()
    with psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_another_verifier_is_refused_clearly(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    """Same password, but a verifier with its own salt: the server's salt differs, so the pooler's
    keys cannot answer it."""
    p = start_pooler(_pools(pg, scram_secret(PASSWORDS["scram_user"])))
    with pytest.raises(psycopg.OperationalError, match="different salt or iteration count"):
        psycopg.connect(p.dsn("tx", "scram_user"))


def test_md5_server_cannot_take_a_verifier(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    # md5_user's pg_hba line says md5: a SCRAM verifier cannot answer that
    p = start_pooler(_pools(pg, scram_secret(PASSWORDS["md5_user"]), user="md5_user"))
    with pytest.raises(psycopg.OperationalError, match="holds only a SCRAM verifier"):
        psycopg.connect(p.dsn("tx", "md5_user"))


def test_clear_text_login_gives_the_key_too(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    """hba `password`: the client sends its password in clear text (over TLS, in production); the
    pooler derives the ClientKey from it with the verifier's salt, and pass-through works."""
    p = start_pooler(_pools(pg, _verifier(pg, "scram_user")),
                     {"hba": "host all all 127.0.0.1/32 password\nlocal all all trust\n"})
    with psycopg.connect(p.dsn("tx", "scram_user"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scram_user",)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed'):
        psycopg.connect(p.dsn("tx", "scram_user", "wrong"))


def test_trust_login_cannot_pass_through(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(_pools(pg, _verifier(pg, "scram_user")), {"hba": "host all all 127.0.0.1/32 trust\n"})
    with pytest.raises(psycopg.OperationalError, match="a trust or cert login gives no key"):
        psycopg.connect(p.dsn("tx", "scram_user", ""))
