"""Frame scanners for the relay's hot path: walk message headers, track owed replies.

`pending` is a bytearray of request kinds, oldest first, one per request that gets a reply. The
scanners handle the plain, frequent cases themselves and stop at anything that needs the pooler's
judgement (named statements, hidden or synthetic replies, errors, parameter changes), returning its
position. The compiled twin in _scan.c implements exactly these functions; PGDOORMAN_PURE_PYTHON=1
forces this version.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import Any

# Request kinds in `pending`. Up to CLOSE the scanners handle them; the rest are the pooler's.
QUERY = 1  # simple Query or FunctionCall: everything up to ReadyForQuery
SYNC = 2
PARSE = 3  # unnamed
BIND = 4  # unnamed statement
DESCRIBE = 5
EXECUTE = 6
CLOSE = 7
HIDDEN_QUERY = 8  # pooler's own query (SET, ROLLBACK, reset): all replies hidden
HIDDEN_PARSE = 9  # Parse injected before a Bind/Describe: ParseComplete hidden
HIDDEN_CLOSE = 10  # eviction: CloseComplete hidden
PARSE_NAMED = 11  # rewritten client Parse (has a ref)
BIND_NAMED = 12  # rewritten client Bind (has a ref)
DESCRIBE_NAMED = 13  # client Describe of a mapped statement (has a ref): its shape is recorded
HIDDEN_DESCRIBE = 14  # the pooler checks a re-prepared statement's shape (has a ref); all hidden
HIDDEN_BIND = 15  # the pooler's Bind/Execute that raises an error on the server (BindComplete
HIDDEN_EXECUTE = 16  # hidden; the error itself goes to the client): see ServerConn.raise_error
HIDDEN_ROWS = 17  # pooler's own query whose rows it reads (ServerConn.capture): all hidden
# From SYNTH_FIRST on, a kind is "due" as soon as everything before it is answered: the pooler
# answers it itself, in order.
SYNTH_FIRST = 20
SYNTH_CLOSE = 21  # client Close of a statement: pooler answers CloseComplete
COPY_END = 22  # client CopyDone/CopyFail: no reply; marks where the Syncs PostgreSQL ignores end
SYNTH_QUERY = 23  # a simple Query the pooler answers (ServerConn.synth_replies), then ReadyForQuery

# check_names modes of scan_requests
NAMES_PLAIN = 0  # session mode: names pass unchanged
NAMES_MAPPED = 1  # named statements are the pooler's to map
NAMES_GUARDED = 2  # ... and the unnamed statement on this server may be another client's: stop
# at a Bind/Describe of it until this client's own unnamed Parse (the caller sees the PARSE)

# scan_requests' `seen` bits
SAW_PARSE = 1  # an unnamed Parse was counted (the server's unnamed statement is the client's)...
SAW_QUERY = 2  # ... and a simple Query after the last one (which drops it), or a Query alone

# Scanner results
DONE = 0  # every complete message consumed; data[pos:] is an incomplete message to hold back
STREAM = 1  # the last message is an incomplete DataRow/CopyData: `skip` more bytes belong to it
SPECIAL = 2  # the complete message at pos needs the pooler
BAD_LENGTH = 3  # the message at pos has an impossible length
SYNTH_DUE = 4  # a reply before pos completed a request and the oldest owed is now the pooler's own

_unpack_len = struct.Struct("!I").unpack_from
_WHOLE = frozenset(b"PBDCX")  # requests read whole (names); others may be streamed
_PLAIN_REQUEST = {81: QUERY, 70: QUERY, 69: EXECUTE, 83: SYNC, 68: DESCRIBE, 67: CLOSE}
_STREAMED_REQUEST = {81: QUERY, 70: QUERY, 69: EXECUTE, 83: SYNC}  # owed from their first byte
# Simple queries the pooler reads itself where statements are mapped: SQL DEALLOCATE of a
# client's protocol-level statement, and PREPARE/DEALLOCATE of the pooler's own names.
_OWN_QUERY_PREFIXES = (b"deallocate", b"prepare")
QUOTED_SERVER_NAME = b'"PGDOORMAN_'  # how SQL can name the pooler's statements (see prepared.py)
# A query that may change session state: it starts with SET (the pooler reads the names of custom
# settings from it), or mentions, in any case, "_config" (set_config), "_advisory" (advisory locks)
# or "temp" (temporary tables). A false positive (pg_config, a column named temperature) costs one
# read-back. The pooler reads the session back after it (frontend/settings.py, frontend/pins.py).
_SESSION_MARKS = (b"_config", b"_advisory", b"temp")
# Sequence functions that set the session's currval/lastval: the next other client lent the server
# gets DISCARD SEQUENCES first (so does one after an INSERT, whose defaults may call nextval).
SEQUENCE_MARKS = (b"nextval", b"setval")


def mentions_session_state(data: bytes | bytearray, start: int, end: int) -> bool:
    if end - start >= 4 and data[start : start + 3].lower() == b"set" and data[start + 3] in b" \t\n\r":
        return True
    text = bytes(data[start:end]).lower()
    return any(mark in text for mark in _SESSION_MARKS) or any(mark in text for mark in SEQUENCE_MARKS)


def changes_settings(text: bytes) -> bool:
    """Of the texts mentions_session_state flags (here in lower case), those the session read-back
    is for (the rest only call sequence functions)."""
    return (text[:3] == b"set" and text[3:4] in (b" ", b"\t", b"\n", b"\r")) or any(
        mark in text for mark in _SESSION_MARKS)


# CommandComplete tags of statements that change session state a later client could see.
_SESSION_TAGS = frozenset((b"SET\0", b"RESET\0", b"LISTEN\0", b"PREPARE\0", b"LOAD\0"))


# Backend messages that may arrive after login; any other kind (or an impossible length) is the
# pooler's to judge: it closes that server.
REPLY_KINDS = frozenset(b"SZCDEINAT" b"nt123sGHWdcV")
MAX_REPLY_LENGTH = 0x7FFFFFFF  # the length field is a signed int32 in PostgreSQL


def py_scan_replies(data: bytes | bytearray, pos: int, pending: bytearray, refs: deque[Any] | None = None,
                    names: deque[bytes] | None = None) -> tuple[int, int, int, int]:
    """Walk server messages from pos, consuming pending. Returns (pos, result, skip, last_z) where
    last_z is the status byte of the last ReadyForQuery consumed, or -1.

    With refs and names (ServerState's deques of what each request with a statement carries), a
    BindComplete of a BIND_NAMED, the pooler's rewritten Bind, is consumed here too."""
    n = len(data)
    last_z = -1
    while pos + 5 <= n:
        kind = data[pos]
        length = _unpack_len(data, pos + 1)[0]
        if length < 4 or length > MAX_REPLY_LENGTH:
            return pos, BAD_LENGTH, 0, last_z
        end = pos + 1 + length
        if end > n:
            # DataRow, CopyData, FunctionCallResponse: relayed as they arrive, whatever their size
            if pending and (kind == 100 or kind == 86 or (kind == 68 and pending[0] != HIDDEN_ROWS)):
                return n, STREAM, end - n, last_z
            return pos, DONE, 0, last_z
        if kind == 68:
            if not pending or pending[0] == HIDDEN_ROWS:
                return pos, SPECIAL, 0, last_z  # the pooler reads its own query's rows
            pos = end
            continue
        if kind == 50 and refs is not None and pending and pending[0] == BIND_NAMED:
            refs.popleft()  # BindComplete of a rewritten client Bind: its statement is done with
            assert names is not None
            names.popleft()
            del pending[0]
            pos = end
            if pending and pending[0] >= SYNTH_FIRST:
                return pos, SYNTH_DUE, 0, last_z
            continue
        if (not pending or kind == 83 or kind == 69 or kind == 71 or pending[0] > CLOSE
                or kind not in REPLY_KINDS):
            return pos, SPECIAL, 0, last_z  # ParameterStatus, errors, CopyInResponse, pooler's own
        if end == pos + 5 and (kind == 90 or kind == 67):
            return pos, SPECIAL, 0, last_z  # no status/tag: malformed, the pooler judges
        head = pending[0]
        popped = False
        if kind == 90:
            if head != QUERY and head != SYNC:
                return pos, SPECIAL, 0, last_z  # replies to skipped requests: the pooler settles
            last_z = data[pos + 5]
            popped = True
        elif kind == 49 or kind == 50 or kind == 51:
            if head != (PARSE if kind == 49 else BIND if kind == 50 else CLOSE):
                return pos, SPECIAL, 0, last_z
            popped = True
        elif kind == 84 or kind == 110:
            popped = head == DESCRIBE
        elif kind == 67 or kind == 73 or kind == 115:
            if kind == 67 and (data[pos + 5] == 68 or bytes(data[pos + 5 : end]) in _SESSION_TAGS or (
                    data[pos + 5] == 73 and data[pos + 5 : pos + 12] == b"INSERT ")):
                return pos, SPECIAL, 0, last_z  # DISCARD/DEALLOCATE ALL, session state, an INSERT
            popped = head == EXECUTE
        pos = end
        if popped:
            del pending[0]
            if pending and pending[0] >= SYNTH_FIRST:
                return pos, SYNTH_DUE, 0, last_z
    return pos, DONE, 0, last_z


def py_scan_requests(data: bytes | bytearray, pos: int, pending: bytearray, check_names: int,
                     max_len: int, whole_query: int = 0) -> tuple[int, int, int, int]:
    """Walk client messages from pos, appending to pending. Returns (pos, result, skip, seen).

    whole_query: with check_names, a Query up to this long is read whole before it is judged (its
    session-state marks are looked for); a longer one streams once its first 10 bytes are here,
    and the caller must assume it changed session state (SAW_QUERY with STREAM says so).

    check_names: NAMES_PLAIN, NAMES_MAPPED or NAMES_GUARDED. A request is owed a reply from its
    header on: an incomplete Query/FunctionCall/Execute/Sync is counted before it is streamed.
    seen (0 with NAMES_PLAIN) tells the relay what became of the unnamed statement: SAW_PARSE if
    an unnamed Parse was counted, plus SAW_QUERY if a Query was counted after the last of them."""
    start = len(pending)
    pos, result, skip = _scan_requests(data, pos, pending, check_names, max_len, whole_query)
    if not check_names or len(pending) == start:
        return pos, result, skip, 0
    parse_at = pending.rfind(PARSE, start)
    if parse_at >= 0:
        return pos, result, skip, SAW_PARSE | (SAW_QUERY if pending.find(QUERY, parse_at) >= 0 else 0)
    return pos, result, skip, SAW_QUERY if pending.find(QUERY, start) >= 0 else 0


def _scan_requests(data: bytes | bytearray, pos: int, pending: bytearray, check_names: int,
                   max_len: int, whole_query: int) -> tuple[int, int, int]:
    n = len(data)
    while pos + 5 <= n:
        kind = data[pos]
        length = _unpack_len(data, pos + 1)[0]
        if length < 4 or length > max_len:
            return pos, BAD_LENGTH, 0
        end = pos + 1 + length
        if end > n:
            if kind == 66:  # Bind: streamed once both names are here (large parameters)
                name_at = data.find(b"\0", pos + 5, n) + 1
                if name_at == 0 or data.find(b"\0", name_at, n) < 0:
                    return pos, DONE, 0
                if check_names and (data[name_at] != 0 or check_names == NAMES_GUARDED):
                    return pos, SPECIAL, 0
                pending.append(BIND)
                return n, STREAM, end - n
            if kind in _WHOLE:
                return pos, DONE, 0
            if kind == 81 and check_names:  # a Query the pooler may have to read: whole, or its start
                if length <= whole_query or n - pos - 5 < min(length - 4, 10) or (
                        data[pos + 5] in b"DdPp"
                        and data[pos + 5 : pos + 15].lower().startswith(_OWN_QUERY_PREFIXES)):
                    return pos, DONE, 0
            owed = _STREAMED_REQUEST.get(kind)
            if owed is not None:
                pending.append(owed)
            elif kind == 99 or kind == 102:
                pending.append(COPY_END)
            elif kind != 100 and kind != 72:
                return pos, SPECIAL, 0  # not a frontend message
            return n, STREAM, end - n
        if kind == 80:  # Parse
            if check_names and (length < 6 or data[pos + 5] != 0
                                or mentions_session_state(data, pos + 6, end)):
                return pos, SPECIAL, 0
            pending.append(PARSE)
            if check_names == NAMES_GUARDED:
                check_names = NAMES_MAPPED  # the unnamed statement is this client's from here on
        elif kind == 66:  # Bind: portal name, then statement name
            name_at = data.find(b"\0", pos + 5, end) + 1
            if name_at == 0 or name_at >= end:
                return pos, SPECIAL, 0
            if check_names and (data[name_at] != 0 or check_names == NAMES_GUARDED):
                return pos, SPECIAL, 0
            pending.append(BIND)
        elif kind == 81 and check_names and length >= 11 and (
                (data[pos + 5] in b"DdPp"
                 and data[pos + 5 : pos + 15].lower().startswith(_OWN_QUERY_PREFIXES))
                or data.find(QUOTED_SERVER_NAME, pos + 5, end) >= 0
                or mentions_session_state(data, pos + 5, end)):
            return pos, SPECIAL, 0
        elif kind in _PLAIN_REQUEST:
            if (kind == 68 or kind == 67) and check_names and length > 5 and data[pos + 5] == 83 \
                    and (data[pos + 6] != 0 or (kind == 68 and check_names == NAMES_GUARDED)):
                return pos, SPECIAL, 0  # Describe/Close of a named statement
            pending.append(_PLAIN_REQUEST[kind])
        elif kind == 99 or kind == 102:  # CopyDone, CopyFail
            pending.append(COPY_END)
        elif kind != 100 and kind != 72:  # CopyData, Flush: no reply
            return pos, SPECIAL, 0  # Terminate, or not a frontend message
        pos = end
    return pos, DONE, 0


def grow_partial(partial: bytes | bytearray, data: bytes | bytearray, need: int) -> tuple[bytearray, bool]:
    """An incomplete message grown by the next read, in place once it is a bytearray (amortised
    O(n), never joined again per read), and whether it is now `need` bytes: scanned only then."""
    if not isinstance(partial, bytearray):
        partial = bytearray(partial)
    partial += data
    return partial, len(partial) >= need


def message_need(data: bytes | bytearray, pos: int) -> int:
    """How long data[pos:], an incomplete message, must grow before it can be read whole."""
    have = len(data) - pos
    return have + 1 if have < 5 else 1 + _unpack_len(data, pos + 1)[0]


scan_replies = py_scan_replies
scan_requests = py_scan_requests
COMPILED = False
if not os.environ.get("PGDOORMAN_PURE_PYTHON"):
    try:
        from pgdoorman.protocol import _scan  # type: ignore[attr-defined]
    except ImportError:  # not compiled: the pure-Python twins above do the same, slower
        pass
    else:
        scan_replies = _scan.scan_replies
        scan_requests = _scan.scan_requests
        COMPILED = True
