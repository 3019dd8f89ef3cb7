"""Malformed, hostile or unusual bytes end that one client (ErrorResponse or close); others go on."""

from __future__ import annotations

import random
import struct

import psycopg
import pytest
from helpers import (
    PROTOCOL_3,
    RawConn,
    gssenc_request,
    parse_error_fields,
    pconnect,
    query_message,
    ssl_request,
    startup_packet,
)

REPLY_TIMEOUT = 10.0  # generous upper bound: "answers or closes, does not hang"


@pytest.fixture(scope="module")
def bystander(pooler):
    """A client connected before the bad input; it must keep working throughout."""
    conn = pconnect(pooler, "tx")
    conn.execute("SELECT 1")
    yield conn
    conn.close()


def _check_others_fine(pooler, bystander) -> None:
    assert pooler.alive(), "the pooler died:\n" + pooler.log()[-3000:]
    with pconnect(pooler, "tx") as conn:
        assert conn.execute("SELECT %s::text", ("fresh client",)).fetchone() == ("fresh client",)
    assert bystander.execute("SELECT 'bystander'").fetchone() == ("bystander",)


def _assert_error_or_closed(data: bytes, closed: bool, *, sqlstates: tuple[str, ...] = ("08P01",),
                            allow_silent_close: bool = True) -> dict[str, str] | None:
    """The reply is one FATAL ErrorResponse (then EOF) or nothing but EOF."""
    assert closed, f"the pooler neither answered nor closed within {REPLY_TIMEOUT}s (got {data[:200]!r})"
    if not data:
        assert allow_silent_close, "expected an ErrorResponse, the connection was just closed"
        return None
    assert data[:1] == b"E", f"expected an ErrorResponse, got {data[:200]!r}"
    (length,) = struct.unpack("!I", data[1:5])
    fields = parse_error_fields(data[5:1 + length])
    assert fields.get("S") == "FATAL", fields
    assert fields.get("C") in sqlstates, fields
    assert fields.get("M"), fields
    return fields


def _send_and_read(pooler, payload: bytes, *, half_close: bool = False) -> tuple[bytes, bool]:
    with RawConn.for_pooler(pooler) as c:
        try:
            c.send(payload)
            if half_close:
                c.sock.shutdown(1)  # SHUT_WR: we will send nothing more
        except (BrokenPipeError, ConnectionResetError):
            return b"", True
        return c.read_all(REPLY_TIMEOUT)


def test_truncated_startup_then_close(pooler, bystander):
    pkt = startup_packet({"user": "trust_user", "database": "tx"})
    with RawConn.for_pooler(pooler) as c:
        c.send(pkt[:10])
    with RawConn.for_pooler(pooler) as c:  # header promises more than ever arrives, then EOF
        c.send(pkt[:-5])
        c.sock.shutdown(1)
        data, closed = c.read_all(REPLY_TIMEOUT)
        _assert_error_or_closed(data, closed)
    _check_others_fine(pooler, bystander)


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x80000000, 0xFFFFFFF8, 0, 3, 7],
                         ids=["4GiB", "negative", "negative8", "zero", "three", "seven"])
def test_bad_startup_length(pooler, bystander, length):
    data, closed = _send_and_read(pooler, struct.pack("!II", length, PROTOCOL_3) + b"user\0x\0\0")
    _assert_error_or_closed(data, closed)
    _check_others_fine(pooler, bystander)


def test_random_bytes(pooler, bystander):
    rng = random.Random(12345)
    junk = bytes(rng.getrandbits(8) for _ in range(100))
    junk = b"\xde\xad\xbe\xef" + junk[4:]  # a length of ~3.7 GB: never a plausible startup
    data, closed = _send_and_read(pooler, junk, half_close=True)
    _assert_error_or_closed(data, closed)
    _check_others_fine(pooler, bystander)


def test_oversized_startup(pooler, bystander):
    pkt = startup_packet({"user": "trust_user", "database": "tx", "options": "x" * 20_000})
    assert len(pkt) > 10_000
    data, closed = _send_and_read(pooler, pkt)
    _assert_error_or_closed(data, closed)
    _check_others_fine(pooler, bystander)


@pytest.mark.parametrize("version", [(2, 0), (4, 0), (9999, 9999)], ids=["2.0", "4.0", "bogus"])
def test_unsupported_protocol_version(pooler, bystander, version):
    code = (version[0] << 16) | version[1]
    pkt = startup_packet({"user": "trust_user", "database": "tx"}, version=code)
    data, closed = _send_and_read(pooler, pkt)
    if version == (2, 0) and data[:1] == b"E" and data[1:7] == b"FATAL:":
        # PostgreSQL itself answers a v2 client with a v2-style error: "E" + text + NUL
        assert closed
    else:
        # PostgreSQL answers 0A000 (feature not supported) here; 08P01 is as good.
        _assert_error_or_closed(data, closed, sqlstates=("0A000", "08P01"))
    _check_others_fine(pooler, bystander)


def test_startup_missing_user(pooler, bystander):
    data, closed = _send_and_read(pooler, startup_packet({"database": "tx"}))
    _assert_error_or_closed(data, closed, sqlstates=("08P01", "28000"), allow_silent_close=False)
    _check_others_fine(pooler, bystander)


def test_startup_unterminated_parameters(pooler, bystander):
    body = struct.pack("!I", PROTOCOL_3) + b"user\0trust_user\0database\0tx"  # no NULs at the end
    data, closed = _send_and_read(pooler, struct.pack("!I", len(body) + 4) + body)
    _assert_error_or_closed(data, closed)
    _check_others_fine(pooler, bystander)


def test_ssl_request_then_normal_startup(pooler, bystander):
    with RawConn.for_pooler(pooler) as c:
        c.send(ssl_request())
        assert c.recv_byte() == b"N"
        msgs = c.startup("trust_user", "tx")
        assert msgs[-1][0] == b"Z"
        rows, errors, status = c.query("SELECT 'after ssl refusal'")
        assert rows == [["after ssl refusal"]] and not errors and status == b"I"
    _check_others_fine(pooler, bystander)


def test_gssenc_request_then_normal_startup(pooler, bystander):
    with RawConn.for_pooler(pooler) as c:
        c.send(gssenc_request())
        assert c.recv_byte() == b"N"
        c.startup("trust_user", "tx")
        rows, errors, _ = c.query("SELECT 'after gss refusal'")
        assert rows == [["after gss refusal"]] and not errors
    _check_others_fine(pooler, bystander)


def test_libpq_sslmode_prefer_falls_back(pooler, bystander):
    """libpq's default (sslmode=prefer) sends SSLRequest first; the 'N' must lead to a normal session."""
    with psycopg.connect(pooler.dsn("tx", sslmode="prefer")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.ssl_in_use is False


@pytest.mark.parametrize("payload", [
    b"Q" + struct.pack("!I", 2),                      # length below 4
    b"Q\xff\xff\xff\xffSELECT 1\0",                  # length 4 GiB - 1 (negative as int32)
    b"Q\x7f\xff\xff\xffSELECT 1\0",                  # 2 GiB: above PostgreSQL's 1 GB message limit
    b"\x00\x00\x00\x00\x00",                          # type 0, length 0
], ids=["len2", "len4GiB", "len2GiB", "zeros"])
def test_garbage_after_login(pooler, bystander, payload):
    """A logged-in client sends a message with a bad length: ErrorResponse 08P01 or close; others go on."""
    with RawConn.for_pooler(pooler) as c:
        c.startup("trust_user", "tx")
        c.send(payload)
        data, closed = c.read_all(REPLY_TIMEOUT)
        _assert_error_or_closed(data, closed)
    _check_others_fine(pooler, bystander)


def test_unknown_message_type_after_login(pooler, bystander):
    with RawConn.for_pooler(pooler) as c:
        c.startup("trust_user", "tx")
        c.send(b"y" + struct.pack("!I", 4))
        data, closed = c.read_all(REPLY_TIMEOUT)
        if data:
            assert data[:1] == b"E", data[:200]
        else:
            assert closed
    _check_others_fine(pooler, bystander)


def test_client_sends_terminate_mid_query_stream(pooler, bystander):
    with RawConn.for_pooler(pooler) as c:
        c.startup("trust_user", "tx")
        c.send(query_message("SELECT pg_sleep(0.2)") + b"X\x00\x00\x00\x04")
        data, closed = c.read_all(REPLY_TIMEOUT)
        assert closed
    _check_others_fine(pooler, bystander)
