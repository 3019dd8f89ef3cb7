"""A Query split over several reads must be judged like a whole one: state it leaves in the session
(here a temporary table) pins its client, so another client never gets that server with it.

Found by hand: the relay streamed any incomplete Query once its first 10 bytes were in, and so
never looked for its session-state marks; the next client on the server saw the temporary table."""

from __future__ import annotations

import time

import pytest
from helpers import Pooler, PoolerLauncher, RawConn, pool_config, query_message

SQL = "CREATE TEMP TABLE split_tt(x int)"
MINE = "SELECT count(*) FROM pg_class WHERE relname = 'split_tt' AND relnamespace = pg_my_temp_schema()"


def _ready(conn: RawConn) -> None:
    while conn.recv_message()[0] != b"Z":
        pass


def _leaked(p: Pooler, message: bytes, cuts: list[int]) -> bool:
    """Send message in pieces cut at `cuts`; True if a second client then sees its temp table."""
    with RawConn.for_pooler(p) as a:
        a.startup("trust_user", "tx")
        last = 0
        for cut in [*cuts, len(message)]:
            a.send(message[last:cut])
            last = cut
            time.sleep(0.002)  # each piece its own read
        _ready(a)
        with RawConn.for_pooler(p) as b:
            b.startup("trust_user", "tx")
            rows, errors, _ = b.query(MINE)
            assert not errors
            return rows != [["0"]]


@pytest.fixture
def split_pooler(start_pooler: PoolerLauncher) -> Pooler:
    return start_pooler(pool_config("tx", pool_size=2), {"workers": 1})


def test_query_split_at_every_byte(split_pooler: Pooler) -> None:
    message = query_message(SQL)
    leaks = [cut for cut in range(1, len(message)) if _leaked(split_pooler, message, [cut])]
    assert leaks == []


def test_query_longer_than_the_stream_size(start_pooler: PoolerLauncher) -> None:
    """Streamed (not read whole): the pooler reads the session back after it instead."""
    p = start_pooler(pool_config("tx", pool_size=2), {"workers": 1, "message_size_to_be_stream": 64})
    message = query_message(SQL + " " * 4000)
    assert not _leaked(p, message, [20, 2000])
    assert not _leaked(p, message, [6])
