"""Every reply reaches the client whose request produced it.

50 concurrent clients share the transaction pool of 4 servers. Each asks for values only it knows
(its id, a counter, a random token) through the extended protocol (asyncpg, psycopg server-side
binding) and through the simple protocol (psycopg client-side binding: literals in a Query message),
in and out of explicit transactions, and checks every row it gets back.
"""

from __future__ import annotations

import asyncio
import random
import secrets

import psycopg
from helpers import aconnect, apconnect

CLIENTS = 50
ROUNDS = 12


async def asyncpg_client(pooler, cid: int, rng: random.Random) -> int:
    conn = await aconnect(pooler, "tx")
    checked = 0
    try:
        for i in range(ROUNDS):
            token = secrets.token_hex(8)
            row = await conn.fetchrow("SELECT $1::text, $2::int, $3::text", f"client-{cid}", i, token)
            assert tuple(row) == (f"client-{cid}", i, token), (cid, i)
            checked += 1
            if rng.random() < 0.5:
                async with conn.transaction():
                    for j in range(3):
                        val = await conn.fetchval("SELECT $1::text || '/' || $2::int", token, j)
                        assert val == f"{token}/{j}", (cid, i, j)
                        checked += 1
                    if rng.random() < 0.3:
                        await conn.execute("SELECT pg_sleep(0.005)")  # hold the server a little
                    assert await conn.fetchval("SELECT $1::int * 1000 + $2::int", cid, i) == cid * 1000 + i
                    checked += 1
            rows = await conn.fetch("SELECT $1::text || ':' || g FROM generate_series(1, $2::int) g",
                                    token, 1 + i % 5)
            assert [r[0] for r in rows] == [f"{token}:{g}" for g in range(1, 2 + i % 5)], (cid, i)
            checked += 1
    finally:
        await conn.close()
    return checked


async def psycopg_client(pooler, cid: int, rng: random.Random) -> int:
    conn = await apconnect(pooler, "tx", autocommit=True)
    checked = 0
    try:
        for i in range(ROUNDS):
            token = secrets.token_hex(8)
            # simple protocol: the values are literals inside the query text
            async with psycopg.AsyncClientCursor(conn) as cur:
                await cur.execute("SELECT %s::text, %s::int, %s::text", (f"client-{cid}", i, token))
                assert await cur.fetchone() == (f"client-{cid}", i, token), (cid, i)
                checked += 1
                await cur.execute(f"SELECT 'c{cid}-{i}-a'; SELECT 'c{cid}-{i}-b', {cid}")
                assert await cur.fetchall() == [(f"c{cid}-{i}-a",)]
                assert cur.nextset()
                assert await cur.fetchall() == [(f"c{cid}-{i}-b", cid)]
                checked += 1
            # extended protocol, unnamed statement
            cur2 = await conn.execute("SELECT %s::text, %s::int", (token, cid))
            assert await cur2.fetchone() == (token, cid), (cid, i)
            checked += 1
            if rng.random() < 0.5:
                async with conn.transaction():
                    for j in range(3):
                        if j % 2:
                            cur3 = await conn.execute(f"SELECT 'lit-{token}-{j}'")  # simple Query
                            assert await cur3.fetchone() == (f"lit-{token}-{j}",)
                        else:
                            cur3 = await conn.execute("SELECT %s::text", (f"par-{token}-{j}",))
                            assert await cur3.fetchone() == (f"par-{token}-{j}",)
                        checked += 1
                    if rng.random() < 0.3:
                        await conn.execute("SELECT pg_sleep(0.005)")
    finally:
        await conn.close()
    return checked


async def test_echo_50_clients_transaction_pool(pooler):
    rng = random.Random(20240502)
    tasks = []
    for cid in range(CLIENTS):
        client = asyncpg_client if cid % 2 == 0 else psycopg_client
        tasks.append(client(pooler, cid, random.Random(rng.random())))
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
    assert all(n >= ROUNDS * 2 for n in results), results
