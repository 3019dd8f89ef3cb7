"""SQL prepared statements (`PREPARE name AS ...`) follow their client from server to server.

In transaction and statement mode a client's SQL prepared statements are a record of
(name, PREPARE text) pairs, the same kind of record as its settings (settings.py). PostgreSQL is
the authority on what exists: after a transaction whose tags show PREPARE or DEALLOCATE, the
settings read-back also lists pg_prepared_statements where from_sql. For each name the pooler
takes, from the query text PostgreSQL shows (the whole query string the PREPARE came in), the
`PREPARE name ...` statement of that text: that is the text replayed elsewhere. A statement
whose PREPARE cannot be told from its text (a name PostgreSQL truncated or one spelled U&"...",
a text with two PREPAREs of one name) cannot move: it pins the client (pins.py).

Whenever the client is lent a server, the server's set is made the client's: what the server holds
that the client does not (another client's statements, or the same name for another query) is
DEALLOCATEd, and what the client holds that the server lacks is PREPAREd, after the settings
replay (a PREPARE resolves names by the client's search_path), one pooler query each, pipelined
(one failing, its table dropped, loses no other). A client sees exactly its own statements, and
two clients may use one name. A client returning to a server that has its set pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from pgdoorman.protocol import messages as m

Prepared = tuple[tuple[str, str], ...]  # sorted (name, PREPARE text)

# Rows of the settings read-back (settings.session_settings_sql): a space in the name keeps them
# apart from settings.
PREPARED_ROW = " prepared "
PREPARED_SQL = (
    f" UNION ALL SELECT * FROM (SELECT '{PREPARED_ROW}' || name, statement"
    " FROM pg_catalog.pg_prepared_statements WHERE from_sql ORDER BY name) p"
)
_SPACE = b" \t\n\r\f\v"
_IDENT_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_" + bytes(range(128, 256)))
_IDENT_CHAR = _IDENT_START | frozenset(b"0123456789$")


def _skip_comment(text: bytes, i: int) -> int:
    """Past a comment starting at i (-- or /* */, which nest), or i if there is none."""
    if text.startswith(b"--", i):
        end = text.find(b"\n", i)
        return len(text) if end < 0 else end + 1
    if text.startswith(b"/*", i):
        depth, i = 1, i + 2
        while i < len(text) and depth:
            if text.startswith(b"/*", i):
                depth, i = depth + 1, i + 2
            elif text.startswith(b"*/", i):
                depth, i = depth - 1, i + 2
            else:
                i += 1
        return i
    return i


def _skip_space(text: bytes, i: int) -> int:
    while i < len(text):
        if text[i] in _SPACE:
            i += 1
            continue
        after = _skip_comment(text, i)
        if after == i:
            break
        i = after
    return i


def split_statements(text: bytes) -> list[bytes]:
    """The statements of a query string, split at the semicolons outside literals, quoted
    identifiers, dollar quotes and comments (PostgreSQL's lexer, standard_conforming_strings on),
    each without the comments and white space before it."""
    out: list[bytes] = []
    n = len(text)
    start = i = _skip_space(text, 0)
    while i < n:
        ch = text[i]
        if ch == 59:  # ;
            if i > start:
                out.append(text[start:i])
            start = i = _skip_space(text, i + 1)
            continue
        if ch == 39 or ch == 34:  # ' or "
            escapes = (ch == 39 and i > 0 and text[i - 1] in b"eE"
                       and (i < 2 or text[i - 2] not in _IDENT_CHAR))
            i += 1
            while i < n:
                if escapes and text[i] == 92:  # backslash
                    i += 2
                    continue
                if text[i] == ch:
                    if i + 1 < n and text[i + 1] == ch:  # doubled: part of it
                        i += 2
                        continue
                    break
                i += 1
            i += 1
            continue
        if ch == 36 and (i == 0 or text[i - 1] not in _IDENT_CHAR):  # $tag$ ... $tag$ (not $1)
            j = i + 1
            while j < n and text[j] in _IDENT_CHAR and text[j] != 36:
                j += 1
            if j < n and text[j] == 36 and (j == i + 1 or text[i + 1] in _IDENT_START):
                tag = text[i : j + 1]
                close = text.find(tag, j + 1)
                i = n if close < 0 else close + len(tag)
                continue
            i += 1
            continue
        after = _skip_comment(text, i)
        i = after if after != i else i + 1
    if start < n:
        out.append(text[start:n])
    return out


def prepare_name(statement: bytes) -> str | None:
    """The name a `PREPARE name ...` statement gives, as PostgreSQL resolves it; None if the
    statement is not a PREPARE or names it in a way not read here (U&"...")."""
    if len(statement) < 8 or statement[:7].lower() != b"prepare":
        return None
    i = _skip_space(statement, 7)
    if i == 7 or i >= len(statement):
        return None
    if statement[i] == 34:  # "quoted"
        name = bytearray()
        i += 1
        while i < len(statement):
            if statement[i] == 34:
                if i + 1 < len(statement) and statement[i + 1] == 34:
                    name.append(34)
                    i += 2
                    continue
                return bytes(name).decode(errors="replace") if name else None
            name.append(statement[i])
            i += 1
        return None
    j = i
    if statement[j] not in _IDENT_START:
        return None
    while j < len(statement) and statement[j] in _IDENT_CHAR:
        j += 1
    word = statement[i:j]
    if word[:2].lower() == b"u&" or (j < len(statement) and statement[j] == 38):
        return None
    return word.lower().decode(errors="replace")  # ASCII folds to lower case, as PostgreSQL's


def prepare_text(name: str, query: str) -> str | None:
    """The one `PREPARE name ...` statement in a query string, or None if there is none, or more
    than one (which of them made the statement depends on which failed: the pooler cannot tell)."""
    found = [statement for statement in split_statements(query.encode()) if prepare_name(statement) == name]
    return found[0].decode() if len(found) == 1 else None


def read_prepared(rows: Sequence[Sequence[str | None]]) -> tuple[Prepared, list[str]]:
    """(the movable SQL prepared statements, names of those that cannot move) from the read-back's
    rows."""
    movable: list[tuple[str, str]] = []
    stuck: list[str] = []
    for key, query in rows:
        if key is None or not key.startswith(PREPARED_ROW):
            continue
        name = key[len(PREPARED_ROW):]
        text = prepare_text(name, query or "")
        if text is None:
            stuck.append(name)
        else:
            movable.append((name, text))
    return tuple(movable), stuck


def replay_prepared(mine: Prepared, server_has: Prepared) -> list[str]:
    """The pooler's queries that make the server's set of SQL prepared statements the client's
    (none when it is already): one per statement, so that one failing (its table dropped since)
    loses no other."""
    have = dict(server_has)
    want = dict(mine)
    drop = [m.quote_ident(name) for name, text in server_has if want.get(name) != text]
    queries = [f"DEALLOCATE {name}" for name in drop]
    queries += [text for name, text in mine if have.get(name) != text]
    return queries
