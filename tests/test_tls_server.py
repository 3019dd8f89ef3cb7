"""TLS towards servers: a PostgreSQL 15 started with ssl=on and a pg_hba that allows only hostssl,
mutual TLS (clientcert=verify-full), every server_tls_mode, and SCRAM-SHA-256-PLUS both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import PoolerLauncher
from tlscerts import CertAuthority, Issued

from pgdoorman.devcluster import Cluster, Role

PASSWORD = "tls_pw"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return CertAuthority(tmp_path_factory.mktemp("srvtls"))


@pytest.fixture(scope="module")
def tls_pg(ca: CertAuthority) -> Iterator[Cluster]:
    # The server certificate names only "localhost": reaching it as 127.0.0.1 fails verify-full.
    server = ca.issue("pg_server", "localhost", server=True, hosts=("localhost",))
    cluster = Cluster(
        roles=[Role("tls_scram", PASSWORD, "scram-sha-256"), Role("tls_cert", PASSWORD, "scram-sha-256"),
               Role("tls_md5", PASSWORD, "md5")],
        databases=["tlsdb"],
        settings={"ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'",
                  "ssl_ca_file": "'root.crt'"},
        hba=["hostssl all tls_cert 127.0.0.1/32 scram-sha-256 clientcert=verify-full",
             "hostssl all tls_md5 127.0.0.1/32 md5",
             "hostssl all all 127.0.0.1/32 scram-sha-256",
             "host all all 127.0.0.1/32 reject"],
        files={"server.crt": server.cert.read_bytes(), "server.key": server.key.read_bytes(),
               "root.crt": ca.cert.read_bytes()},
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def launcher(tls_pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolerLauncher]:
    launcher = PoolerLauncher(tmp_path_factory.mktemp("srvtlspoolers"), tls_pg)
    yield launcher
    launcher.stop_all()


def _pools(pg: Cluster, host: str = "127.0.0.1",
           users: tuple[str, ...] = ("tls_scram",)) -> dict[str, object]:
    return {"tlsdb": {"server_host": host, "server_port": pg.port, "pool_mode": "transaction",
                      "users": {str(i): {"username": u, "password": "", "server_password": PASSWORD,
                                         "pool_size": 2} for i, u in enumerate(users)}}}


def _ssl_row(conn: psycopg.Connection) -> tuple[object, ...]:
    row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
def test_server_tls_modes(launcher: PoolerLauncher, tls_pg: Cluster, ca: CertAuthority, mode: str) -> None:
    general = {"server_tls_mode": mode, "server_tls_ca_file": str(ca.cert)}
    p = launcher(_pools(tls_pg, "localhost"), general)
    with psycopg.connect(p.dsn("tlsdb", "tls_scram", password=""), autocommit=True) as conn:
        ssl_on, version = _ssl_row(conn)
        assert ssl_on is True
        assert version in ("TLSv1.2", "TLSv1.3")


def test_server_tls_disable_meets_hostssl_only_server(launcher: PoolerLauncher, tls_pg: Cluster) -> None:
    p = launcher(_pools(tls_pg), {"server_tls_mode": "disable"})
    with pytest.raises(psycopg.OperationalError, match="rejects connection"):
        psycopg.connect(p.dsn("tlsdb", "tls_scram", password=""))


def test_verify_full_checks_the_host_name(launcher: PoolerLauncher, tls_pg: Cluster,
                                          ca: CertAuthority) -> None:
    general = {"server_tls_mode": "verify-full", "server_tls_ca_file": str(ca.cert)}
    p = launcher(_pools(tls_pg, "127.0.0.1"), general)
    with pytest.raises(psycopg.OperationalError, match="TLS handshake with the server failed"):
        psycopg.connect(p.dsn("tlsdb", "tls_scram", password=""))
    assert "certificate verify failed: IP address mismatch" in p.log()


def test_verify_ca_with_another_ca_fails(launcher: PoolerLauncher, tls_pg: Cluster, tmp_path: Path) -> None:
    stranger = CertAuthority(tmp_path, "stranger CA")
    general = {"server_tls_mode": "verify-ca", "server_tls_ca_file": str(stranger.cert)}
    p = launcher(_pools(tls_pg, "localhost"), general)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(p.dsn("tlsdb", "tls_scram", password=""))


def test_require_against_a_server_without_tls(start_pooler: PoolerLauncher, pg: Cluster) -> None:
    """The session cluster has ssl=off: it answers N, which require does not accept."""
    from helpers import pool_config

    p = start_pooler(pool_config("tx", pool_size=1), {"server_tls_mode": "require"})
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL, but SSL was required"):
        psycopg.connect(p.dsn("tx", "md5_user"))
    q = start_pooler(pool_config("tx", pool_size=1), {"server_tls_mode": "prefer"})
    with psycopg.connect(q.dsn("tx", "md5_user"), autocommit=True) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)


def test_mutual_tls_client_certificate(launcher: PoolerLauncher, tls_pg: Cluster, ca: CertAuthority) -> None:
    mine: Issued = ca.issue("pooler_as_tls_cert", "tls_cert", server=False)
    general = {"server_tls_mode": "verify-full", "server_tls_ca_file": str(ca.cert),
               "server_tls_certificate": str(mine.cert), "server_tls_key": str(mine.key)}
    p = launcher(_pools(tls_pg, "localhost", ("tls_cert",)), general)
    with psycopg.connect(p.dsn("tlsdb", "tls_cert", password=""), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("tls_cert",)
        row = conn.execute("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert row == ("/CN=tls_cert",)
    # without the certificate the server's clientcert=verify-full refuses
    no_cert = launcher(_pools(tls_pg, "localhost", ("tls_cert",)),
                       {"server_tls_mode": "verify-full", "server_tls_ca_file": str(ca.cert)})
    with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
        psycopg.connect(no_cert.dsn("tlsdb", "tls_cert", password=""))


def test_channel_binding_require_towards_the_server(launcher: PoolerLauncher, tls_pg: Cluster,
                                                    ca: CertAuthority) -> None:
    general = {"server_tls_mode": "verify-full", "server_tls_ca_file": str(ca.cert),
               "server_channel_binding": "require"}
    p = launcher(_pools(tls_pg, "localhost", ("tls_scram", "tls_md5")), general)
    with psycopg.connect(p.dsn("tlsdb", "tls_scram", password=""), autocommit=True) as conn:
        assert _ssl_row(conn)[0] is True
    # md5 cannot bind: libpq's channel_binding=require refuses it, so do we
    with pytest.raises(psycopg.OperationalError, match="channel binding required"):
        psycopg.connect(p.dsn("tlsdb", "tls_md5", password=""))


def test_channel_binding_require_without_tls_fails(start_pooler: PoolerLauncher) -> None:
    from helpers import pool_config

    p = start_pooler(pool_config("tx", pool_size=1),
                     {"server_tls_mode": "disable", "server_channel_binding": "require"})
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(p.dsn("tx", "scram_user"))
