"""Builders and parsers for the PostgreSQL v3 messages the pooler creates or inspects.

Pure functions over bytes: no I/O. The relayed hot path never calls these per message; they
serve start-up, authentication, errors and the statements the pooler injects itself.
"""

from __future__ import annotations

import struct

from pgdoorman.protocol import codes

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")


class ProtocolError(Exception):
    """A message that does not follow the protocol; the peer gets `code` (08P01 unless another
    SQLSTATE says more) and is closed."""

    def __init__(self, message: str, code: str = codes.PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.code = code


def message(kind: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(kind, len(body) + 4) + body


def cstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if b"\0" in raw:
        raise ValueError("NUL byte in protocol string")
    return raw + b"\0"


# --- backend messages (pooler -> client) ---

def error_response(code: str, text: str, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None) -> bytes:
    fields = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(code) + b"M" + cstr(text)
    if detail:
        fields += b"D" + cstr(detail)
    if hint:
        fields += b"H" + cstr(hint)
    return message(b"E", fields + b"\0")


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, key))


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unsupported)) + b"".join(cstr(o) for o in unsupported)
    return message(b"v", body)


def parse_complete() -> bytes:
    return b"1\0\0\0\x04"


def close_complete() -> bytes:
    return b"3\0\0\0\x04"


# --- frontend messages (pooler -> server) ---

def startup_message(params: dict[str, str]) -> bytes:
    body = struct.pack("!i", 196608) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, 80877102, pid, key)


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def close_statement(name: bytes) -> bytes:
    return message(b"C", b"S" + name + b"\0")


def parse_message(name: bytes, query_and_types: bytes) -> bytes:
    """Parse with a new statement name; query_and_types is the rest of a client's Parse body."""
    return message(b"P", name + b"\0" + query_and_types)


TERMINATE = b"X\0\0\0\x04"


# --- parsers ---

def read_cstr(buf: bytes | memoryview, pos: int) -> tuple[bytes, int]:
    """The NUL-terminated string at pos and the position after its NUL."""
    end = bytes(buf[pos:]).find(b"\0") if isinstance(buf, memoryview) else buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    if isinstance(buf, memoryview):
        end += pos
    return bytes(buf[pos:end]), end + 1


_BAD_LAYOUT = "invalid startup packet layout: expected terminator as last byte"


def parse_startup_params(body: bytes) -> dict[str, str]:
    """Key/value pairs of a StartupMessage body (after the protocol version).

    Stricter than PostgreSQL in two ways, both because the pooler itself keys pools, logs and
    replays settings by these strings: bytes that are not UTF-8 get 22021 (PostgreSQL would take
    them as they are), and a user or database name longer than a PostgreSQL name can be gets
    08P01 (PostgreSQL would cut it silently, and the cut name could be another role's)."""
    pairs: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(body) and body[pos] != 0:
        key_end = body.find(b"\0", pos)
        value_end = body.find(b"\0", key_end + 1) if key_end >= 0 else -1
        if value_end < 0:  # PostgreSQL says the same of a missing value or NUL
            raise ProtocolError(_BAD_LAYOUT)
        pairs.append((body[pos:key_end], body[key_end + 1 : value_end]))
        pos = value_end + 1
    if pos != len(body) - 1:  # the layout first, as PostgreSQL judges it, then the encoding
        raise ProtocolError(_BAD_LAYOUT)
    params = {_utf8(key): _utf8(value) for key, value in pairs}
    for name in ("user", "database"):
        size = len(params.get(name, "").encode())
        if size >= codes.NAMEDATALEN:
            raise ProtocolError(f"invalid startup packet: {name} name is {size} bytes long, "
                                f"longer than the limit of {codes.NAMEDATALEN - 1} bytes")
    return params


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(invalid_encoding_message(raw, exc.start),
                            codes.CHARACTER_NOT_IN_REPERTOIRE) from None


def invalid_encoding_message(raw: bytes, at: int) -> str:
    """PostgreSQL's report_invalid_encoding text: the bytes of the character that starts at `at`,
    as many as its first byte announces (pg_utf_mblen), no more than are left."""
    lead = raw[at]
    length = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
    shown = " ".join(f"0x{b:02x}" for b in raw[at : at + length])
    return f'invalid byte sequence for encoding "UTF8": {shown}'


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstr(body, pos + 1)
        fields[code] = value.decode("utf-8", "replace")
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstr(body, 0)
    value, _ = read_cstr(body, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def quote_literal(value: str) -> str:
    """A SQL string literal that is safe whatever standard_conforming_strings says."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def raise_sql(code: str, text: str) -> str:
    """A statement that fails with exactly this SQLSTATE and message (the pooler's errors that
    must change the server's state as a real one would: abort the transaction, skip the batch)."""
    return (f"DO $pgdoorman$BEGIN RAISE EXCEPTION USING ERRCODE = {quote_literal(code)}, "
            f"MESSAGE = {quote_literal(text)}; END$pgdoorman$")


def data_row_values(body: bytes | bytearray, errors: str = "replace") -> list[str | None]:
    """The columns of a DataRow body, as text (None for NULL); errors: how to decode bad UTF-8
    (the tests pass "strict")."""
    count = struct.unpack_from("!h", body, 0)[0]
    values: list[str | None] = []
    pos = 2
    for _ in range(count):
        length = struct.unpack_from("!i", body, pos)[0]
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(bytes(body[pos : pos + length]).decode("utf-8", errors))
            pos += length
    return values
