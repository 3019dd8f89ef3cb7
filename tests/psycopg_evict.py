"""psycopg 3, pure-Python implementation over the system libpq (< 17): its prepared-statement cache
evicts with SQL `DEALLOCATE name`. Run by tests/test_deallocate.py in a subprocess, because
PSYCOPG_IMPL must be set before psycopg is imported:

    PSYCOPG_IMPL=python python tests/psycopg_evict.py "host=... port=... dbname=... user=..."

Prints one JSON line; exits non-zero (with the traceback) when anything goes wrong.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("PSYCOPG_IMPL") == "python", "run with PSYCOPG_IMPL=python"

import psycopg  # noqa: E402

DISTINCT = 6  # distinct queries per round, with prepared_max = 2: every round evicts
ROUNDS = 4


def _queries(conn: psycopg.Connection, salt: int) -> None:
    for k in range(DISTINCT):
        arg = salt * 100 + k
        row = conn.execute(f"SELECT %s::int + {k} AS v, '{k}'::text AS k", (arg,)).fetchone()
        assert row == (arg + k, str(k)), (salt, k, row)


def main(dsn: str) -> None:
    info = {"impl": psycopg.pq.__impl__, "libpq": psycopg.pq.version()}
    assert info["impl"] == "python", info
    assert info["libpq"] < 170000, f"libpq {info['libpq']} closes with Close messages, not DEALLOCATE"
    # autocommit: each statement its own transaction
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        conn.prepared_max = 2
        for r in range(ROUNDS):
            _queries(conn, r)
        # direct only: PostgreSQL holds no more than the cache (the evictions really ran)
        info["prepared_on_server"] = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_pg3\\_%'").fetchone()[0]
        # explicit transaction blocks: a failed DEALLOCATE would abort them
        for r in range(ROUNDS):
            with conn.transaction():
                _queries(conn, 10 + r)
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    # not autocommit: psycopg's implicit BEGIN, then COMMIT (and a ROLLBACK now and then)
    with psycopg.connect(dsn, prepare_threshold=0) as conn:
        conn.prepared_max = 2
        for r in range(ROUNDS):
            _queries(conn, 20 + r)
            if r % 2:
                conn.rollback()
            else:
                conn.commit()
    print(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1])
