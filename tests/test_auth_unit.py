"""Unit tests for pgdoorman.auth: md5, stored secrets, SASLprep and SCRAM-SHA-256 (no server needed)."""

import base64
import hashlib
import hmac
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgdoorman.auth import (
    AuthFailed,
    ScramClient,
    ScramServer,
    ScramVerifier,
    StoredSecret,
    md5_hash,
    md5_salted_response,
    md5_verify,
    parse_secret,
    saslprep,
    scram_verifier,
)

# RFC 7677 section 3: SCRAM-SHA-256 test vector (user "user", password "pencil").
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Verifiers produced by PostgreSQL 15 (CREATE ROLE ... PASSWORD), salts chosen by the server.
PG_PENCIL = ("SCRAM-SHA-256$4096:JYU6qvOKQJhde+KF+vQ6Gg==$rUvEZ3j9F4fochhZS341XZmcuFcAOt7WYWE1b+FgMNU="
             ":b+GgeuGXoToCmJSEUYZsgLtCc1pSw5seAtBl82Ujumc=")
PG_SOFT_HYPHEN = ("SCRAM-SHA-256$4096:xayLRYBZsdJ2gTjs9vAT8g==$jKYaDkPu75fTyEWxHukwSTdz1qTCLAHSEuAitNX57Pw="
                  ":k7elFQyk3lDnr7FdrEfAGU/7f6pOmlGjPsf4z0mmyZs=")  # password "I\u00adX"
PG_BIDI_RAW = ("SCRAM-SHA-256$4096:6AKC0zoesE4XcTHeebTRng==$2gj11vC4tRXr0FhWoJ/PZuqHzWDg7pXBheMoZfwg1n4="
               ":7VuvwPrPfd7+rqLiA5Vls5jnHby4LjHb+XDaZM86nlM=")  # password "\u0627\u0031": SASLprep fails


def exchange(server: ScramServer, client: ScramClient) -> None:
    server_first = server.handle_client_first(client.client_first())
    server_final = server.handle_client_final(client.handle_server_first(server_first))
    client.verify_server_final(server_final)


def reference_final(
    password: bytes, bare: bytes, server_first: bytes, cbind: bytes, extra: bytes = b""
) -> bytes:
    """An independent client-final computation (RFC 5802 section 3), for messages ScramClient won't send."""
    attrs = dict(a.split(b"=", 1) for a in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = b"c=" + cbind + b",r=" + attrs[b"r"] + extra
    auth = bare + b"," + server_first + b"," + without_proof
    sig = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, sig, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


# --- RFC 7677 test vector -------------------------------------------------------------------------

def test_rfc7677_client() -> None:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.handle_server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


@pytest.mark.parametrize("secret", [
    parse_secret("pencil", "user"),
    parse_secret(scram_verifier("pencil", salt=RFC_SALT), "user"),
])
def test_rfc7677_server(secret: StoredSecret) -> None:
    salt = RFC_SALT if secret.kind == "plain" else None
    server = ScramServer(secret, nonce=RFC_SERVER_NONCE, salt=salt)
    assert server.handle_client_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.handle_client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_client_default_first_message_is_libpq_like() -> None:
    first = ScramClient("pencil").client_first()
    assert first.startswith(b"n,,n=,r=") and len(first) == len(b"n,,n=,r=") + 24


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("password", ["pencil", "p@ss,w=rd", "\u5bc6\u7801", "I\u00adX", "\u0627\u0031"])
def test_round_trip_plain_and_verifier(password: str) -> None:
    exchange(ScramServer(parse_secret(password, "bob")), ScramClient(password))
    exchange(ScramServer(parse_secret(scram_verifier(password), "bob")), ScramClient(password))
    exchange(ScramServer(parse_secret(password, "bob"), salt=b"0123", iterations=17), ScramClient(password))


def test_username_in_client_first_is_ignored() -> None:
    exchange(ScramServer(parse_secret("pencil", "bob")), ScramClient("pencil", username="not,bob="))


@pytest.mark.parametrize("secret", [parse_secret("pencil", "u"), parse_secret(PG_PENCIL, "u")])
def test_wrong_password_fails_on_both_sides(secret: StoredSecret) -> None:
    server, client = ScramServer(secret), ScramClient("pencil!")
    server_first = server.handle_client_first(client.client_first())
    with pytest.raises(AuthFailed, match="wrong password"):
        server.handle_client_final(client.handle_server_first(server_first))
    with pytest.raises(AuthFailed):  # spent after a failure
        server.handle_client_final(b"c=biws,r=x,p=AAAA")


def test_client_rejects_server_that_does_not_know_the_password() -> None:
    honest = ScramServer(parse_secret("pencil", "u"))
    client = ScramClient("pencil")
    client.handle_server_first(honest.handle_client_first(client.client_first()))
    forged = b"v=" + base64.b64encode(bytes(32))
    with pytest.raises(AuthFailed, match="signature"):
        client.verify_server_final(forged)


def test_gs2_flag_y_accepted_and_echo_checked() -> None:
    bare = b"n=,r=clientnonce"
    for flag, cbind, ok in [(b"y,,", b"eSws", True), (b"y,,", b"biws", False), (b"n,,", b"eSws", False)]:
        server = ScramServer(parse_secret("pencil", "u"))
        server_first = server.handle_client_first(flag + bare)
        final = reference_final(b"pencil", bare, server_first, cbind)
        if ok:
            assert server.handle_client_final(final).startswith(b"v=")
        else:
            with pytest.raises(AuthFailed, match="channel-binding"):
                server.handle_client_final(final)


def test_client_final_extensions_before_proof_are_ignored() -> None:
    server = ScramServer(parse_secret("pencil", "u"))
    bare = b"n=,r=abc,x=ext"
    server_first = server.handle_client_first(b"n,," + bare)
    final = reference_final(b"pencil", bare, server_first, b"biws", extra=b",z=zz")
    assert server.handle_client_final(final).startswith(b"v=")


@pytest.mark.parametrize("secret", [parse_secret("md5" + "0" * 32, "u"), parse_secret("", "u")])
def test_secret_without_scram_gets_a_doomed_exchange(secret: StoredSecret) -> None:
    server = ScramServer(secret)
    client = ScramClient("anything")
    server_first = server.handle_client_first(client.client_first())  # looks normal to the client
    assert b",s=" in server_first and server_first.endswith(b",i=4096")
    with pytest.raises(AuthFailed):
        server.handle_client_final(client.handle_server_first(server_first))


def test_plain_secret_salt_is_stable_within_process() -> None:
    secret = parse_secret("stable-salt", "u")
    salts = {ScramServer(secret).handle_client_first(b"n,,n=,r=abc").split(b",")[1] for _ in range(3)}
    assert len(salts) == 1


# --- malformed messages: server side --------------------------------------------------------------

@pytest.mark.parametrize("first, why", [
    (b"", "gs2"),
    (b"n", "gs2"),
    (b"n,", "gs2"),
    (b"p=tls-server-end-point,,n=,r=abc", "channel binding"),
    (b"q,,n=,r=abc", "flag"),
    (b"yy,,n=,r=abc", "flag"),
    (b"n,a=bob,n=,r=abc", "authorization"),
    (b"n,,m=ext,n=,r=abc", "extension"),
    (b"n,,r=abc", "n="),
    (b"n,,n=", "r="),
    (b"n,,n=,r=", "nonce"),
    (b"n,,n=,r=ab\x7fc", "nonce"),
    (b"n,,n=,r=ab\xc3\xa9", "nonce"),
    (b"n,,n=,r=abc,", "malformed"),
    (b"n,,n=,r=abc,1=x", "malformed"),
    (b"n,,n=\0,r=abc", "NUL"),
    (b"n,,n=,s=abc", "r="),
])
def test_server_rejects_bad_client_first(first: bytes, why: str) -> None:
    with pytest.raises(AuthFailed, match=why):
        ScramServer(parse_secret("pencil", "u")).handle_client_first(first)


def _server_after_first() -> tuple[ScramServer, bytes]:
    server = ScramServer(parse_secret("pencil", "user"), nonce=RFC_SERVER_NONCE, salt=RFC_SALT)
    server.handle_client_first(RFC_CLIENT_FIRST)
    return server, RFC_CLIENT_FINAL


@pytest.mark.parametrize("mutate, why", [
    (lambda m: m.replace(b"c=biws", b"c=eSws"), "channel-binding"),
    (lambda m: m.replace(b"c=biws", b"c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws"), "channel-binding"),
    (lambda m: m.replace(b"$k0,", b"$k1,"), "nonce"),
    (lambda m: m.replace(b"$k0,", b","), "nonce"),
    (lambda m: m.split(b",p=")[0], "proof"),
    (lambda m: m + b",x=1", "proof"),
    (lambda m: m.replace(b",p=", b",p=AAAA,p="), "proof"),
    (lambda m: m.replace(b"p=dHzb", b"p=*Hzb"), "base64"),
    (lambda m: m.replace(b"p=dHzbZapWIk4jUhN+", b"p="), "length"),
    (lambda m: m.replace(b"p=dHzb", b"p=dHzc"), "wrong password"),
    (lambda m: m.replace(b"c=biws,", b""), "c="),
    (lambda m: b"r=" + m, "c="),
    (lambda m: m + b"\0", "NUL"),
])
def test_server_rejects_bad_client_final(mutate: Callable[[bytes], bytes], why: str) -> None:
    server, final = _server_after_first()
    with pytest.raises(AuthFailed, match=why):
        server.handle_client_final(mutate(final))


def test_server_out_of_order_calls() -> None:
    server = ScramServer(parse_secret("pencil", "u"))
    with pytest.raises(AuthFailed):
        server.handle_client_final(RFC_CLIENT_FINAL)
    server, final = _server_after_first()
    with pytest.raises(AuthFailed):
        server.handle_client_first(RFC_CLIENT_FIRST)
    server, final = _server_after_first()
    server.handle_client_final(final)
    with pytest.raises(AuthFailed):
        server.handle_client_final(final)


# --- malformed messages: client side --------------------------------------------------------------

def _client() -> ScramClient:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    client.client_first()
    return client


@pytest.mark.parametrize("server_first, why", [
    (b"", "malformed"),
    (b"m=x," + RFC_SERVER_FIRST, "extension"),
    (RFC_SERVER_FIRST.replace(b"rOprNGfwEbeRWgbNEkqO%", b"rOprNGfwEbeRWgbNEkqX%"), "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (RFC_SERVER_FIRST.replace(b"s=W22Z", b"s=*22Z"), "base64"),
    (RFC_SERVER_FIRST.replace(b"s=W22ZaJ0SNY7soEsUEjb6gQ==", b"s="), "salt"),
    (RFC_SERVER_FIRST.replace(b"i=4096", b"i=0"), "iteration"),
    (RFC_SERVER_FIRST.replace(b"i=4096", b"i=-1"), "iteration"),
    (RFC_SERVER_FIRST.replace(b"i=4096", b"i=" + b"9" * 5000), "iteration"),
    (RFC_SERVER_FIRST.replace(b",i=4096", b""), "i="),
])
def test_client_rejects_bad_server_first(server_first: bytes, why: str) -> None:
    with pytest.raises(AuthFailed, match=why):
        _client().handle_server_first(server_first)


def test_client_accepts_server_first_extensions() -> None:
    assert _client().handle_server_first(RFC_SERVER_FIRST + b",x=ext").startswith(b"c=biws,")


@pytest.mark.parametrize("server_final, why", [
    (b"e=invalid-proof", "invalid-proof"),
    (b"v=" + base64.b64encode(bytes(32)), "signature"),
    (b"v=***", "base64"),
    (b"x=1", "v="),
    (b"", "malformed"),
])
def test_client_rejects_bad_server_final(server_final: bytes, why: str) -> None:
    client = _client()
    client.handle_server_first(RFC_SERVER_FIRST)
    with pytest.raises(AuthFailed, match=why):
        client.verify_server_final(server_final)


def test_client_out_of_order_calls() -> None:
    with pytest.raises(AuthFailed):
        ScramClient("pencil").handle_server_first(RFC_SERVER_FIRST)  # client_first() not sent
    with pytest.raises(AuthFailed):
        _client().verify_server_final(RFC_SERVER_FINAL)


def test_bad_injected_nonce_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        ScramClient("pencil", nonce="a,b")
    with pytest.raises(ValueError):
        ScramServer(parse_secret("pencil", "u"), nonce="")
    with pytest.raises(ValueError):
        ScramServer(parse_secret(PG_PENCIL, "u"), salt=b"x")


# --- fuzzing: only AuthFailed may escape ----------------------------------------------------------

# Bytes biased towards SCRAM syntax so the fuzzer gets past the first checks.
_scramish = st.lists(st.sampled_from([b",", b"=", b"n", b"y", b"p", b"r", b"c", b"m", b"a", b"s", b"i",
                                      b"v", b"e", b"biws", b"eSws", b"n,,", b"AAAA", b"\0", b"\xff", b"1"]),
                     max_size=30).map(b"".join)
_messages = st.one_of(st.binary(max_size=200), _scramish)


@settings(max_examples=400, deadline=None)
@given(_messages)
def test_fuzz_client_first(data: bytes) -> None:
    try:
        ScramServer(parse_secret("pencil", "u")).handle_client_first(data)
    except AuthFailed:
        pass


@settings(max_examples=400, deadline=None)
@given(st.one_of(_messages, _messages.map(lambda m: b"c=biws,r=" + RFC_CLIENT_NONCE.encode()
                                           + RFC_SERVER_NONCE.encode() + m)))
def test_fuzz_client_final(data: bytes) -> None:
    server, _ = _server_after_first()
    try:
        server.handle_client_final(data)
    except AuthFailed:
        pass


@settings(max_examples=200, deadline=None)
@given(_messages, _messages)
def test_fuzz_client_side(server_first: bytes, server_final: bytes) -> None:
    client = _client()
    try:
        client.handle_server_first(b"r=" + RFC_CLIENT_NONCE.encode() + server_first)
        client.verify_server_final(server_final)
    except AuthFailed:
        pass


# --- SASLprep -------------------------------------------------------------------------------------

@pytest.mark.parametrize("password, prepped", [
    ("pencil", b"pencil"),
    ("a\x07b", b"a\x07b"),  # ASCII is never touched (PostgreSQL's fast path)
    ("I\u00adX", b"IX"),  # RFC 4013 example: soft hyphen mapped to nothing
    ("\u00aa", b"a"),  # NFKC
    ("\u2168", b"IX"),  # NFKC
    ("a\u00a0b", b"a b"),  # non-ASCII space -> SPACE
    ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw
    ("\u00e9\x07", "\u00e9\x07".encode()),  # prohibited control: raw
    ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi violation: raw
    ("\u0627\u0628", "\u0627\u0628".encode()),  # valid RTL
    ("x\U000e0080y", "x\U000e0080y".encode()),  # unassigned in Unicode 3.2: raw
])
def test_saslprep(password: str, prepped: bytes) -> None:
    assert saslprep(password) == prepped


def test_saslprep_never_raises_on_surrogates() -> None:
    assert saslprep("\udcff\u00e9") == b"\xff\xc3\xa9"  # surrogateescape round-trips raw bytes
    assert saslprep("\ud800\u00e9")  # a lone high surrogate is still encoded


@pytest.mark.parametrize("verifier, password", [
    (PG_PENCIL, "pencil"),
    (PG_SOFT_HYPHEN, "I\u00adX"),
    (PG_SOFT_HYPHEN, "IX"),
    (PG_BIDI_RAW, "\u0627\u0031"),
])
def test_matches_postgresql_verifiers(verifier: str, password: str) -> None:
    parsed = ScramVerifier.parse(verifier)
    assert scram_verifier(password, salt=parsed.salt, iterations=parsed.iterations) == verifier
    exchange(ScramServer(parse_secret(verifier, "u")), ScramClient(password))


# --- md5 ------------------------------------------------------------------------------------------

def test_md5_hash_known_value() -> None:
    assert md5_hash("pass", "user") == "md5" + hashlib.md5(b"passuser").hexdigest()
    assert md5_hash("pass", "user") == "md57f409a7c046daea1c2c60502d7e2becc"  # md5sum of "passuser"


def test_md5_salted_response_and_verify() -> None:
    salt = b"\x01\x02\x03\x04"
    hashed = md5_hash("pass", "user")
    response = md5_salted_response(hashed, salt)
    assert response == "md5" + hashlib.md5(hashed[3:].encode() + salt).hexdigest()
    assert md5_verify(parse_secret("pass", "user"), salt, response)
    assert md5_verify(parse_secret(hashed, "user"), salt, response)
    assert md5_verify(parse_secret(hashed.upper().replace("MD5", "md5"), "user"), salt, response)
    assert not md5_verify(parse_secret("pass", "other"), salt, response)  # user name is the salt
    assert not md5_verify(parse_secret("pass", "user"), b"\0\0\0\0", response)
    assert not md5_verify(parse_secret("pass", "user"), salt, response.upper())
    assert not md5_verify(parse_secret("pass", "user"), salt, "\u00e9" * 35)  # non-ASCII: False, no error
    assert not md5_verify(parse_secret(scram_verifier("pass"), "user"), salt, response)
    assert not md5_verify(parse_secret("", "user"), salt, response)


# --- stored secrets -------------------------------------------------------------------------------

def test_parse_secret_kinds() -> None:
    assert parse_secret("", "u") == StoredSecret("trust")
    plain = parse_secret("secret", "u")
    assert (plain.kind, plain.plain, plain.scram) == ("plain", "secret", None)
    assert plain.md5 == md5_hash("secret", "u")
    hashed = md5_hash("secret", "u")
    assert parse_secret(hashed, "u") == StoredSecret("md5", md5=hashed)
    assert parse_secret(hashed[:-1], "u").kind == "plain"  # 31 hex digits: just a password
    assert parse_secret(hashed[:-1] + "g", "u").kind == "plain"
    scram = parse_secret(PG_PENCIL, "u")
    assert scram.kind == "scram" and scram.scram is not None and scram.plain is None and scram.md5 is None
    assert scram.scram.iterations == 4096 and len(scram.scram.salt) == 16
    assert str(scram.scram) == PG_PENCIL


def test_secret_repr_hides_password() -> None:
    assert "hunter2" not in repr(parse_secret("hunter2", "u"))
    text = repr(parse_secret(PG_PENCIL, "u"))
    assert "rUvEZ3j9" not in text and "stored_key" not in text


@pytest.mark.parametrize("bad", [
    "SCRAM-SHA-256$",
    "SCRAM-SHA-256$4096:JYU6qvOKQJhde+KF+vQ6Gg==",
    "SCRAM-SHA-256$4096:JYU6qvOKQJhde+KF+vQ6Gg==$rUvEZ3j9F4fochhZS341XZmcuFcAOt7WYWE1b+FgMNU=",
    PG_PENCIL.replace("$4096:", "$0:"),
    PG_PENCIL.replace("$4096:", "$-1:"),
    PG_PENCIL.replace("$4096:", "$abc:"),
    PG_PENCIL.replace("$4096:", "$\u0664:"),  # Arabic-Indic digit four
    PG_PENCIL.replace("$4096:", "$99999999999:"),
    PG_PENCIL.replace("$4096:", "$" + "9" * 5000 + ":"),
    PG_PENCIL.replace("JYU6qvOKQJhde+KF+vQ6Gg==", ""),
    PG_PENCIL.replace("JYU6qvOKQJhde+KF+vQ6Gg==", "JYU6*vOKQJhde+KF+vQ6Gg=="),
    PG_PENCIL.replace("JYU6qvOKQJhde+KF+vQ6Gg==", "\u00e9"),
    PG_PENCIL.replace("rUvEZ3j9F4fochhZS341XZmcuFcAOt7WYWE1b+FgMNU=", "AAAA"),
    PG_PENCIL.replace(":b+Gg", ":b+Gg:"),
    PG_PENCIL + "$",
])
def test_parse_secret_malformed_verifier(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_secret(bad, "u")


def test_scram_verifier_round_trip() -> None:
    text = scram_verifier("pencil", salt=b"salty", iterations=1000)
    parsed = ScramVerifier.parse(text)
    assert (parsed.iterations, parsed.salt) == (1000, b"salty")
    assert text.startswith("SCRAM-SHA-256$1000:c2FsdHk=$")
    exchange(ScramServer(parse_secret(text, "u")), ScramClient("pencil"))
    with pytest.raises(AuthFailed):
        exchange(ScramServer(parse_secret(text, "u")), ScramClient("Pencil"))
    assert scram_verifier("pencil") != scram_verifier("pencil")  # random salt each time
    with pytest.raises(ValueError):
        scram_verifier("pencil", salt=b"")
    with pytest.raises(ValueError):
        scram_verifier("pencil", iterations=0)
