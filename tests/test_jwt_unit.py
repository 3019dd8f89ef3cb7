"""Unit tests for pgdoorman.auth.jwt: key loading, the key cache and JWT verification (no server needed)."""

import base64
import datetime
import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from pgdoorman.auth.jwt import (
    JWT_PREFIX,
    MAX_TOKEN_LEN,
    JwtKey,
    JwtKeyCache,
    jwt_key_path,
    verify_jwt,
)
from pgdoorman.auth.secrets import AuthFailed

NOW = 1_700_000_000.0
USER = "alice"


# --- keys and token helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(private_key: Any) -> bytes:
    data: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def load_public(tmp_path: Path, private_key: Any, name: str = "key.pem") -> JwtKey:
    return JwtKey.load(write(tmp_path, name, public_pem(private_key)))


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": USER, "iat": int(NOW) - 10, "exp": int(NOW) + 300}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(private_key: Any, alg: str, payload: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(payload, private_key, algorithm=alg, headers=headers)


def pem_block(label: bytes) -> bytes:
    return b"-----BEGIN " + label + b"-----\nAAAA\n-----END " + label + b"-----\n"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def check(token: str, key: JwtKey, **kw: Any) -> dict[str, Any]:
    kw.setdefault("user", USER)
    kw.setdefault("now", NOW)
    return verify_jwt(token, key, **kw)


def refused(token: str, key: JwtKey, match: str, **kw: Any) -> None:
    with pytest.raises(AuthFailed, match=match):
        check(token, key, **kw)


# --- jwt_key_path ----------------------------------------------------------------------------------

def test_jwt_key_path() -> None:
    assert jwt_key_path(JWT_PREFIX + "/etc/pgdoorman/jwt.pem") == "/etc/pgdoorman/jwt.pem"
    assert jwt_key_path("jwt-pkey-fpath:relative.pem") == "relative.pem"
    assert jwt_key_path(JWT_PREFIX) is None
    assert jwt_key_path("secret") is None
    assert jwt_key_path("") is None
    assert jwt_key_path("JWT-PKEY-FPATH:/x.pem") is None  # the prefix is case-sensitive
    assert jwt_key_path(" jwt-pkey-fpath:/x.pem") is None


# --- key loading -----------------------------------------------------------------------------------

def test_load_rsa(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key = load_public(tmp_path, rsa_key)
    assert key.algorithms == ("RS256", "RS384", "RS512")
    assert key.description == "RSA-2048"
    assert key.path == str(tmp_path / "key.pem")
    assert "PUBLIC" not in repr(key) and "public_key" not in repr(key)


def test_load_traditional_rsa_public_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    assert pem.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    assert JwtKey.load(write(tmp_path, "k.pem", pem)).algorithms == ("RS256", "RS384", "RS512")


def test_load_ec_and_eddsa(tmp_path: Path, p256_key: ec.EllipticCurvePrivateKey,
                           ed_key: ed25519.Ed25519PrivateKey) -> None:
    assert load_public(tmp_path, p256_key, "p256.pem").algorithms == ("ES256",)
    assert load_public(tmp_path, ec.generate_private_key(ec.SECP384R1()), "p384.pem").algorithms == ("ES384",)
    assert load_public(tmp_path, ec.generate_private_key(ec.SECP521R1()), "p521.pem").algorithms == ("ES512",)
    assert load_public(tmp_path, ed_key, "ed.pem").algorithms == ("EdDSA",)
    assert load_public(tmp_path, ed448.Ed448PrivateKey.generate(), "ed448.pem").description == "Ed448"


def test_rsa_1024_refused(tmp_path: Path) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match=r"small\.pem: RSA key is 1024 bits, at least 2048"):
        load_public(tmp_path, small, "small.pem")


def test_unsupported_key_types_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"k1\.pem: EC curve secp256k1 is not supported"):
        load_public(tmp_path, ec.generate_private_key(ec.SECP256K1()), "k1.pem")
    with pytest.raises(ValueError, match=r"x\.pem: X25519PublicKey keys are not supported"):
        load_public(tmp_path, x25519.X25519PrivateKey.generate(), "x.pem")


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8,
                                 serialization.PrivateFormat.TraditionalOpenSSL])
def test_private_key_refused(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                             fmt: serialization.PrivateFormat) -> None:
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    path = write(tmp_path, "priv.pem", pem)
    with pytest.raises(ValueError, match="private key") as info:
        JwtKey.load(path)
    msg = str(info.value)
    assert path in msg
    body_line = pem.splitlines()[1].decode()
    assert body_line not in msg  # never echo key material


def test_private_key_alongside_public_key_refused(tmp_path: Path,
                                                  p256_key: ec.EllipticCurvePrivateKey) -> None:
    priv = p256_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    with pytest.raises(ValueError, match="private key"):
        JwtKey.load(write(tmp_path, "both.pem", public_pem(p256_key) + priv))


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"nope\.pem: cannot read: No such file"):
        JwtKey.load(path)


def test_not_pem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"junk\.pem: not a PEM file"):
        JwtKey.load(write(tmp_path, "junk.pem", b"hello world\n"))
    with pytest.raises(ValueError, match="cannot parse the PUBLIC KEY"):
        JwtKey.load(write(tmp_path, "bad.pem", pem_block(b"PUBLIC KEY")))
    with pytest.raises(ValueError, match="found 0"):
        JwtKey.load(write(tmp_path, "dh.pem", pem_block(b"DH PARAMETERS")))


def test_two_keys_refused(tmp_path: Path, p256_key: ec.EllipticCurvePrivateKey,
                          ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match="exactly one PUBLIC KEY or CERTIFICATE block, found 2"):
        JwtKey.load(write(tmp_path, "two.pem", public_pem(p256_key) + public_pem(ed_key)))


def test_oversized_key_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="larger than"):
        JwtKey.load(write(tmp_path, "big.pem", b"-----BEGIN PUBLIC KEY-----\n" + b"A" * 70000))


def self_signed_cert(private_key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwt issuer")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private_key.public_key()).serial_number(1)
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))  # long expired
            .sign(private_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_certificate_as_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key = JwtKey.load(write(tmp_path, "cert.pem", self_signed_cert(rsa_key)))
    assert key.algorithms == ("RS256", "RS384", "RS512")
    assert check(sign(rsa_key, "RS256", claims()), key)["sub"] == USER


# --- verification: accepted ------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512"])
def test_valid_rsa(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    key = load_public(tmp_path, rsa_key)
    got = check(sign(rsa_key, alg, claims(role="reader")), key)
    assert got == claims(role="reader")


def test_valid_es256(tmp_path: Path, p256_key: ec.EllipticCurvePrivateKey) -> None:
    assert check(sign(p256_key, "ES256", claims()), load_public(tmp_path, p256_key))["sub"] == USER


def test_valid_eddsa(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    assert check(sign(ed_key, "EdDSA", claims()), load_public(tmp_path, ed_key))["sub"] == USER


def test_real_clock_used_by_default(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    key = load_public(tmp_path, ed_key)
    now = int(time.time())
    assert verify_jwt(sign(ed_key, "EdDSA", claims(iat=now, exp=now + 60)), key, user=USER)["sub"] == USER
    with pytest.raises(AuthFailed, match="JWT expired"):
        verify_jwt(sign(ed_key, "EdDSA", claims()), key, user=USER)  # NOW is in 2023


def test_custom_claim(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    key = load_public(tmp_path, ed_key)
    token = sign(ed_key, "EdDSA", claims(sub=42, preferred_username=USER))  # sub's type is not our concern
    assert check(token, key, claim="preferred_username")["preferred_username"] == USER
    refused(token, key, "claim 'sub' is not a string")


# --- verification: time claims ---------------------------------------------------------------------

@pytest.fixture
def ed_pub(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> JwtKey:
    return load_public(tmp_path, ed_key)


def test_expired(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    token = sign(ed_key, "EdDSA", claims(exp=int(NOW) - 31))
    refused(token, ed_pub, "JWT expired 31s ago")
    refused(token, ed_pub, "JWT expired", leeway=0)


def test_expired_within_leeway(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    token = sign(ed_key, "EdDSA", claims(exp=int(NOW) - 29))
    assert check(token, ed_pub)["sub"] == USER
    refused(token, ed_pub, "JWT expired", leeway=10)
    # Valid strictly before exp (+ leeway): the boundary second itself is expired.
    at = sign(ed_key, "EdDSA", claims(exp=int(NOW)))
    refused(at, ed_pub, "JWT expired", leeway=0)
    assert check(at, ed_pub, leeway=0, now=NOW - 0.5)


def test_not_yet_valid(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    token = sign(ed_key, "EdDSA", claims(nbf=int(NOW) + 60))
    refused(token, ed_pub, "not valid yet: nbf is 60s in the future")
    assert check(sign(ed_key, "EdDSA", claims(nbf=int(NOW) + 20)), ed_pub)  # within leeway


def test_issued_in_future(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    refused(sign(ed_key, "EdDSA", claims(iat=int(NOW) + 120)), ed_pub, "issued in the future")
    assert check(sign(ed_key, "EdDSA", claims(iat=int(NOW) + 20)), ed_pub)


def test_missing_exp(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    refused(sign(ed_key, "EdDSA", claims(exp=None)), ed_pub, "no 'exp' claim")


@pytest.mark.parametrize("exp", [float("inf"), float("nan"), True, "1800000000", 10**400, None])
def test_exp_not_a_finite_number(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey, exp: Any) -> None:
    payload = claims()
    payload["exp"] = exp  # None -> JSON null: present but not a number
    refused(sign(ed_key, "EdDSA", payload), ed_pub, "claim 'exp' is not a finite number")


def test_bad_nbf_type(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    refused(sign(ed_key, "EdDSA", claims(nbf="soon")), ed_pub, "claim 'nbf' is not a finite number")


def test_bad_leeway(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    with pytest.raises(ValueError, match="leeway"):
        check(sign(ed_key, "EdDSA", claims()), ed_pub, leeway=-1)


# --- verification: subject -------------------------------------------------------------------------

def test_wrong_subject(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    token = sign(ed_key, "EdDSA", claims(sub="bob"))
    refused(token, ed_pub, "JWT claim 'sub' is 'bob', not the user 'alice'")
    # Exact match only: no case folding, no trimming.
    refused(sign(ed_key, "EdDSA", claims(sub="Alice")), ed_pub, "not the user")
    refused(sign(ed_key, "EdDSA", claims(sub="alice ")), ed_pub, "not the user")


def test_missing_claim(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    refused(sign(ed_key, "EdDSA", claims(sub=None)), ed_pub, "JWT has no claim 'sub'")
    refused(sign(ed_key, "EdDSA", claims()), ed_pub, "JWT has no claim 'email'", claim="email")


@pytest.mark.parametrize("value", [["alice"], {"name": "alice"}, 1, True])
def test_non_string_claim(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey, value: Any) -> None:
    refused(sign(ed_key, "EdDSA", claims(sub=value)), ed_pub, "claim 'sub' is not a string")


def test_long_claim_value_truncated_in_message(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    with pytest.raises(AuthFailed) as info:
        check(sign(ed_key, "EdDSA", claims(sub="x" * 5000)), ed_pub)
    assert len(str(info.value)) < 200


# --- verification: audience ------------------------------------------------------------------------

def test_audience(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    token = sign(ed_key, "EdDSA", claims(aud=["pgdoorman", "other"]))
    refused(token, ed_pub, "has an 'aud' claim but no audience is configured")
    assert check(token, ed_pub, audience="pgdoorman")["aud"] == ["pgdoorman", "other"]
    refused(token, ed_pub, "audience is not 'db'", audience="db")
    refused(sign(ed_key, "EdDSA", claims()), ed_pub, "no 'aud' claim", audience="pgdoorman")


# --- verification: signature and algorithm ---------------------------------------------------------

def test_wrong_key(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey) -> None:
    key = load_public(tmp_path, rsa_key)
    refused(sign(other_rsa_key, "RS256", claims()), key, "JWT signature does not match the key")


def test_tampered_payload(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key = load_public(tmp_path, rsa_key)
    header, _, sig = sign(rsa_key, "RS256", claims()).split(".")
    forged = f"{header}.{b64json(claims(sub='postgres'))}.{sig}"
    refused(forged, key, "signature does not match", user="postgres")
    refused(f"{header}.{b64json(claims())}.", key, "signature does not match")  # signature stripped


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(ed_pub: JwtKey, alg: str) -> None:
    token = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}."
    refused(token, ed_pub, r"unsigned \(alg 'none'\)")


def test_alg_missing(ed_pub: JwtKey) -> None:
    refused(f"{b64json({'typ': 'JWT'})}.{b64json(claims())}.c2ln", ed_pub, "header has no 'alg'")
    refused(f"{b64json({'alg': 256})}.{b64json(claims())}.c2ln", ed_pub, "header has no 'alg'")


@pytest.mark.parametrize("alg,digest", [("HS256", hashlib.sha256), ("HS512", hashlib.sha512)])
def test_hmac_with_public_key_as_secret(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, alg: str,
                                        digest: Any) -> None:
    # The classic algorithm-confusion attack: HMAC keyed with the (public) PEM bytes.
    pem = public_pem(rsa_key)
    key = JwtKey.load(write(tmp_path, "k.pem", pem))
    signing_input = f"{b64json({'alg': alg, 'typ': 'JWT'})}.{b64json(claims())}"
    mac = hmac.new(pem, signing_input.encode("ascii"), digest).digest()
    refused(f"{signing_input}.{b64url(mac)}", key, f"algorithm '{alg}' is symmetric")


def test_alg_mismatch(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                      p256_key: ec.EllipticCurvePrivateKey) -> None:
    rsa_pub = load_public(tmp_path, rsa_key, "rsa.pem")
    refused(sign(p256_key, "ES256", claims()), rsa_pub,
            r"algorithm 'ES256' does not match the key .*rsa\.pem \(RSA-2048 allows RS256, RS384, RS512\)")
    ec_pub = load_public(tmp_path, p256_key, "ec.pem")
    refused(sign(rsa_key, "RS256", claims()), ec_pub, "algorithm 'RS256' does not match")
    refused(sign(rsa_key, "PS256", claims()), rsa_pub, "algorithm 'PS256' does not match")  # PS* not enabled
    p384 = ec.generate_private_key(ec.SECP384R1())
    refused(sign(p384, "ES384", claims()), ec_pub, "algorithm 'ES384' does not match")  # curve fixes the alg


def test_crit_header_refused(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    header = {"alg": "EdDSA", "crit": ["exp"], "exp": 1}
    signing_input = f"{b64json(header)}.{b64json(claims())}"
    sig = ed_key.sign(signing_input.encode("ascii"))
    refused(f"{signing_input}.{b64url(sig)}", ed_pub, "JWT header")


# --- verification: shape ---------------------------------------------------------------------------

def test_oversized_token(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    token = sign(ed_key, "EdDSA", claims(pad="x" * MAX_TOKEN_LEN))
    refused(token, ed_pub, f"more than {MAX_TOKEN_LEN}")
    refused("a" * (MAX_TOKEN_LEN + 1), ed_pub, f"more than {MAX_TOKEN_LEN}")


@pytest.mark.parametrize("token", ["", "secret", "a.b", "a.b.c.d", "...", "é.b.c"])
def test_not_three_parts(ed_pub: JwtKey, token: str) -> None:
    refused(token, ed_pub, "not three dot-separated")


@pytest.mark.parametrize("header", ["!!!!", b64url(b"not json"), b64url(b"[1,2]"), ""])
def test_garbage_header(ed_pub: JwtKey, header: str) -> None:
    refused(f"{header}.{b64json(claims())}.c2ln", ed_pub, "JWT header is malformed")


def test_garbage_payload(ed_key: ed25519.Ed25519PrivateKey, ed_pub: JwtKey) -> None:
    signing_input = f"{b64json({'alg': 'EdDSA'})}.{b64url(b'[1]')}"
    sig = b64url(ed_key.sign(signing_input.encode("ascii")))
    refused(f"{signing_input}.{sig}", ed_pub, "JWT refused")


# --- key cache -------------------------------------------------------------------------------------

def test_cache_reuses_and_rereads(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                                  ed_key: ed25519.Ed25519PrivateKey) -> None:
    cache = JwtKeyCache()
    path = write(tmp_path, "k.pem", public_pem(rsa_key))
    first = cache.get(path)
    assert cache.get(path) is first
    # Rewrite with another key (different size, and force a different mtime too).
    st = os.stat(path)
    Path(path).write_bytes(public_pem(ed_key))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = cache.get(path)
    assert second is not first and second.algorithms == ("EdDSA",)
    assert check(sign(ed_key, "EdDSA", claims()), second)
    assert len(cache) == 1


def test_cache_fails_closed(tmp_path: Path, ed_key: ed25519.Ed25519PrivateKey) -> None:
    cache = JwtKeyCache()
    path = write(tmp_path, "k.pem", public_pem(ed_key))
    cache.get(path)
    Path(path).write_bytes(b"garbage, not a key")
    with pytest.raises(ValueError, match="not a PEM file"):
        cache.get(path)
    assert len(cache) == 0
    Path(path).write_bytes(public_pem(ed_key))
    assert cache.get(path).algorithms == ("EdDSA",)
    os.unlink(path)
    with pytest.raises(ValueError, match="cannot read"):
        cache.get(path)
    assert len(cache) == 0


def same_stamp_rewrite(path: str, data: bytes) -> None:
    """Rewrite in place (same inode) with same-size content and the old mtime: invisible to the stamp."""
    st = os.stat(path)
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)


def test_cache_clear_forces_reread(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                                   other_rsa_key: rsa.RSAPrivateKey) -> None:
    cache = JwtKeyCache()
    path = write(tmp_path, "k.pem", public_pem(rsa_key))
    first = cache.get(path)
    same_stamp_rewrite(path, public_pem(other_rsa_key))
    # mtime, size and inode put back: the ctime in the stamp still sees the rewrite
    assert cache.get(path) is not first
    cache.clear()
    assert len(cache) == 0
    key = cache.get(path)
    assert key is not first
    assert check(sign(other_rsa_key, "RS256", claims()), key)
    refused(sign(rsa_key, "RS256", claims()), key, "signature does not match")


def test_cache_reload(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey,
                      ed_key: ed25519.Ed25519PrivateKey) -> None:
    cache = JwtKeyCache()
    good = write(tmp_path, "good.pem", public_pem(rsa_key))
    broken = write(tmp_path, "broken.pem", public_pem(ed_key))
    first = cache.get(good)
    cache.get(broken)
    same_stamp_rewrite(good, public_pem(other_rsa_key))
    os.unlink(broken)
    errors = cache.reload()
    assert list(errors) == [broken] and "cannot read" in errors[broken]
    assert len(cache) == 1
    reloaded = cache.get(good)
    assert reloaded is not first
    assert check(sign(other_rsa_key, "RS256", claims()), reloaded)
