"""JWT logins end to end: a user whose password is "jwt-pkey-fpath:/path/public.pem" sends a signed JWT
as its cleartext password, through a real pgdoorman to the real PostgreSQL, with psycopg 3, asyncpg and
raw protocol bytes (for the exact ErrorResponse fields).

Covered: RS256 / ES256 / EdDSA keys and a certificate as the key container; exp (required), nbf and
iat with jwt_leeway; the subject claim and a custom jwt_claim; alg none and HS256-keyed-with-the-PEM
(algorithm confusion); aud with and without jwt_audience; TLS required on TCP unless
jwt_allow_cleartext, not on the unix socket; key rotation by editing the file (stat) and by SIGHUP;
unreadable or unusable key files failing closed while other users are served.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import signal
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from helpers import (
    Pooler,
    PoolerLauncher,
    RawConn,
    message,
    parse_error_fields,
    ssl_request,
    startup_packet,
    wait_until,
)
from tlscerts import CertAuthority

from pgdoorman.devcluster import Cluster

USER = "jwt_user"
AUDIENCE = "pgdoorman-tests"
CUSTOM_CLAIM = "preferred_username"
CUSTOM_LEEWAY = 5  # seconds, on the `custom` pooler (the default is 30)
CLEARTEXT_REFUSED = "JWT authentication requires an encrypted connection (TLS)"


def failed_for(user: str) -> str:
    return f'password authentication failed for user "{user}"'


# --- keys and tokens -------------------------------------------------------------------------------

def _rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(private_key: Any) -> bytes:
    data: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def private_pem(private_key: Any) -> bytes:
    data: bytes = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return data


def certificate_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwt issuer")])
    now = time.time()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 86400, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.UTC))
            .sign(private_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def payload(user: str = USER, **claims: Any) -> dict[str, Any]:
    """sub=user, iat=now, exp=now+300; keyword claims override (None removes). exp, nbf and iat
    given as ints are offsets from now."""
    now = int(time.time())
    out: dict[str, Any] = {"sub": user, "iat": now, "exp": now + 300}
    for k, v in claims.items():
        if k in ("exp", "nbf", "iat") and isinstance(v, int) and not isinstance(v, bool):
            v = now + v
        out[k] = v
    return {k: v for k, v in out.items() if v is not None}


def token(private_key: Any, alg: str = "RS256", user: str = USER, *, headers: dict[str, Any] | None = None,
          **claims: Any) -> str:
    return jwt.encode(payload(user, **claims), private_key, algorithm=alg, headers=headers)


def unsigned_token(alg: str = "none", user: str = USER) -> str:
    """Crafted by hand: PyJWT would not produce these."""
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(payload(user)).encode())}."


def hs256_with_public_key(pem: bytes, user: str = USER) -> str:
    """The classic algorithm confusion: HMAC keyed with the public key's PEM bytes."""
    signing_input = (b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64url(json.dumps(payload(user)).encode()))
    sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def tampered(tok: str, user: str) -> str:
    """A valid token whose payload is swapped for another user's, signature kept."""
    header, _, sig = tok.split(".")
    return f"{header}.{b64url(json.dumps(payload(user)).encode())}.{sig}"


@dataclass
class Keys:
    dir: Path
    private: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pem"

    def password(self, name: str) -> str:
        return f"jwt-pkey-fpath:{self.path(name)}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    k = Keys(tmp_path_factory.mktemp("jwtkeys"))
    k.private = {
        "rsa": _rsa(), "other_rsa": _rsa(), "rot_a": _rsa(), "rot_b": _rsa(),
        "hup_a": _rsa(), "hup_b": _rsa(),
        "p256": ec.generate_private_key(ec.SECP256R1()), "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "cert": _rsa(),
    }
    for name in ("rsa", "p256", "ed25519"):
        k.path(name).write_bytes(public_pem(k.private[name]))
    k.path("rot").write_bytes(public_pem(k.private["rot_a"]))
    k.path("hup").write_bytes(public_pem(k.private["hup_a"]))
    k.path("cert").write_bytes(certificate_pem(k.private["cert"]))
    # unusable key files: garbage, a private key, a short RSA key, a directory; "missing" is never written
    k.path("garbage").write_bytes(b"this is not a PEM file\n")
    k.path("private").write_bytes(private_pem(k.private["rsa"]))
    k.path("small").write_bytes(public_pem(_rsa(1024)))
    k.path("dir").mkdir()
    return k


# --- poolers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertAuthority, Any]:
    ca = CertAuthority(tmp_path_factory.mktemp("jwttls"))
    return ca, ca.issue("server", "localhost", server=True)


def _tls(certs: tuple[CertAuthority, Any]) -> dict[str, Any]:
    ca, server = certs
    return {"tls_mode": "prefer", "tls_certificate": str(server.cert), "tls_private_key": str(server.key),
            "tls_ca_file": str(ca.cert)}


def _jwt_user(name: str, keys: Keys, key: str) -> dict[str, Any]:
    return {"username": name, "password": keys.password(key), "server_username": "trust_user",
            "server_password": "", "pool_size": 2}


def _pool(pg: Cluster, users: list[dict[str, Any]]) -> dict[str, Any]:
    return {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
            "pool_mode": "transaction", "users": {str(i): u for i, u in enumerate(users)}}


# user -> key file, on the `main` pooler's pool "tx"
MAIN_USERS = {
    USER: "rsa", "es_user": "p256", "ed_user": "ed25519", "cert_user": "cert", "rot_user": "rot",
    "hup_user": "hup", "garbage_user": "garbage", "missing_user": "missing", "private_user": "private",
    "small_user": "small", "dir_user": "dir",
}


@pytest.fixture(scope="module")
def launcher(pg: Cluster, tmp_path_factory: pytest.TempPathFactory):
    launcher = PoolerLauncher(tmp_path_factory.mktemp("jwtpoolers"), pg)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def sockdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jwtsock")


@pytest.fixture(scope="module")
def main(launcher: PoolerLauncher, pg: Cluster, keys: Keys, certs: tuple[CertAuthority, Any],
         sockdir: Path) -> Pooler:
    """Default JWT settings, TLS offered, a unix socket; a normal md5_user next to the JWT users, and
    pool "jwtdb" whose only user is a JWT user."""
    users = [_jwt_user(name, keys, key) for name, key in MAIN_USERS.items()]
    users.append({"username": "md5_user", "password": "md5_pass", "server_username": "md5_user",
                  "server_password": "md5_pass", "pool_size": 2})
    pools = {"tx": _pool(pg, users), "jwtdb": _pool(pg, [_jwt_user(USER, keys, "rsa")])}
    return launcher(pools, {**_tls(certs), "unix_socket_dir": str(sockdir)})


@pytest.fixture(scope="module")
def custom(launcher: PoolerLauncher, pg: Cluster, keys: Keys, certs: tuple[CertAuthority, Any]) -> Pooler:
    """Every JWT setting changed: another claim, a short leeway, an audience, clear text allowed."""
    general = {**_tls(certs), "jwt_claim": CUSTOM_CLAIM, "jwt_leeway": f"{CUSTOM_LEEWAY}s",
               "jwt_audience": AUDIENCE, "jwt_allow_cleartext": True}
    return launcher({"tx": _pool(pg, [_jwt_user(USER, keys, "rsa")])}, general)


# --- clients ---------------------------------------------------------------------------------------

@dataclass
class Login:
    requests: list[int]  # the authentication request codes seen (3 = cleartext password, 0 = ok)
    error: dict[str, str] | None  # the ErrorResponse's fields, if refused
    current_user: str | None = None
    closed: bool = False  # the pooler closed the connection after the error


def raw_login(p: Pooler, user: str, password: str, *, tls: bool = True, database: str = "tx",
              certs: tuple[CertAuthority, Any] | None = None) -> Login:
    """Log in with raw protocol messages (TLS after an SSLRequest unless tls=False); on success ask
    for current_user."""
    conn = RawConn.for_pooler(p)
    with conn:
        if tls:
            conn.send(ssl_request())
            assert conn.recv_byte() == b"S"
            if certs is not None:
                context = ssl.create_default_context(cafile=str(certs[0].cert))
            else:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            conn.sock = context.wrap_socket(conn.sock, server_hostname="localhost")
        conn.send(startup_packet({"user": user, "database": database}))
        requests: list[int] = []
        while True:
            kind, body = conn.recv_message()
            if kind == b"E":
                _, closed = conn.read_all(timeout=5)
                return Login(requests, parse_error_fields(body), closed=closed)
            if kind == b"R":
                (code,) = struct.unpack("!I", body[:4])
                requests.append(code)
                if code == 3:
                    conn.send(message(b"p", password.encode() + b"\0"))
                elif code != 0:
                    return Login(requests, None)  # something else asked: the caller judges
            elif kind == b"Z":
                break
        rows, errors, _ = conn.query("SELECT current_user")
        assert not errors, errors
        return Login(requests, None, current_user=rows[0][0])


def tls_dsn(p: Pooler, password: str, user: str = USER, **extra: Any) -> str:
    return p.dsn("tx", user, password, sslmode="require", **extra)


def new_log(p: Pooler, since: int) -> str:
    return p.log()[since:]


def seconds(n: int) -> str:
    """A regex for n seconds as the pooler logs a time claim's distance: tokens carry whole seconds
    (made a little before the pooler checks them), the log rounds the float difference."""
    return "(" + "|".join(str(n + d) for d in (-1, 0, 1, 2)) + ")s"


def assert_logged(p: Pooler, since: int, text: str | re.Pattern[str]) -> None:
    """text (or the regex) appears in the log written after offset `since`."""
    if isinstance(text, re.Pattern):
        pattern = text
        found = lambda: pattern.search(new_log(p, since)) is not None  # noqa: E731
    else:
        found = lambda: text in new_log(p, since)  # noqa: E731
    assert wait_until(found, timeout=5), f"{text!r} not in the pooler log:\n{new_log(p, since)[-3000:]}"


def assert_refused(p: Pooler, user: str, password: str, reason: str | re.Pattern[str], **kw: Any) -> None:
    """A JWT login that gets as far as the password and then FATAL 28P01; `reason` (text, or a regex
    matched after "auth failed: ") is in the log."""
    since = len(p.log())
    login = raw_login(p, user, password, **kw)
    assert login.requests == [3], login
    assert login.error is not None, login
    assert (login.error["S"], login.error["C"], login.error["M"]) == ("FATAL", "28P01", failed_for(user))
    assert login.closed
    if isinstance(reason, re.Pattern):
        assert_logged(p, since, re.compile("auth failed: " + reason.pattern))
    else:
        assert_logged(p, since, f"auth failed: {reason}")


def assert_logs_in(p: Pooler, user: str, password: str, **kw: Any) -> None:
    login = raw_login(p, user, password, **kw)
    assert login.error is None and login.requests == [3, 0], (login, p.log()[-2000:])
    assert login.current_user == "trust_user"


# --- logins that work ------------------------------------------------------------------------------

def test_rs256_over_tls_psycopg(main: Pooler, keys: Keys, certs: tuple[CertAuthority, Any]) -> None:
    tok = token(keys.private["rsa"])
    with psycopg.connect(tls_dsn(main, tok), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user, session_user, 40 + 2").fetchone() == (
            "trust_user", "trust_user", 42)
        with conn.transaction():
            assert conn.execute("SELECT count(*) FROM pgbench_branches").fetchone() == (1,)
    # verify-full too, and the same (bearer) token again
    dsn = main.dsn("tx", USER, tok, sslmode="verify-full", sslrootcert=str(certs[0].cert))
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
    # the pooler asks for a cleartext password (request 3), then AuthenticationOk
    assert_logs_in(main, USER, tok, certs=certs)


@pytest.mark.parametrize("user,key,alg", [("es_user", "p256", "ES256"), ("ed_user", "ed25519", "EdDSA")])
def test_es256_and_eddsa(main: Pooler, keys: Keys, user: str, key: str, alg: str) -> None:
    tok = token(keys.private[key], alg, user)
    with psycopg.connect(tls_dsn(main, tok, user), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
    assert_logs_in(main, user, tok)


def test_certificate_as_key_file(main: Pooler, keys: Keys) -> None:
    assert_logs_in(main, "cert_user", token(keys.private["cert"], user="cert_user"))


def test_several_clients_share_the_pool(main: Pooler, keys: Keys) -> None:
    tok = token(keys.private["rsa"])
    conns = [psycopg.connect(tls_dsn(main, tok), autocommit=True) for _ in range(5)]
    try:
        for i, conn in enumerate(conns):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
    finally:
        for conn in conns:
            conn.close()


@pytest.mark.parametrize("claims", [
    {"exp": -10},  # expired 10 s ago, inside the default 30 s leeway
    {"nbf": 10},
    {"iat": 10},
    {"nbf": -60, "iat": -60},
    {"exp": 10 * 365 * 86400, "iss": "someone", "jti": "x"},  # unknown claims are ignored
], ids=["exp-in-leeway", "nbf-in-leeway", "iat-in-leeway", "past-nbf-iat", "long-lived-extra-claims"])
def test_times_within_leeway_pass(main: Pooler, keys: Keys, claims: dict[str, Any]) -> None:
    assert_logs_in(main, USER, token(keys.private["rsa"], **claims))


# --- logins that fail ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    "expired", "nbf-future", "iat-future", "no-exp", "exp-string", "wrong-key", "wrong-subject",
    "no-subject", "subject-not-string", "subject-case", "alg-none", "alg-None", "alg-NONE", "hs256-pem",
    "es256-for-rsa-key", "rs256-for-ec-key", "tampered", "aud-without-audience", "crit-header", "garbage",
    "empty",
])
def test_refused(main: Pooler, keys: Keys, case: str) -> None:
    rsa_key, rsa_path = keys.private["rsa"], keys.path("rsa")
    user = USER
    cases: dict[str, tuple[Any, str | re.Pattern[str]]] = {
        "expired": (lambda: token(rsa_key, exp=-120),
                    re.compile(rf"JWT expired {seconds(120)} ago \(leeway 30s\)")),
        "nbf-future": (lambda: token(rsa_key, nbf=600),
                       re.compile(rf"JWT not valid yet: nbf is {seconds(600)} in the future")),
        "iat-future": (lambda: token(rsa_key, iat=600),
                       re.compile(rf"JWT issued in the future: iat is {seconds(600)} ahead")),
        "no-exp": (lambda: token(rsa_key, exp=None), "JWT has no 'exp' claim (tokens must expire)"),
        "exp-string": (lambda: token(rsa_key, exp="9999999999"),
                       "JWT claim 'exp' is not a finite number: '9999999999'"),
        "wrong-key": (lambda: token(keys.private["other_rsa"]),
                      f"JWT signature does not match the key {rsa_path}"),
        "wrong-subject": (lambda: token(rsa_key, sub="md5_user"),
                          "JWT claim 'sub' is 'md5_user', not the user 'jwt_user'"),
        "no-subject": (lambda: token(rsa_key, sub=None), "JWT has no claim 'sub'"),
        "subject-not-string": (lambda: token(rsa_key, sub=["jwt_user"]),
                               "JWT claim 'sub' is not a string: ['jwt_user']"),
        "subject-case": (lambda: token(rsa_key, sub="JWT_USER"),
                         "JWT claim 'sub' is 'JWT_USER', not the user 'jwt_user'"),
        "alg-none": (lambda: unsigned_token("none"), "JWT is unsigned (alg 'none')"),
        "alg-None": (lambda: unsigned_token("None"), "JWT is unsigned (alg 'none')"),
        "alg-NONE": (lambda: unsigned_token("NONE"), "JWT is unsigned (alg 'none')"),
        "hs256-pem": (lambda: hs256_with_public_key(rsa_path.read_bytes()),
                      "JWT algorithm 'HS256' is symmetric; only public-key signatures are accepted"),
        "es256-for-rsa-key": (lambda: token(keys.private["p256"], "ES256"),
                              f"JWT algorithm 'ES256' does not match the key {rsa_path}"),
        "rs256-for-ec-key": (lambda: token(rsa_key, user="es_user"),
                             f"JWT algorithm 'RS256' does not match the key {keys.path('p256')}"),
        "tampered": (lambda: tampered(token(keys.private["rsa"], sub="md5_user"), USER),
                     f"JWT signature does not match the key {rsa_path}"),
        "aud-without-audience": (lambda: token(rsa_key, aud=AUDIENCE),
                                 "JWT has an 'aud' claim but no audience is configured"),
        # PyJWT's header parser refuses it already ("JWT header is malformed: Unsupported critical
        # extension"), before pgdoorman's own check ("JWT header has critical extensions")
        "crit-header": (lambda: token(rsa_key, headers={"crit": ["exp"]}), "JWT header "),
        "garbage": (lambda: "not-a-jwt", "JWT is not three dot-separated base64url parts"),
        "empty": (lambda: "", "JWT is not three dot-separated base64url parts"),
    }
    make, reason = cases[case]
    if case == "rs256-for-ec-key":
        user = "es_user"
    assert_refused(main, user, make(), reason)


def test_refused_psycopg_message(main: Pooler, keys: Keys) -> None:
    """What a real driver shows for an expired token."""
    since = len(main.log())
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(tls_dsn(main, token(keys.private["rsa"], exp=-3600)))
    assert f"FATAL:  {failed_for(USER)}" in str(info.value)
    assert_logged(main, since, re.compile(rf"auth failed: JWT expired {seconds(3600)} ago \(leeway 30s\)"))
    # and the same pooler goes on serving
    with psycopg.connect(tls_dsn(main, token(keys.private["rsa"])), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- settings: jwt_claim, jwt_leeway, jwt_audience -------------------------------------------------

def test_custom_claim(custom: Pooler, keys: Keys) -> None:
    rsa_key = keys.private["rsa"]
    assert_logs_in(custom, USER, token(rsa_key, sub="someone-else", aud=AUDIENCE, **{CUSTOM_CLAIM: USER}))
    assert_refused(custom, USER, token(rsa_key, aud=AUDIENCE), f"JWT has no claim {CUSTOM_CLAIM!r}")
    assert_refused(custom, USER, token(rsa_key, aud=AUDIENCE, **{CUSTOM_CLAIM: "md5_user"}),
                   f"JWT claim {CUSTOM_CLAIM!r} is 'md5_user', not the user 'jwt_user'")


def test_custom_leeway(custom: Pooler, keys: Keys) -> None:
    claims = {"aud": AUDIENCE, CUSTOM_CLAIM: USER}
    rsa_key = keys.private["rsa"]
    assert_refused(custom, USER, token(rsa_key, exp=-15, **claims),
                   re.compile(rf"JWT expired {seconds(15)} ago \(leeway {CUSTOM_LEEWAY}s\)"))
    assert_refused(custom, USER, token(rsa_key, nbf=60, **claims), "JWT not valid yet")
    assert_logs_in(custom, USER, token(rsa_key, exp=-2, **claims))


@pytest.mark.parametrize("aud,ok", [
    (AUDIENCE, True), (["another-service", AUDIENCE], True), ("another-service", False),
    (["another-service"], False), (None, False),
], ids=["same", "in-list", "other", "other-list", "no-aud"])
def test_audience(custom: Pooler, keys: Keys, aud: Any, ok: bool) -> None:
    tok = token(keys.private["rsa"], aud=aud, **{CUSTOM_CLAIM: USER})
    if ok:
        assert_logs_in(custom, USER, tok)
    elif aud is None:
        assert_refused(custom, USER, tok, "JWT has no 'aud' claim")
    else:
        assert_refused(custom, USER, tok, f"JWT audience is not {AUDIENCE!r}")


# --- transport: TLS, clear text, unix socket -------------------------------------------------------

def test_cleartext_refused(main: Pooler, keys: Keys) -> None:
    tok = token(keys.private["rsa"])
    since = len(main.log())
    login = raw_login(main, USER, tok, tls=False)
    # refused before any password is asked for: the token never crosses the wire
    assert login.requests == []
    assert login.error is not None
    assert (login.error["S"], login.error["C"], login.error["M"]) == ("FATAL", "28000", CLEARTEXT_REFUSED)
    assert login.closed
    assert_logged(main, since, "refused: JWT over clear text (jwt_allow_cleartext = false)")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(main.dsn("tx", USER, tok, sslmode="disable"))
    assert f"FATAL:  {CLEARTEXT_REFUSED}" in str(info.value)
    # a normal user is fine in clear text, on the same pooler
    with psycopg.connect(main.dsn("tx", "md5_user", "md5_pass", sslmode="disable"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5_user",)


def test_cleartext_allowed(custom: Pooler, keys: Keys) -> None:
    tok = token(keys.private["rsa"], aud=AUDIENCE, **{CUSTOM_CLAIM: USER})
    with psycopg.connect(custom.dsn("tx", USER, tok, sslmode="disable"), autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
    assert_logs_in(custom, USER, tok, tls=False)
    assert_refused(custom, USER, token(keys.private["other_rsa"], aud=AUDIENCE, **{CUSTOM_CLAIM: USER}),
                   "JWT signature does not match", tls=False)


def test_unix_socket_needs_no_tls(main: Pooler, keys: Keys, sockdir: Path) -> None:
    assert (sockdir / f".s.PGSQL.{main.port}").exists()
    dsn = main.dsn("tx", USER, token(keys.private["rsa"]), host=str(sockdir))
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(main.dsn("tx", USER, token(keys.private["rsa"], exp=-600), host=str(sockdir)))
    assert f"FATAL:  {failed_for(USER)}" in str(info.value)


def test_asyncpg_ssl_require(main: Pooler, keys: Keys) -> None:
    import asyncpg

    async def run() -> None:
        kw = {"host": main.host, "port": main.port, "user": USER, "database": "tx",
              "statement_cache_size": 0, "timeout": 10}
        conn = await asyncpg.connect(password=token(keys.private["rsa"]), ssl="require", **kw)
        try:
            assert conn._transport.get_extra_info("ssl_object") is not None  # noqa: SLF001
            assert await conn.fetchval("SELECT current_user") == "trust_user"
            assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(password=token(keys.private["other_rsa"]), ssl="require", **kw)
        assert info.value.sqlstate == "28P01"
        assert info.value.args[0] == failed_for(USER)
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as refused:
            await asyncpg.connect(password=token(keys.private["rsa"]), ssl="disable", **kw)
        assert refused.value.sqlstate == "28000"
        assert refused.value.args[0] == CLEARTEXT_REFUSED

    asyncio.run(run())


# --- key files: rotation, reload, unusable files ---------------------------------------------------

def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Same inode (and, for two RSA-2048 keys, the same size): only the mtime tells."""
    before = _stamp(path)
    path.write_bytes(data)
    while _stamp(path) == before:  # coarse timestamps: make sure the change is visible
        time.sleep(0.01)
        path.write_bytes(data)


def test_key_rotation_by_editing_the_file(main: Pooler, keys: Keys) -> None:
    path, a, b = keys.path("rot"), keys.private["rot_a"], keys.private["rot_b"]
    user = "rot_user"
    assert_logs_in(main, user, token(a, user=user))
    assert_refused(main, user, token(b, user=user), f"JWT signature does not match the key {path}")
    # atomic replacement (a new inode), as a deploy tool or a Kubernetes secret volume does
    staged = path.with_suffix(".new")
    staged.write_bytes(public_pem(b))
    os.replace(staged, path)
    assert_logs_in(main, user, token(b, user=user))
    assert_refused(main, user, token(a, user=user), f"JWT signature does not match the key {path}")
    # rewritten in place: same inode, same size, only the mtime changes
    assert len(public_pem(a)) == len(public_pem(b))
    rewrite_in_place(path, public_pem(a))
    assert_logs_in(main, user, token(a, user=user))
    assert_refused(main, user, token(b, user=user), f"JWT signature does not match the key {path}")
    # broken, then deleted: fail closed (the key that worked is not kept); fixed: works again
    rewrite_in_place(path, b"garbage\n")
    assert_refused(main, user, token(a, user=user), f"JWT key file {path}: not a PEM file")
    path.unlink()
    assert_refused(main, user, token(a, user=user), f"JWT key file {path}: cannot read")
    path.write_bytes(public_pem(a))
    assert_logs_in(main, user, token(a, user=user))


def worker_count(p: Pooler) -> int:
    found = re.search(r"starting with .*, (\d+) workers?\b", p.log())
    assert found, p.log()[:2000]
    return int(found.group(1))


def logins_on_every_worker(p: Pooler, user: str, tok: str) -> None:
    """Log in with tok on each worker process (each has its own key cache): connections are held,
    so the acceptor, which gives each one to the worker with the fewest clients, spreads them."""
    workers = worker_count(p)
    since = len(p.log())
    held: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(4 * workers):
            held.append(psycopg.connect(tls_dsn(p, tok, user), autocommit=True))
            assert held[-1].execute("SELECT current_user").fetchone() == ("trust_user",)
            pids = set(re.findall(rf"\d (\d+) INFO C-\d+: tx/{user}@\S+ login ok", new_log(p, since)))
            if len(pids) >= workers:
                return
            time.sleep(0.05)
        raise AssertionError(f"logins reached {len(pids)} of {workers} workers:\n{new_log(p, since)}")
    finally:
        for conn in held:
            conn.close()


def test_key_rotation_after_sighup(main: Pooler, keys: Keys) -> None:
    """A rewrite that puts the mtime back (same size, same inode) is still seen, by its ctime; and
    SIGHUP empties every worker's key cache, so the file is read again in any case."""
    path, a, b = keys.path("hup"), keys.private["hup_a"], keys.private["hup_b"]
    user = "hup_user"
    logins_on_every_worker(main, user, token(a, user=user))  # key A now cached everywhere
    st = os.stat(path)
    path.write_bytes(public_pem(b))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _stamp(path) == (st.st_mtime_ns, st.st_size, st.st_ino)
    logins_on_every_worker(main, user, token(b, user=user))  # seen at once: the ctime moved
    reloads = main.log().count("RELOAD: config")
    since = len(main.log())
    main.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: main.log().count("RELOAD: config") > reloads, timeout=10), main.log()[-3000:]
    assert "refused" not in new_log(main, since)
    logins_on_every_worker(main, user, token(b, user=user))
    for _ in range(3):
        assert_refused(main, user, token(a, user=user), f"JWT signature does not match the key {path}")
    # other users were not disturbed by the reload
    assert_logs_in(main, USER, token(keys.private["rsa"]))


@pytest.mark.parametrize("user,reason", [
    ("garbage_user", "not a PEM file"),
    ("missing_user", "cannot read: No such file or directory"),
    ("dir_user", "cannot read: Is a directory"),
    ("private_user", "holds a private key"),
    ("small_user", "RSA key is 1024 bits, at least 2048 are required"),
])
def test_unusable_key_file(main: Pooler, keys: Keys, user: str, reason: str) -> None:
    key = MAIN_USERS[user]
    # whatever the token, even one signed by the private key whose public half is in the file
    tok = token(keys.private["rsa"], user=user)
    assert_refused(main, user, tok, f"JWT key file {keys.path(key)}: {reason}")
    assert main.alive()
    # the pooler goes on serving the other users, JWT or not
    with psycopg.connect(main.dsn("tx", "md5_user", "md5_pass", sslmode="require"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5_user",)
    assert_logs_in(main, USER, token(keys.private["rsa"]))


# --- no enumeration ---------------------------------------------------------------------------------

def test_unknown_user_of_jwt_database_gets_the_same_request(main: Pooler, keys: Keys) -> None:
    known = raw_login(main, USER, "not-a-jwt", database="jwtdb")
    assert known.requests == [3] and known.error is not None
    unknown = raw_login(main, "no_such_user", "not-a-jwt", database="jwtdb")
    assert unknown.requests == known.requests
    assert unknown.error is not None
    assert (unknown.error["C"], unknown.error["M"]) == (known.error["C"],
                                                         known.error["M"].replace(USER, "no_such_user"))
    # and in clear text both get the same 28000 before any password request
    known = raw_login(main, USER, "not-a-jwt", database="jwtdb", tls=False)
    unknown = raw_login(main, "no_such_user", "not-a-jwt", database="jwtdb", tls=False)
    assert known.requests == unknown.requests == []
    assert known.error is not None and unknown.error is not None
    assert known.error["C"] == unknown.error["C"] == "28000"
    assert known.error["M"] == unknown.error["M"]
