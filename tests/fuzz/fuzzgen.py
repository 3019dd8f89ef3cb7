"""Hypothesis strategies for client scripts (see fuzzproto for the script model).

Why an `st.composite` script generator and not a `RuleBasedStateMachine`: every example has to be
run twice, directly and through the pooler, from the same starting state, and compared as a whole
(replies that an unflushed batch owes may arrive one step later in one run than in the other; a
hang-up ends one run early). A script that is a plain value can be run, compared, printed, shrunk
and pasted as a regression test unchanged; a state machine's example is a sequence of rule calls
bound to one live system. The generator is still stateful where it matters: it knows the
statement names it has used, whether a batch is open (no Sync yet) and whether a COPY is being fed,
so that scripts are mostly meaningful and sometimes deliberately not.
"""

from __future__ import annotations

import os

from fuzzproto import (
    CANCEL_SLEEP,
    TABLE,
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    Msg,
    Pad,
    Parse,
    Query,
    Step,
    Sync,
    Terminate,
)
from hypothesis import strategies as st

#: Features not to generate, e.g. PGDOORMAN_FUZZ_SKIP=terminate,hangup to look past a known bug:
#: simple extended copy big cancel (step kinds); hangup terminate (endings; skipping terminate also
#: syncs an open batch before the runner's final Terminate); cuts; unflushed (batches ended by
#: Flush or nothing); batch-query (a Query inside a batch); copy-extended; copy-bad (bad rows,
#: CopyFail, a missing table); unnamed-reuse (Bind without Parse); reparse (Parse of a name in use);
#: param-count (a Bind with too few parameters); dealloc; session-state.
SKIP = frozenset(filter(None, os.environ.get("PGDOORMAN_FUZZ_SKIP", "").replace(" ", "").split(",")))

BIG = st.integers(100_000, 1_000_000)
ids = st.integers(1, 6)
words = st.sampled_from(["a", "b", "zz", "it's"])


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@st.composite
def simple_sql(draw, mode: str) -> str:
    """One simple-protocol statement (or a few, separated by ';')."""
    i, w = draw(ids), draw(words)
    choices = [
        "SELECT 1",
        f"SELECT g, repeat('r', {draw(st.integers(1, 40))}) FROM generate_series(1, "
        f"{draw(st.sampled_from([1, 3, 50, 3000]))}) g",
        f"SELECT id, v FROM {TABLE} ORDER BY id",
        f"INSERT INTO {TABLE} VALUES ({i}, {_lit(w)})",
        f"INSERT INTO {TABLE} VALUES ({i}, {_lit(w)})",
        "BEGIN", "BEGIN", "COMMIT", "COMMIT", "ROLLBACK",
        f"BEGIN; INSERT INTO {TABLE} VALUES ({i}, 'b')",
        f"INSERT INTO {TABLE} VALUES ({i}, 'm'); SELECT 1/0",
        f"SELECT 1; INSERT INTO {TABLE} VALUES ({i}, 'n'); SELECT count(*) FROM {TABLE}",
        "SELECT 2; COMMIT",
        "SELECT 1/0",
        "SELEC 1",
        "",
        "SELECT pg_sleep(0.05)",
        "SELECT now() = statement_timestamp(), txid_current_if_assigned() IS NULL",
        "SHOW statement_timeout",
        "SET LOCAL statement_timeout = '9s'",
    ]
    if "dealloc" not in SKIP:
        choices += ["DEALLOCATE s1", "DEALLOCATE ALL"]
    # session state; in transaction mode it is the next issue's business
    if mode == "session" and "session-state" not in SKIP:
        choices += [
            "SET search_path = pg_catalog, public",
            "SET statement_timeout = '7s'",
            "SET application_name = 'fz'",
            "CREATE TEMP TABLE fz_tmp(a int)",
            "PREPARE q1 AS SELECT 1",
            "EXECUTE q1",
            "LISTEN fz_chan",
            "NOTIFY fz_chan, 'x'",
            "SELECT pg_advisory_lock(7)",
            "DECLARE fz_c CURSOR WITH HOLD FOR SELECT 1",
        ]
    return draw(st.sampled_from(choices))


# (sql, parameter kinds): int / div (may be 0) / id / text / count / big
EXTENDED = [
    ("SELECT $1::int + 1", ("int",)),
    ("SELECT 1 / $1::int", ("div",)),
    (f"INSERT INTO {TABLE} VALUES ($1::int, $2)", ("id", "text")),
    (f"SELECT id, v FROM {TABLE} ORDER BY id", ()),
    ("SELECT g FROM generate_series(1, $1::int) g", ("count",)),
    ("SELEC $1", ("text",)),
    ("BEGIN", ()),
    ("COMMIT", ()),
    ("ROLLBACK", ()),
    ("SELECT length($1)", ("big",)),
    ("SELECT pg_sleep(0.05)", ()),
    ("", ()),
]


@st.composite
def param(draw, kind: str) -> str | Pad:
    if kind == "int":
        return draw(st.sampled_from(["1", "2", "-3", "abc"]))
    if kind == "div":
        return draw(st.sampled_from(["1", "0"]))
    if kind == "id":
        return str(draw(ids))
    if kind == "count":
        return draw(st.sampled_from(["1", "3", "40"]))
    if kind == "big":
        if draw(st.integers(0, 3)) == 3:
            return Pad(draw(BIG))
        return draw(words)
    return draw(words)


@st.composite
def unit(draw, names: set[str]) -> list[Msg]:
    """Parse? Bind Describe? Execute+ Close?: one statement's worth of extended protocol."""
    sql, kinds = draw(st.sampled_from(EXTENDED))
    name = draw(st.sampled_from(["", "", "", "s1", "s2"]))
    if "reparse" in SKIP and name in names:
        name = ""
    portal = draw(st.sampled_from(["", "", "", "p1"]))
    out: list[Msg] = []
    # mostly: parse it; sometimes bind what may not exist
    if draw(st.integers(0, 7)) < 7 or not names or "unnamed-reuse" in SKIP:
        out.append(Parse(sql, name))
        names.add(name)
        if draw(st.integers(0, 4)) == 4:
            out.append(Describe("S", name))
    params = tuple(draw(param(k)) for k in kinds)
    if draw(st.integers(0, 9)) == 9 and params and "param-count" not in SKIP:
        params = params[:-1]  # a wrong parameter count
    out.append(Bind(params, name, portal))
    if draw(st.integers(0, 3)) == 3:
        out.append(Describe("P", portal))
    max_rows = draw(st.sampled_from([0, 0, 0, 1, 2]))
    out.append(Execute(portal, max_rows))
    if max_rows and draw(st.booleans()):
        out.append(Execute(portal, 0))
    if draw(st.integers(0, 9)) == 9:
        out.append(Close(*draw(st.sampled_from([("S", name), ("P", portal)]))))
    return out


@st.composite
def extended_batch(draw, names: set[str]) -> tuple[list[Msg], str]:
    """1-3 units, perhaps a simple Query among them, ended by Sync, Flush or nothing."""
    msgs: list[Msg] = []
    for _ in range(draw(st.integers(1, 3))):
        msgs += draw(unit(names))
        if draw(st.integers(0, 9)) == 9 and "batch-query" not in SKIP:
            msgs.append(Query(draw(st.sampled_from(["SELECT 1", f"INSERT INTO {TABLE} VALUES (9, 'q')"]))))
    end = draw(st.sampled_from(["sync"] * 6 + ([] if "unflushed" in SKIP else ["flush", "flush", "none"])))
    if end == "sync":
        msgs.append(Sync())
    elif end == "flush":
        msgs.append(Flush())
    return msgs, end


@st.composite
def copy_rows(draw) -> list[Msg]:
    out: list[Msg] = []
    for _ in range(draw(st.integers(0, 3))):
        bad = [] if "copy-bad" in SKIP else ["bad"]
        kind = draw(st.sampled_from(["good", "good", "good", "big", *bad]))
        if kind == "good":
            out.append(CopyData("".join(f"{draw(st.integers(10, 40))}\t{draw(st.sampled_from('vw'))}\n"
                                        for _ in range(draw(st.integers(1, 3))))))
        elif kind == "bad":
            out.append(CopyData("x\ty\n"))
        else:
            out.append(CopyData(f"{draw(st.integers(41, 60))}\t{{pad}}\n", pad=draw(BIG)))
    return out


@st.composite
def copy_step(draw) -> list[Msg]:
    direction = draw(st.sampled_from(["in", "in", "in", "out"]))
    extended = draw(st.booleans()) and "copy-extended" not in SKIP
    table = draw(st.sampled_from([TABLE] * 7 + ([] if "copy-bad" in SKIP else ["fz_nope"])))
    if direction == "out":
        sql = f"COPY (SELECT id, v FROM {table} ORDER BY id) TO STDOUT"
        if not extended:
            return [Query(sql)]
        return [Parse(sql), Bind(), Execute(), Sync()]
    sql = f"COPY {table} FROM STDIN"
    end: Msg = CopyDone() if draw(st.integers(0, 4)) < 4 or "copy-bad" in SKIP else CopyFail()
    rows = draw(copy_rows())
    if not extended:
        return [Query(sql), *rows, end]
    head: list[Msg] = [Parse(sql), Bind()]
    if draw(st.booleans()):
        head.append(Describe("P"))
    head.append(Execute())
    if draw(st.integers(0, 4)) < 4:
        head.append(Sync())  # libpq: Sync after Execute, and again after CopyDone
    return [*head, *rows, end, Sync()]


@st.composite
def cuts_for(draw, length: int, big: bool) -> tuple[int, ...]:
    if length < 2 or "cuts" in SKIP:
        return ()
    n = draw(st.integers(1, 5)) if big else draw(st.sampled_from([0, 0, 0, 0, 1, 2]))
    return tuple(sorted(set(draw(st.lists(st.integers(1, length - 1), min_size=n, max_size=n)))))


KINDS = [("simple", 7), ("extended", 6), ("copy", 3), ("big", 2), ("cancel", 1)]
ENDINGS = [("plain", 4), ("hangup", 3), ("terminate", 1)]


@st.composite
def steps(draw, mode: str) -> list[Step]:
    """A whole client script."""
    names: set[str] = set()
    script: list[Step] = []
    for _ in range(draw(st.integers(1, 6))):
        kinds = [k for k, w in KINDS for _ in range(w) if k not in SKIP] or ["simple"]
        kind = draw(st.sampled_from(kinds))
        cancel = False
        big = False
        if kind == "simple":
            msgs: list[Msg] = [Query(draw(simple_sql(mode)))]
        elif kind == "extended":
            msgs, _ = draw(extended_batch(names))
        elif kind == "copy":
            msgs = draw(copy_step())
            big = any(isinstance(m, CopyData) and m.pad for m in msgs)
        elif kind == "big":
            big = True
            msgs = draw(big_request(names))
        else:
            cancel = True
            msgs = draw(cancel_request())
            big = any(isinstance(m, Query) and m.pad for m in msgs)
        cuts = draw(cuts_for(sum(len(m.encode()) for m in msgs), big))
        script.append(Step(tuple(msgs), cuts, cancel=cancel))
    ending = draw(st.sampled_from([e for e, w in ENDINGS for _ in range(w) if e not in SKIP]))
    if ending == "plain" and "terminate" in SKIP and not isinstance(script[-1].msgs[-1], Query | Sync):
        script.append(Step((Sync(),)))  # no Terminate right after an unsynced batch either
    if ending == "hangup" and script[-1].cancel:
        script.append(Step((), hangup=draw(st.sampled_from(["close", "rst"]))))
    elif ending == "hangup":
        last = script.pop()
        n_pieces = len(last.pieces())
        after = draw(st.integers(1, n_pieces)) if n_pieces > 1 else -1
        script.append(Step(last.msgs, last.cuts, hangup=draw(st.sampled_from(["close", "rst"])),
                           hangup_after=after))
    elif ending == "terminate":
        last = script.pop()
        if not last.cancel and not any(isinstance(m, CopyData | CopyDone | CopyFail) for m in last.msgs) \
                and isinstance(last.msgs[-1], Query | Sync):
            script.append(Step((*last.msgs, Terminate()), last.cuts))
        else:
            script.append(last)
    return script


@st.composite
def big_request(draw, names: set[str]) -> list[Msg]:
    """A Query or Bind of 100 KB - 1 MB, perhaps behind a small pipelined request."""
    out: list[Msg] = []
    if draw(st.booleans()):
        out.append(Query("SELECT 1"))
    if draw(st.booleans()):
        sql = draw(st.sampled_from(["SELECT 1", f"BEGIN; INSERT INTO {TABLE} VALUES (7, 'big')",
                                    f"INSERT INTO {TABLE} VALUES (8, 'big')", "SELECT pg_sleep(0.05)",
                                    "SELECT 1/0"]))
        out.append(Query(sql, pad=draw(BIG)))
    else:
        name = draw(st.sampled_from(["", "s1"]))
        out += [Parse("SELECT length($1)", name), Bind((Pad(draw(BIG)),), name), Execute()]
        names.add(name)
        out.append(draw(st.sampled_from([Sync(), Sync(), Flush()])))
    return out


@st.composite
def cancel_request(draw) -> list[Msg]:
    sql = f"SELECT pg_sleep({CANCEL_SLEEP})"
    how = draw(st.sampled_from(["simple", "simple", "extended", "big"]))
    if how == "simple":
        return [Query(draw(st.sampled_from([sql, f"BEGIN; {sql}"])))]
    if how == "big":
        return [Query(sql, pad=draw(BIG))]
    return [Parse(sql), Bind(), Execute(), Sync()]
