"""The compiled frame scanners behave exactly like their pure-Python twins."""

from __future__ import annotations

import os
import struct
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgdoorman.protocol import scan

try:
    from pgdoorman.protocol import _scan  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the build always compiles it where gcc exists
    _scan = None

needs_compiled = pytest.mark.skipif(_scan is None, reason="compiled scanner not built")

KINDS = b"PBDCESHQFXdcf12345TnZIsNAKRVtGHWv"


def _message(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!I", len(body) + 4) + body


messages = st.builds(
    _message,
    st.sampled_from(list(KINDS)),
    st.one_of(
        st.binary(max_size=12),
        st.sampled_from([b"\0", b"S\0", b"Sname\0", b"P\0", b"\0\0", b"p\0stmt\0rest", b"DISCARD ALL\0",
                         b"I", b"SET\0", b"SELECT 1\0", b"LISTEN\0", b"PREPARE\0", b"SET", b"LISTEN",
                         b"RESET\0", b"\0SELECT set_config('a', 'b', false)\0\0\0", b"SELECT SET_CONFIG(1)\0",
                         b"DO\0", b"\x00\x01\x00\x00\x00\x01x", b"tEmP\0", b"x_ADVISORY\0",
                         b"\0_Config(\0\0\0", b"em\0", b"_\0", b"INSERT 0 1\0", b"INSERT\0",
                         b"SELECT NextVal('s')\0", b"setval\0", b"val\0"]),
    ),
)
# garbage a broken server (or client) may send: impossible lengths, unknown kinds
garbage = st.sampled_from([b"D\0\0\0\x02", b"Y\0\0\0\x04", b"\0\0\0\0\x00", b"D\xff\xff\xff\xff",
                           b"Q\x80\0\0\0", b"\xff\0\0\0\x04"])
streams = st.lists(st.one_of(messages, messages, messages, garbage), max_size=12).map(b"".join)


@needs_compiled
@settings(max_examples=int(os.environ.get("SCAN_EXAMPLES", "600")), deadline=None)
@given(streams, st.integers(0, 3), st.binary(max_size=8), st.integers(0, 2), st.integers(4, 64),
       st.booleans(), st.integers(0, 40))
def test_scan_requests_twins(data, cut, pending, check_names, max_len, growing, whole_query):
    data = data[: max(0, len(data) - cut)]
    if growing:  # the relays also scan the bytearray an incomplete message grew in
        data = bytearray(data)
    py_pending, c_pending = bytearray(pending), bytearray(pending)
    expected = scan.py_scan_requests(data, 0, py_pending, check_names, max_len, whole_query)
    assert _scan.scan_requests(data, 0, c_pending, check_names, max_len, whole_query) == expected
    assert c_pending == py_pending


@needs_compiled
@settings(max_examples=int(os.environ.get("SCAN_EXAMPLES", "600")), deadline=None)
@given(streams, st.integers(0, 3), st.lists(st.integers(1, 24), max_size=8).map(bytes), st.booleans(),
       st.booleans())
def test_scan_replies_twins(data, cut, pending, growing, with_refs):
    data = data[: max(0, len(data) - cut)]
    if growing:
        data = bytearray(data)
    py_pending, c_pending = bytearray(pending), bytearray(pending)
    # what each request with a statement carries (ServerState.refs, client_names)
    py_refs, c_refs = (deque(range(len(pending))) for _ in range(2))
    py_names, c_names = (deque(b"n%d" % i for i in range(len(pending))) for _ in range(2))
    extra = ((py_refs, py_names), (c_refs, c_names)) if with_refs else ((), ())
    expected = scan.py_scan_replies(data, 0, py_pending, *extra[0])
    assert _scan.scan_replies(data, 0, c_pending, *extra[1]) == expected
    assert c_pending == py_pending
    assert (c_refs, c_names) == (py_refs, py_names)


def test_bind_complete_of_a_rewritten_bind_is_consumed_with_its_statement():
    """BIND_NAMED: with the deques given, BindComplete pops its statement and client name too,
    and stops where the pooler's own reply is due."""
    reply = _message(ord("2"), b"") + _message(ord("C"), b"SELECT 1\0") + _message(ord("Z"), b"I")
    for scan_replies in (scan.py_scan_replies, *(() if _scan is None else (_scan.scan_replies,))):
        pending = bytearray([scan.BIND_NAMED, scan.EXECUTE, scan.SYNC])
        refs, names = deque(["stmt"]), deque([b"s1"])
        assert scan_replies(reply, 0, pending, refs, names) == (len(reply), scan.DONE, 0, ord("I"))
        assert not pending and not refs and not names
        pending = bytearray([scan.BIND_NAMED, scan.SYNTH_CLOSE, scan.SYNC])
        refs, names = deque(["stmt"]), deque([b"s1"])
        assert scan_replies(reply, 0, pending, refs, names) == (5, scan.SYNTH_DUE, 0, -1)
        assert pending == bytearray([scan.SYNTH_CLOSE, scan.SYNC]) and not refs and not names
        assert scan_replies(reply, 0, bytearray([scan.BIND_NAMED]))[:2] == (0, scan.SPECIAL)  # no deques


def test_extended_round_trip_consumes_everything():
    """P B D E S out, 1 2 T D C Z back: all tracked, the ReadyForQuery reported."""
    pending = bytearray()
    request = (_message(ord("P"), b"\0SELECT 1\0\0\0") + _message(ord("B"), b"\0\0" + b"\0" * 6)
               + _message(ord("D"), b"P\0") + _message(ord("E"), b"\0\0\0\0\0") + _message(ord("S"), b""))
    assert scan.scan_requests(request, 0, pending, True, 1 << 30) == (len(request), scan.DONE, 0,
                                                                      scan.SAW_PARSE)
    assert list(pending) == [scan.PARSE, scan.BIND, scan.DESCRIBE, scan.EXECUTE, scan.SYNC]
    reply = (_message(ord("1"), b"") + _message(ord("2"), b"") + _message(ord("T"), b"\0\0")
             + _message(ord("D"), b"\0\0") + _message(ord("C"), b"SELECT 1\0") + _message(ord("Z"), b"I"))
    assert scan.scan_replies(reply, 0, pending) == (len(reply), scan.DONE, 0, ord("I"))
    assert pending == bytearray()


def test_named_statement_is_left_to_the_pooler():
    pending = bytearray()
    named = _message(ord("P"), b"s1\0SELECT 1\0\0\0")
    assert scan.scan_requests(named, 0, pending, True, 1 << 30) == (0, scan.SPECIAL, 0, 0)
    assert scan.scan_requests(named, 0, pending, False, 1 << 30) == (len(named), scan.DONE, 0, 0)


def test_big_data_row_is_streamed():
    pending = bytearray([scan.QUERY])
    row = _message(ord("D"), b"x" * 1000)
    assert scan.scan_replies(row[:100], 0, pending) == (100, scan.STREAM, len(row) - 100, -1)


def test_rows_of_the_poolers_own_query_are_left_to_it():
    """HIDDEN_ROWS (ServerConn.capture): its DataRows stop the scanner, whole, never streamed."""
    row = _message(ord("D"), b"\0\1\0\0\0\1x")
    for scan_replies in (scan.py_scan_replies, *(() if _scan is None else (_scan.scan_replies,))):
        assert scan_replies(row, 0, bytearray([scan.HIDDEN_ROWS])) == (0, scan.SPECIAL, 0, -1)
        assert scan_replies(row[:6], 0, bytearray([scan.HIDDEN_ROWS])) == (0, scan.DONE, 0, -1)
        assert scan_replies(row, 0, bytearray([scan.QUERY])) == (len(row), scan.DONE, 0, -1)


@pytest.mark.parametrize("sql", [b"SELECT set_config('search_path', 'x', false)",
                                 b"select SET_CONFIG($1, $2, false)"])
def test_set_config_in_a_request_is_left_to_the_pooler(sql):
    query = _message(ord("Q"), sql + b"\0")
    parse = _message(ord("P"), b"\0" + sql + b"\0\0\0")
    for scan_requests in (scan.py_scan_requests, *(() if _scan is None else (_scan.scan_requests,))):
        for msg in (query, parse):
            assert scan_requests(msg, 0, bytearray(), scan.NAMES_MAPPED, 1 << 30) == (0, scan.SPECIAL, 0, 0)
            plain = scan_requests(msg, 0, bytearray(), scan.NAMES_PLAIN, 1 << 30)
            assert plain == (len(msg), scan.DONE, 0, 0)


_BOTH_REQUEST_SCANNERS = (scan.py_scan_requests, *(() if _scan is None else (_scan.scan_requests,)))


@pytest.mark.parametrize(("kinds", "seen"), [
    ("Q", scan.SAW_QUERY), ("PQ", scan.SAW_PARSE | scan.SAW_QUERY), ("QP", scan.SAW_PARSE),
    ("PQP", scan.SAW_PARSE), ("PBES", scan.SAW_PARSE), ("BES", 0), ("S", 0)])
def test_what_became_of_the_unnamed_statement(kinds, seen):
    """`seen`: an unnamed Parse sets the client's unnamed statement, a later simple Query drops it;
    in session mode (NAMES_PLAIN) the relay does not need to know."""
    bodies = {"Q": b"SELECT 1\0", "P": b"\0SELECT 2\0\0\0", "B": b"\0\0" + b"\0" * 6,
              "E": b"\0\0\0\0\0", "S": b""}
    data = b"".join(_message(ord(kind), bodies[kind]) for kind in kinds)
    for scan_requests in _BOTH_REQUEST_SCANNERS:
        mapped = scan_requests(data, 0, bytearray(), scan.NAMES_MAPPED, 1 << 30)
        assert mapped == (len(data), scan.DONE, 0, seen)
        assert scan_requests(data, 0, bytearray(), scan.NAMES_PLAIN, 1 << 30) == (len(data), scan.DONE, 0, 0)


@pytest.mark.parametrize(("sql", "special"), [
    (b'SELECT 1 AS "a", \'"PGDOORMAN_\' FROM "PGDOORMAN_1"', True),
    (b'SELECT \'"PGDOORMAN\'', False),  # the mark cut short by the end of the text
    (b'SELECT "x" "PGDOORMAN', False),
    (b"SELECT a_b, c_configx_ FROM t_Config", True),
    (b"SELECT a_b, c_confi", False),
    (b"SELECT x FROM t WHERE y = '_CONFIG'", True),
    (b"SELECT x_cOnfig", True),
    (b"SELECT pg_try_ADVISORY_lock(1)", True),
    (b"SELECT advisory", False),
    (b"CREATE TEMPORARY TABLE t (a int)", True),
    (b"SELECT * INTO Temp t FROM x", True),
    (b"SELECT tem", False),
    (b"temp IS NULL", True),
    (b"SELECT 1 -- TEMP", True),
    (b"SELECT x FROM tEm", False),
    (b"SELECT _advisor", False),
    (b"SELECT _", False),
    (b"set\tsearch_path = x", True),
    (b"settle", False),
    (b"SELECT nextval('s')", True),
    (b"SELECT NEXTVAL('s')", True),
    (b"SELECT pg_catalog.setval('s', 5)", True),
    (b"SELECT currval('s'), lastval()", False),  # readers: what DISCARD SEQUENCES is for
    (b"INSERT INTO t VALUES (1)", False),
    (b"val", False),
    (b"xval", False),
    (b"extval", False),
])
def test_query_texts_the_pooler_reads(sql, special):
    """The compiled scanner's memchr-based search finds what the Python twin finds: the pooler's
    server-side names, and what may change session state (settings, advisory locks, temp tables)."""
    query = _message(ord("Q"), sql + b"\0")
    for scan_requests in _BOTH_REQUEST_SCANNERS:
        result = scan_requests(query, 0, bytearray(), scan.NAMES_MAPPED, 1 << 30)
        assert result == ((0, scan.SPECIAL, 0, 0) if special else (len(query), scan.DONE, 0, scan.SAW_QUERY))
