"""Unit tests for SCRAM-SHA-256-PLUS (tls-server-end-point channel binding, RFC 5929) and SCRAM
pass-through (ScramServer.client_key -> ScramClient.from_keys). No server needed."""

import base64
import datetime
import hashlib
import hmac
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pgdoorman.auth import (
    MECHANISM,
    MECHANISM_PLUS,
    AuthFailed,
    ScramClient,
    ScramServer,
    ScramVerifier,
    StoredSecret,
    parse_secret,
    scram_verifier,
    server_mechanisms,
    tls_server_end_point,
)
from pgdoorman.auth.scram import _client_server_keys, saslprep

PLAIN, PLUS = MECHANISM, MECHANISM_PLUS
CBIND = hashlib.sha256(b"the pooler's certificate").digest()
OTHER_CBIND = hashlib.sha256(b"a man in the middle's certificate").digest()
VERIFIER = scram_verifier("pencil", salt=b"pass-through salt", iterations=4096)

# RFC 7677 section 3 (the exchange itself is covered in test_auth_unit.py; here it drives from_keys).
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_PROOF = b"dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def exchange(server: ScramServer, client: ScramClient) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


def secret(text: str = "pencil") -> StoredSecret:
    return parse_secret(text, "u")


def c_attr(client_final: bytes) -> bytes:
    """The decoded c= of a client-final-message."""
    assert client_final.startswith(b"c=")
    return base64.b64decode(client_final.split(b",", 1)[0][2:])


# --- tls_server_end_point -------------------------------------------------------------------------

_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgdoorman test")])
_START = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_SignHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512  # what CertificateBuilder.sign takes here


def _cert(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
          | ed448.Ed448PrivateKey, algorithm: _SignHash | None,
          rsa_padding: padding.PSS | None = None) -> bytes:
    builder = (x509.CertificateBuilder().subject_name(_NAME).issuer_name(_NAME)
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(_START).not_valid_after(_START + datetime.timedelta(days=1)))
    return builder.sign(key, algorithm, rsa_padding=rsa_padding).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# sha256WithRSAEncryption, and what to put in its place (same DER length: only the last arc differs).
_SHA256_RSA_OID = bytes.fromhex("06092a864886f70d01010b")
_LEGACY_RSA_OID = {"sha1": bytes.fromhex("06092a864886f70d010105"),
                   "md5": bytes.fromhex("06092a864886f70d010104")}


def _legacy_rsa_cert(key: rsa.RSAPrivateKey, name: str) -> bytes:
    """A certificate really signed with SHA-1 or MD5. OpenSSL's security level refuses to build
    one, so: sign with SHA-256, swap the algorithm OIDs (same length), re-sign the new TBS (an RSA
    2048 signature is the last 256 bytes either way)."""
    algorithm = hashes.SHA1() if name == "sha1" else hashes.MD5()
    der = _cert(key, hashes.SHA256())
    assert der.count(_SHA256_RSA_OID) == 2  # in the TBS and in the outer signatureAlgorithm
    patched = der.replace(_SHA256_RSA_OID, _LEGACY_RSA_OID[name])
    tbs = x509.load_der_x509_certificate(patched).tbs_certificate_bytes
    try:
        signature = key.sign(tbs, padding.PKCS1v15(), algorithm)
    except Exception as exc:  # some OpenSSL builds refuse MD5 altogether
        pytest.skip(f"this OpenSSL cannot sign with {name}: {exc}")
    der = patched[:-256] + signature
    cert = x509.load_der_x509_certificate(der)
    assert cert.signature_hash_algorithm is not None and cert.signature_hash_algorithm.name == name
    key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
    return der


def test_end_point_rsa_sha256(rsa_key: rsa.RSAPrivateKey) -> None:
    der = _cert(rsa_key, hashes.SHA256())
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


@pytest.mark.parametrize("algorithm, digest", [(hashes.SHA384(), hashlib.sha384),
                                               (hashes.SHA512(), hashlib.sha512)])
def test_end_point_rsa_other_sha2(rsa_key: rsa.RSAPrivateKey, algorithm: _SignHash,
                                  digest: Callable[[bytes], "hashlib._Hash"]) -> None:
    der = _cert(rsa_key, algorithm)
    assert tls_server_end_point(der) == digest(der).digest()


def test_end_point_ecdsa_p384_sha384() -> None:
    der = _cert(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()
    assert len(tls_server_end_point(der)) == 48


def test_end_point_rsa_pss_uses_the_pss_hash(rsa_key: rsa.RSAPrivateKey) -> None:
    # As PostgreSQL with X509_get_signature_info (OpenSSL 1.1.1+).
    der = _cert(rsa_key, hashes.SHA384(), padding.PSS(padding.MGF1(hashes.SHA384()), 48))
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()


@pytest.mark.parametrize("name", ["sha1", "md5"])
def test_end_point_weak_signature_hash_upgrades_to_sha256(rsa_key: rsa.RSAPrivateKey, name: str) -> None:
    der = _legacy_rsa_cert(rsa_key, name)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


@pytest.mark.parametrize("make_key", [ed25519.Ed25519PrivateKey.generate, ed448.Ed448PrivateKey.generate])
def test_end_point_undefined_without_signature_hash(
    make_key: Callable[[], ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey],
) -> None:
    with pytest.raises(ValueError, match="no hash"):
        tls_server_end_point(_cert(make_key(), None))


def test_end_point_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        tls_server_end_point(b"not a certificate")


def test_server_mechanisms_in_postgresql_order() -> None:
    assert server_mechanisms(True) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert server_mechanisms(False) == ["SCRAM-SHA-256"]


# --- mechanism choice (client side) ---------------------------------------------------------------

@pytest.mark.parametrize("offered, cbind, require, chosen", [
    ([PLUS, PLAIN], CBIND, False, PLUS),
    ([PLUS, PLAIN], CBIND, True, PLUS),
    ([PLUS], CBIND, True, PLUS),
    ([PLUS, PLAIN], None, False, PLAIN),  # no TLS (or no usable certificate): no binding
    ([PLAIN], CBIND, False, PLAIN),  # TLS but not offered: SCRAM-SHA-256 with flag y
    ([PLAIN], None, False, PLAIN),
    ([PLAIN, "SOMETHING-ELSE"], None, False, PLAIN),
])
def test_choose_mechanism(offered: list[str], cbind: bytes | None, require: bool, chosen: str) -> None:
    assert ScramClient.choose_mechanism(offered, cbind, require) == chosen


@pytest.mark.parametrize("offered, cbind, why", [
    ([PLAIN], CBIND, "server did not offer an authentication method that supports channel binding"),
    ([PLUS, PLAIN], None, "does not use TLS"),
    ([PLAIN], None, "channel binding is required"),
])
def test_choose_mechanism_binding_required(offered: list[str], cbind: bytes | None, why: str) -> None:
    with pytest.raises(AuthFailed, match=why):
        ScramClient.choose_mechanism(offered, cbind, True)


def test_choose_mechanism_nothing_supported() -> None:
    with pytest.raises(AuthFailed, match="no supported SASL mechanism"):
        ScramClient.choose_mechanism(["SCRAM-SHA-1"], None, False)
    with pytest.raises(AuthFailed, match="no supported SASL mechanism"):
        ScramClient.choose_mechanism([PLUS], None, False)  # -PLUS only, and we cannot bind


@pytest.mark.parametrize("cbind, mechanism, header, c", [
    (CBIND, PLUS, b"p=tls-server-end-point,,", b"p=tls-server-end-point,," + CBIND),
    (CBIND, PLAIN, b"y,,", b"y,,"),
    (None, PLAIN, b"n,,", b"n,,"),
])
def test_client_gs2_header_and_c_attribute(cbind: bytes | None, mechanism: str, header: bytes,
                                           c: bytes) -> None:
    client = ScramClient("pencil", cbind_data=cbind, mechanism=mechanism)
    assert client.mechanism == mechanism
    first = client.client_first()
    assert first.startswith(header + b"n=,r=")
    server = ScramServer(secret(), cbind_data=cbind if mechanism == PLUS else None, mechanism=mechanism)
    final = client.handle_server_first(server.handle_client_first(first))
    assert c_attr(final) == c
    client.verify_server_final(server.handle_client_final(final))


def test_client_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cbind_data"):
        ScramClient("pencil", mechanism=PLUS)
    with pytest.raises(ValueError, match="cbind_data"):
        ScramClient("pencil", cbind_data=b"", mechanism=PLAIN)
    with pytest.raises(ValueError, match="mechanism"):
        ScramClient("pencil", mechanism="SCRAM-SHA-1")


# --- full exchanges with channel binding ----------------------------------------------------------

@pytest.mark.parametrize("stored", ["pencil", VERIFIER])
def test_plus_success(stored: str) -> None:
    server = ScramServer(secret(stored), cbind_data=CBIND, mechanism=PLUS)
    assert server.mechanism == PLUS
    exchange(server, ScramClient("pencil", cbind_data=CBIND, mechanism=PLUS))


def test_plus_via_select_mechanism() -> None:
    server = ScramServer(secret(), cbind_data=CBIND)
    server.select_mechanism(PLUS)
    exchange(server, ScramClient("pencil", cbind_data=CBIND, mechanism=PLUS))


def test_plus_wrong_cbind_data_fails() -> None:
    # The client saw another certificate than ours: it talks TLS to someone in between.
    server = ScramServer(secret(), cbind_data=CBIND, mechanism=PLUS)
    client = ScramClient("pencil", cbind_data=OTHER_CBIND, mechanism=PLUS)
    final = client.handle_server_first(server.handle_client_first(client.client_first()))
    with pytest.raises(AuthFailed, match="channel-binding check failed"):
        server.handle_client_final(final)


@pytest.mark.parametrize("c", [b"p=tls-server-end-point,,", b"n,,",
                               b"p=tls-server-end-point,," + CBIND + b"x", b"y,," + CBIND])
def test_plus_c_must_be_header_plus_cbind_exactly(c: bytes) -> None:
    server = ScramServer(secret(), cbind_data=CBIND, mechanism=PLUS)
    bare = b"n=,r=clientnonce"
    server_first = server.handle_client_first(b"p=tls-server-end-point,," + bare)
    final = _final(b"pencil", bare, server_first, base64.b64encode(c))
    with pytest.raises(AuthFailed, match="channel-binding check failed"):
        server.handle_client_final(final)


def test_plus_wrong_password_fails_after_binding() -> None:
    server = ScramServer(secret(), cbind_data=CBIND, mechanism=PLUS)
    with pytest.raises(AuthFailed, match="wrong password"):
        exchange(server, ScramClient("pencil!", cbind_data=CBIND, mechanism=PLUS))


def test_flag_y_against_binding_server_is_a_downgrade() -> None:
    server = ScramServer(secret(), cbind_data=CBIND)  # offered -PLUS; client picked plain with y
    with pytest.raises(AuthFailed, match="downgrade"):
        exchange(server, ScramClient("pencil", cbind_data=CBIND, mechanism=PLAIN))


def test_flag_y_against_non_binding_server_succeeds() -> None:
    exchange(ScramServer(secret()), ScramClient("pencil", cbind_data=CBIND, mechanism=PLAIN))


@pytest.mark.parametrize("server_cbind", [None, CBIND])
def test_flag_n_works(server_cbind: bytes | None) -> None:
    # n: the client cannot or will not bind; accepted with the plain mechanism, TLS or not.
    exchange(ScramServer(secret(), cbind_data=server_cbind), ScramClient("pencil"))


@pytest.mark.parametrize("server_cbind", [None, CBIND])
def test_flag_p_with_plain_mechanism_fails(server_cbind: bytes | None) -> None:
    server = ScramServer(secret(), cbind_data=server_cbind, mechanism=PLAIN)
    with pytest.raises(AuthFailed, match="selected SCRAM-SHA-256 without channel binding"):
        exchange(server, ScramClient("pencil", cbind_data=CBIND, mechanism=PLUS))


@pytest.mark.parametrize("client", [lambda: ScramClient("pencil"),
                                    lambda: ScramClient("pencil", cbind_data=CBIND, mechanism=PLAIN)])
def test_plus_mechanism_with_flag_n_or_y_fails(client: Callable[[], ScramClient]) -> None:
    server = ScramServer(secret(), cbind_data=CBIND, mechanism=PLUS)
    with pytest.raises(AuthFailed, match="selected SCRAM-SHA-256-PLUS, but its gs2 flag"):
        exchange(server, client())


@pytest.mark.parametrize("name", [b"tls-unique", b"tls-exporter", b"", b"TLS-SERVER-END-POINT"])
def test_unknown_channel_binding_type_fails(name: bytes) -> None:
    server = ScramServer(secret(), cbind_data=CBIND, mechanism=PLUS)
    with pytest.raises(AuthFailed, match="unsupported SCRAM channel-binding type"):
        server.handle_client_first(b"p=" + name + b",,n=,r=abc")


def test_server_mechanism_selection() -> None:
    with pytest.raises(AuthFailed, match="does not offer"):
        ScramServer(secret(), mechanism=PLUS)  # no TLS here: -PLUS was never offered
    server = ScramServer(secret())
    with pytest.raises(AuthFailed, match="does not offer"):
        server.select_mechanism(PLUS)
    with pytest.raises(AuthFailed, match="unsupported SASL mechanism"):
        server.select_mechanism("SCRAM-SHA-1")
    with pytest.raises(ValueError, match="cbind_data"):
        ScramServer(secret(), cbind_data=b"")
    server = ScramServer(secret(), cbind_data=CBIND)
    server.handle_client_first(b"n,,n=,r=abc")
    with pytest.raises(RuntimeError):
        server.select_mechanism(PLUS)  # too late


def test_doomed_exchange_enforces_the_same_rules() -> None:
    # A client must not learn from the cbind checks whether the user exists.
    unknown = StoredSecret("unknown")
    with pytest.raises(AuthFailed, match="downgrade"):
        exchange(ScramServer(unknown, cbind_data=CBIND),
                 ScramClient("pencil", cbind_data=CBIND, mechanism=PLAIN))
    server = ScramServer(unknown, cbind_data=CBIND, mechanism=PLUS)
    with pytest.raises(AuthFailed, match="wrong password"):
        exchange(server, ScramClient("pencil", cbind_data=CBIND, mechanism=PLUS))
    with pytest.raises(RuntimeError):
        server.client_key  # noqa: B018


def _final(password: bytes, bare: bytes, server_first: bytes, c_b64: bytes) -> bytes:
    """An independent client-final (RFC 5802 section 3) with any c= value."""
    attrs = dict(a.split(b"=", 1) for a in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=" + c_b64 + b",r=" + attrs[b"r"]
    auth = bare + b"," + server_first + b"," + without_proof
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


# --- pass-through ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stored, cbind", [("pencil", None), (VERIFIER, None), (VERIFIER, CBIND)])
def test_server_recovers_the_client_key(stored: str, cbind: bytes | None) -> None:
    mechanism = PLUS if cbind else PLAIN
    server = ScramServer(secret(stored), cbind_data=cbind, mechanism=mechanism)
    with pytest.raises(RuntimeError):
        server.client_key  # noqa: B018
    exchange(server, ScramClient("pencil", cbind_data=cbind, mechanism=mechanism))
    client_key, server_key = _client_server_keys(saslprep("pencil"), server.salt, server.iterations)
    assert server.client_key == client_key
    assert server.server_key == server_key
    if stored == VERIFIER:
        parsed = ScramVerifier.parse(VERIFIER)
        assert (server.salt, server.iterations) == (parsed.salt, parsed.iterations)


def test_no_client_key_after_a_failed_proof() -> None:
    server = ScramServer(secret(VERIFIER))
    with pytest.raises(AuthFailed):
        exchange(server, ScramClient("wrong"))
    with pytest.raises(RuntimeError):
        server.client_key  # noqa: B018


def test_from_keys_rfc7677_vector() -> None:
    # ClientKey/ServerKey derived independently (RFC 5802 section 3), then the RFC's exact messages.
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    assert (client_key, server_key) == _client_server_keys(b"pencil", RFC_SALT, 4096)
    client = ScramClient.from_keys(client_key, server_key, salt=RFC_SALT, iterations=4096,
                                   username="user", nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == b"n,,n=user,r=" + RFC_CLIENT_NONCE.encode()
    final = client.handle_server_first(RFC_SERVER_FIRST)
    assert final == b"c=biws,r=" + RFC_SERVER_FIRST[2:].split(b",")[0] + b",p=" + RFC_PROOF
    client.verify_server_final(RFC_SERVER_FINAL)


@pytest.mark.parametrize("front_cbind, back_cbind", [(None, None), (CBIND, OTHER_CBIND), (None, OTHER_CBIND)])
def test_pass_through_end_to_end(front_cbind: bytes | None, back_cbind: bytes | None) -> None:
    """client --(password)--> pooler's ScramServer (verifier only) --(ClientKey)--> PostgreSQL-like
    ScramServer (the same verifier only). Each hop binds to its own TLS connection."""
    front_mech = PLUS if front_cbind else PLAIN
    pooler = ScramServer(secret(VERIFIER), cbind_data=front_cbind, mechanism=front_mech)
    exchange(pooler, ScramClient("pencil", cbind_data=front_cbind, mechanism=front_mech))

    back_mech = ScramClient.choose_mechanism(server_mechanisms(back_cbind is not None), back_cbind, False)
    relay = ScramClient.from_keys(pooler.client_key, pooler.server_key, salt=pooler.salt,
                                  iterations=pooler.iterations, cbind_data=back_cbind, mechanism=back_mech)
    postgres = ScramServer(secret(VERIFIER), cbind_data=back_cbind, mechanism=back_mech)
    exchange(postgres, relay)
    assert postgres.client_key == pooler.client_key


@pytest.mark.parametrize("other", [
    scram_verifier("pencil", salt=b"another salt", iterations=4096),
    scram_verifier("pencil", salt=b"pass-through salt", iterations=4097),
])
def test_pass_through_needs_the_same_verifier(other: str) -> None:
    pooler = ScramServer(secret(VERIFIER))
    exchange(pooler, ScramClient("pencil"))
    relay = ScramClient.from_keys(pooler.client_key, pooler.server_key, salt=pooler.salt,
                                  iterations=pooler.iterations)
    postgres = ScramServer(secret(other))
    with pytest.raises(AuthFailed, match="different salt or iteration count .* pass-through needs the same"):
        relay.handle_server_first(postgres.handle_client_first(relay.client_first()))


def test_pass_through_wrong_keys_fail() -> None:
    verifier = ScramVerifier.parse(VERIFIER)
    client_key, server_key = _client_server_keys(b"pencil", verifier.salt, verifier.iterations)
    bad_client = ScramClient.from_keys(bytes(32), server_key, salt=verifier.salt,
                                       iterations=verifier.iterations)
    with pytest.raises(AuthFailed, match="wrong password"):
        exchange(ScramServer(secret(VERIFIER)), bad_client)
    bad_server = ScramClient.from_keys(client_key, bytes(32), salt=verifier.salt,
                                       iterations=verifier.iterations)
    with pytest.raises(AuthFailed, match="signature"):
        exchange(ScramServer(secret(VERIFIER)), bad_server)


def test_from_keys_bad_arguments() -> None:
    key = bytes(32)
    with pytest.raises(ValueError, match="32 bytes"):
        ScramClient.from_keys(key[:31], key, salt=b"s", iterations=1)
    with pytest.raises(ValueError, match="salt"):
        ScramClient.from_keys(key, key, salt=b"", iterations=1)
    with pytest.raises(ValueError, match="iteration"):
        ScramClient.from_keys(key, key, salt=b"s", iterations=0)
    with pytest.raises(ValueError, match="cbind_data"):
        ScramClient.from_keys(key, key, salt=b"s", iterations=1, mechanism=PLUS)


# --- fuzzing a binding server: only AuthFailed may escape -----------------------------------------

_pieces = st.sampled_from([b",", b"=", b"n", b"y", b"p", b"r", b"c", b"a", b"p=tls-server-end-point",
                           b"p=tls-unique", b",,", b"n=,r=abc", b"\0", b"\xff"])
_messages = st.one_of(st.binary(max_size=100), st.lists(_pieces, max_size=12).map(b"".join))


@settings(max_examples=200, deadline=None)
@given(_messages, st.sampled_from([PLAIN, PLUS]))
def test_fuzz_binding_server_client_first(data: bytes, mechanism: str) -> None:
    try:
        ScramServer(secret(), cbind_data=CBIND, mechanism=mechanism).handle_client_first(data)
    except AuthFailed:
        pass
