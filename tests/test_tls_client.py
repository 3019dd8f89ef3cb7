"""TLS towards clients: every sslmode of psql, psycopg and asyncpg, direct TLS, client certificates,
tls_mode = require against clear text, certificate reload, and hostile handshakes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from helpers import (
    PASSWORDS,
    Pooler,
    PoolerLauncher,
    RawConn,
    parse_error_fields,
    pool_config,
    ssl_request,
    startup_packet,
)
from tlscerts import CertAuthority, der_of

from pgdoorman.devcluster import Cluster


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    ca = CertAuthority(tmp_path_factory.mktemp("tls"))
    return {
        "ca": ca,
        "server": ca.issue("server", "localhost", server=True),
        "client": ca.issue("client_trust", "trust_user", server=False),
        "other": ca.issue("client_other", "someone_else", server=False),
    }


def _general(certs: dict[str, object], mode: str, **extra: object) -> dict[str, object]:
    server = certs["server"]
    ca = certs["ca"]
    return {"tls_mode": mode, "tls_certificate": str(server.cert), "tls_private_key": str(server.key),  # type: ignore[attr-defined]
            "tls_ca_file": str(ca.cert), **extra}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def launcher(pg: Cluster, tmp_path_factory: pytest.TempPathFactory):
    launcher = PoolerLauncher(tmp_path_factory.mktemp("tlspoolers"), pg)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def prefer(launcher: PoolerLauncher, certs: dict[str, object]) -> Pooler:
    return launcher(pool_config("tx", pool_size=2) | pool_config("sess", mode="session", pool_size=2),
                    _general(certs, "prefer", admin_password="admin_pw"))


def _dsn(p: Pooler, certs: dict[str, object], sslmode: str, user: str = "trust_user", **extra: object) -> str:
    return p.dsn("tx", user, sslmode=sslmode, sslrootcert=str(certs["ca"].cert), **extra)  # type: ignore[attr-defined]


# --- psycopg (libpq 18 in the binary wheel) ---------------------------------------------------------

@pytest.mark.parametrize("sslmode,encrypted", [
    ("disable", False), ("allow", False), ("prefer", True), ("require", True), ("verify-ca", True),
    ("verify-full", True),
])
@pytest.mark.parametrize("user", ["trust_user", "md5_user", "scram_user"])
def test_psycopg_every_sslmode(prefer: Pooler, certs: dict[str, object], sslmode: str, encrypted: bool,
                               user: str) -> None:
    with psycopg.connect(_dsn(prefer, certs, sslmode, user), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use is encrypted
        assert conn.execute("SELECT current_user, 40 + 2").fetchone() == (user, 42)


def test_psycopg_direct_tls(prefer: Pooler, certs: dict[str, object]) -> None:
    """PostgreSQL 17's sslnegotiation=direct: a ClientHello at once, ALPN 'postgresql'."""
    dsn = _dsn(prefer, certs, "verify-full", sslnegotiation="direct")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_verify_full_wrong_host_refused(prefer: Pooler, certs: dict[str, object]) -> None:
    # The certificate names localhost and 127.0.0.1: reaching it as "wrong.example" must fail.
    dsn = prefer.dsn("tx", sslmode="verify-full", sslrootcert=str(certs["ca"].cert),  # type: ignore[attr-defined]
                     host="wrong.example", hostaddr="127.0.0.1")
    with pytest.raises(psycopg.OperationalError, match="does not match host name|server certificate"):
        psycopg.connect(dsn)
    assert psycopg.connect(_dsn(prefer, certs, "verify-full")).close() is None  # still serving


def test_verify_ca_with_another_ca_refused(prefer: Pooler, certs: dict[str, object], tmp_path: Path) -> None:
    stranger = CertAuthority(tmp_path, "other CA")
    dsn = prefer.dsn("tx", sslmode="verify-ca", sslrootcert=str(stranger.cert))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(dsn)


def test_session_and_transaction_work_over_tls(prefer: Pooler, certs: dict[str, object]) -> None:
    """A big result and a big request over TLS: many records each way, nothing lost or reordered."""
    with psycopg.connect(prefer.dsn("sess", sslmode="require"), autocommit=True) as conn:
        rows = conn.execute("SELECT i, repeat('x', 1000) FROM generate_series(1, 3000) i").fetchall()
        assert [r[0] for r in rows] == list(range(1, 3001))
        big = "y" * 300_000
        assert conn.execute("SELECT length(%s)", (big,)).fetchone() == (300_000,)
    with psycopg.connect(_dsn(prefer, certs, "require")) as conn:
        with conn.transaction():
            assert conn.execute("SELECT count(*) FROM generate_series(1, 10)").fetchone() == (10,)


# --- asyncpg ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"])
def test_asyncpg_every_sslmode(prefer: Pooler, certs: dict[str, object], sslmode: str) -> None:
    import asyncpg

    async def run() -> tuple[object, bool]:
        url = (f"postgresql://scram_user:{PASSWORDS['scram_user']}@localhost:{prefer.port}/tx"
               f"?sslmode={sslmode}&sslrootcert={certs['ca'].cert}")  # type: ignore[attr-defined]
        conn = await asyncpg.connect(url, statement_cache_size=0, timeout=10)
        try:
            value = await conn.fetchval("SELECT 40 + 2")
            return value, conn._transport.get_extra_info("ssl_object") is not None  # noqa: SLF001
        finally:
            await conn.close()

    value, encrypted = asyncio.run(run())
    assert value == 42
    # asyncpg's allow tries clear text first, prefer tries TLS first
    assert encrypted is (sslmode not in ("disable", "allow"))


# --- psql ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"])
def test_psql_every_sslmode(prefer: Pooler, certs: dict[str, object], pg: Cluster, sslmode: str) -> None:
    env = dict(os.environ, PGSSLMODE=sslmode, PGSSLROOTCERT=str(certs["ca"].cert),  # type: ignore[attr-defined]
               PGPASSWORD=PASSWORDS["md5_user"], PGCONNECT_TIMEOUT="10")
    out = subprocess.run([pg.tool("psql"), "-X", "-h", "localhost", "-p", str(prefer.port), "-U", "md5_user",
                          "-d", "tx", "-c", r"\conninfo", "-c", "SELECT 'ok' AS r"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    assert ("SSL connection" in out.stdout) is (sslmode not in ("disable", "allow"))


# --- client certificates ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def verify_full(launcher: PoolerLauncher, certs: dict[str, object]) -> Pooler:
    return launcher(pool_config("tx", pool_size=1), _general(certs, "verify-full"))


def test_client_certificate_required_and_checked(verify_full: Pooler, certs: dict[str, object]) -> None:
    client = certs["client"]
    dsn = _dsn(verify_full, certs, "verify-full", sslcert=str(client.cert), sslkey=str(client.key))  # type: ignore[attr-defined]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
    # no certificate: the handshake fails (libpq reports the alert)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_dsn(verify_full, certs, "verify-full"))
    # a certificate whose CN is another user: refused with PostgreSQL's 28000
    other = certs["other"]
    dsn = _dsn(verify_full, certs, "verify-full", sslcert=str(other.cert), sslkey=str(other.key))  # type: ignore[attr-defined]
    with pytest.raises(psycopg.OperationalError,
                       match='certificate authentication failed for user "trust_user"'):
        psycopg.connect(dsn)
    # clear text: tls_mode verify-full requires TLS
    with pytest.raises(psycopg.OperationalError, match='no pg_hba.conf entry for host "127.0.0.1", '
                                                       'user "trust_user", database "tx", no encryption'):
        psycopg.connect(verify_full.dsn("tx", sslmode="disable"))


# --- tls_mode = require ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def require(launcher: PoolerLauncher, certs: dict[str, object]) -> Pooler:
    general = _general(certs, "require")
    general.pop("tls_ca_file")
    return launcher(pool_config("tx", pool_size=1), general)


def test_require_refuses_clear_text_with_postgresql_wording(require: Pooler) -> None:
    conn = RawConn.for_pooler(require)
    conn.send(startup_packet({"user": "md5_user", "database": "tx"}))
    kind, body = conn.recv_message()
    assert kind == b"E"
    fields = parse_error_fields(body)
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert fields["M"] == ('no pg_hba.conf entry for host "127.0.0.1", user "md5_user", database "tx", '
                           'no encryption')
    with psycopg.connect(require.dsn("tx", "md5_user", sslmode="require"), autocommit=True) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_tls_disabled_answers_n(start_pooler: PoolerLauncher) -> None:
    p = start_pooler(pool_config("tx", pool_size=1))
    with socket.create_connection((p.host, p.port), timeout=5) as s:
        s.sendall(ssl_request())
        assert s.recv(1) == b"N"
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(p.dsn("tx", sslmode="require"))


# --- hostile handshakes ----------------------------------------------------------------------------

def test_bytes_after_ssl_request_are_refused(prefer: Pooler) -> None:
    """CVE-2021-23214: clear-text bytes sent with the SSLRequest must not be read as if encrypted."""
    with socket.create_connection((prefer.host, prefer.port), timeout=5) as s:
        s.sendall(ssl_request() + b"\x00\x00\x00\x08\x00\x03\x00\x00")
        data = s.recv(4096)
    assert data[:1] == b"E"
    assert b"received unencrypted data after SSL request" in data
    assert b"08P01" in data


def test_garbage_handshake_leaves_pooler_serving(prefer: Pooler, certs: dict[str, object]) -> None:
    for junk in (b"\x16\x03\x01\x00\x05hello", b"\x16" + os.urandom(300)):
        with socket.create_connection((prefer.host, prefer.port), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    # after SSLRequest, a client that vanishes mid-handshake
    with socket.create_connection((prefer.host, prefer.port), timeout=5) as s:
        s.sendall(ssl_request())
        assert s.recv(1) == b"S"
        s.sendall(b"\x16\x03\x01")
    with psycopg.connect(_dsn(prefer, certs, "verify-full"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # none of them is still counted as a client
        deadline = time.monotonic() + 5
        while True:
            with psycopg.connect(prefer.dsn("pgdoorman", "admin", password="admin_pw"),
                                 autocommit=True) as admin:
                cur = admin.execute("SHOW CLIENTS")
                names = [d.name for d in cur.description or ()]
                clients = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            if len(clients) <= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(clients) <= 2, clients
        ours = [c for c in clients if c["database"] == "tx"]
        assert [c["tls"].split("/")[0] for c in ours] == ["TLSv1.3"], clients


def test_direct_tls_without_alpn_refused(prefer: Pooler) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((prefer.host, prefer.port), timeout=5) as raw:
        with context.wrap_socket(raw) as s:  # no ALPN offered
            data = s.recv(4096)
    assert data[:1] == b"E" and b"ALPN" in data


def test_tls_split_at_every_byte(prefer: Pooler, certs: dict[str, object]) -> None:
    """The SSLRequest and then the startup packet inside TLS, both sent a byte at a time."""
    context = ssl.create_default_context(cafile=str(certs["ca"].cert))  # type: ignore[attr-defined]
    with socket.create_connection((prefer.host, prefer.port), timeout=5) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in ssl_request():
            raw.sendall(bytes([b]))
            time.sleep(0.001)
        assert raw.recv(1) == b"S"
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            body = b"user\0trust_user\0database\0tx\0\0"
            packet = struct.pack("!ii", len(body) + 8, 196608) + body
            query = b"Q" + struct.pack("!i", 13) + b"SELECT 7\0"
            for b in packet + query:
                s.sendall(bytes([b]))
            seen = b""
            while b"Z\x00\x00\x00\x05I" not in seen[seen.find(b"SELECT 1"):] if b"SELECT 1" in seen else True:
                chunk = s.recv(65536)
                assert chunk, seen
                seen += chunk
    assert b"7" in seen


# --- reload ----------------------------------------------------------------------------------------

def test_certificate_reload_without_restart(launcher: PoolerLauncher, certs: dict[str, object],
                                            tmp_path: Path) -> None:
    ca: CertAuthority = certs["ca"]  # type: ignore[assignment]
    first = ca.issue("reload_a", "localhost", server=True)
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(first.cert.read_bytes())
    live_key.write_bytes(first.key.read_bytes())
    p = launcher(pool_config("tx", pool_size=2),
                 {"tls_mode": "prefer", "tls_certificate": str(live_cert), "tls_private_key": str(live_key)})

    def presented() -> bytes:
        context = ssl.create_default_context(cafile=str(ca.cert))
        with socket.create_connection((p.host, p.port), timeout=5) as raw:
            raw.sendall(ssl_request())
            assert raw.recv(1) == b"S"
            with context.wrap_socket(raw, server_hostname="localhost") as s:
                der = s.getpeercert(binary_form=True)
                assert der is not None
                return der

    assert presented() == der_of(first.cert)
    held = psycopg.connect(_dsn(p, certs, "verify-full"), autocommit=True)
    second = ca.issue("reload_b", "localhost", server=True)
    live_cert.write_bytes(second.cert.read_bytes())
    live_key.write_bytes(second.key.read_bytes())
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while presented() != der_of(second.cert):
        assert time.monotonic() < deadline, "the new certificate is not served after SIGHUP"
        time.sleep(0.1)
    # the connection made before the reload goes on with its own session
    assert held.execute("SELECT 5").fetchone() == (5,)
    held.close()
    assert p.alive()


# --- several workers -------------------------------------------------------------------------------

def test_tls_with_two_workers_cancel_and_small_pool(launcher: PoolerLauncher,
                                                    certs: dict[str, object]) -> None:
    """TLS clients never leave the worker that did their handshake: a pool smaller than the number
    of workers still serves them, and a cancel sent over TLS reaches the worker that owns the key."""
    p = launcher(pool_config("tx", pool_size=1), _general(certs, "prefer", workers=2))
    conns = [psycopg.connect(_dsn(p, certs, "require"), autocommit=True) for _ in range(4)]
    try:
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
        for c in conns:  # libpq 18 sends its CancelRequest over TLS too
            with c.cursor() as cur:
                timer = threading.Timer(0.3, c.cancel_safe)
                timer.start()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    cur.execute("SELECT pg_sleep(10)")
                timer.join()
            assert c.execute("SELECT 2").fetchone() == (2,)
    finally:
        for c in conns:
            c.close()
    assert "TLS handshake failed" not in p.log()
    assert "cancel request over TLS passed on" in p.log()  # at least one crossed to the other worker


# --- channel binding towards clients ---------------------------------------------------------------

@pytest.mark.parametrize("user", ["scram_user", "verifier_user"])
def test_libpq_channel_binding_require(launcher: PoolerLauncher, certs: dict[str, object], user: str) -> None:
    """libpq's channel_binding=require: SCRAM-SHA-256-PLUS with tls-server-end-point of our certificate,
    for a plain-text password and for a stored SCRAM verifier."""
    from helpers import scram_secret

    pools = pool_config("tx", pool_size=1, users=("scram_user",))
    pools["tx"]["users"]["1"] = {"username": "verifier_user", "password": scram_secret("verifier_pw"),
                                 "server_username": "scram_user", "server_password": PASSWORDS["scram_user"]}
    p = launcher(pools, _general(certs, "prefer"))
    password = "verifier_pw" if user == "verifier_user" else PASSWORDS["scram_user"]
    dsn = _dsn(p, certs, "verify-full", user, channel_binding="require", password=password)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # a wrong password still fails at the proof, with PLUS as without
    with pytest.raises(psycopg.OperationalError, match=f'password authentication failed for user "{user}"'):
        psycopg.connect(_dsn(p, certs, "verify-full", user, channel_binding="require", password="wrong"))
    # an unknown user gets as far as the proof too (no enumeration through -PLUS)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "nobody"'):
        psycopg.connect(_dsn(p, certs, "verify-full", "nobody", channel_binding="require", password="x"))
    # without TLS there is nothing to bind to: libpq refuses before sending a password
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(p.dsn("tx", user, password=password, sslmode="disable", channel_binding="require"))


def test_plus_not_offered_in_clear_text(prefer: Pooler) -> None:
    conn = RawConn.for_pooler(prefer)
    conn.send(startup_packet({"user": "scram_user", "database": "tx"}))
    kind, body = conn.recv_message()
    assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 10
    assert body[4:] == b"SCRAM-SHA-256\0\0"
