"""auth_query against a real PostgreSQL: users the config does not list log in with the secret a
query on the server returns, and reach the server by pass-through (the pooler holds no password of
theirs: the server's pg_hba demands scram-sha-256 for scram_user, md5 for md5_user)."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import psycopg
import pytest
from helpers import PASSWORDS, Pooler, PoolerLauncher

from pgdoorman.devcluster import Cluster

WRONG = 'password authentication failed for user "{}"'
ADMIN = {"admin_password": "console_pw"}
ONE_WORKER = {"workers": 1}  # the cache is per worker: counting lookups needs one


def _pool(pg: Cluster, **auth_query: object) -> dict[str, object]:
    return {"aq": {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
                   "auth_query": {"user": "postgres", "pool_size": 2, **auth_query}}}


def _user(pooler: Pooler, user: str, password: str | None = None) -> psycopg.Connection:
    return psycopg.connect(pooler.dsn("aq", user, PASSWORDS[user] if password is None else password),
                           autocommit=True)


def _sqlstate(pooler: Pooler, user: str, password: str) -> tuple[str, str]:
    """The login error asyncpg reports (psycopg's connect errors carry no SQLSTATE)."""
    async def login() -> tuple[str, str]:
        try:
            conn = await asyncpg.connect(host=pooler.host, port=pooler.port, user=user, password=password,
                                         database="aq", ssl=False, timeout=10)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, exc.args[0]
        await conn.close()
        return "", ""
    return asyncio.run(login())


def _lookups(pooler: Pooler, user: str) -> int:
    """Lookups the pooler ran for user that found nobody (each logs one line; a cache hit none)."""
    return pooler.log().count(f"auth_query: no user {user!r}")


@pytest.mark.parametrize("workers", [1, 2])
def test_scram_and_md5_users_by_pass_through(pg: Cluster, start_pooler: PoolerLauncher,
                                             workers: int) -> None:
    p = start_pooler(_pool(pg), {"workers": workers, **ADMIN})
    text = p.config_path.read_text()
    assert not any(pw in text for pw in PASSWORDS.values() if pw)  # no secret of theirs anywhere
    for user in ("scram_user", "md5_user"):
        conns = [_user(p, user) for _ in range(3)]
        try:
            for conn in conns:
                assert conn.execute("SELECT current_user, current_database()").fetchone() == (user, "testdb")
        finally:
            for conn in conns:
                conn.close()
    # each looked-up user has a pool of its own
    with psycopg.connect(p.dsn("pgdoorman", "admin", "console_pw"), autocommit=True) as admin:
        pools = {(row[0], row[1]) for row in admin.execute("SHOW POOLS").fetchall()}
    assert {("aq", "scram_user"), ("aq", "md5_user")} <= pools


def test_wrong_password_and_unknown_user_look_alike(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(_pool(pg))
    with pytest.raises(psycopg.OperationalError, match=WRONG.format("scram_user")):
        _user(p, "scram_user", "wrong")
    for user in ("nobody_here", "scram_user"):  # the same exchange, the same error
        assert _sqlstate(p, user, "whatever") == ("28P01", WRONG.format(user))
    with _user(p, "scram_user") as conn:  # the right password still works after a wrong one
        assert conn.execute("SELECT current_user").fetchone() == ("scram_user",)


def test_a_name_cannot_inject_sql(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    """The name goes into the query as a quoted literal: quotes and backslashes stay the name."""
    p = start_pooler(_pool(pg))
    for name in ("x' OR rolname = 'scram_user", "x\\' OR true --", "scram_user'--"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn("aq", name, PASSWORDS["scram_user"]))
    with _user(p, "scram_user") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_negative_cache_then_a_new_user(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    role = f"aq_new_{uuid.uuid4().hex[:8]}"
    p = start_pooler(_pool(pg, negative_cache_ttl="1s"), ONE_WORKER)
    for _ in range(3):
        with pytest.raises(psycopg.OperationalError, match=WRONG.format(role)):
            psycopg.connect(p.dsn("aq", role, "pw1"))
    assert _lookups(p, role) == 1  # the second and third were answered from the cache
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw1'")
    try:
        time.sleep(1.2)  # past negative_cache_ttl: the next login asks the server again
        with psycopg.connect(p.dsn("aq", role, "pw1"), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        pg.psql(f"DROP ROLE {role}")


def test_changed_password_seen_at_the_next_login(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    """A login that fails with the cached secret forgets it (at most once a second), so a password
    changed on the server works at the next attempt; the old one stops working."""
    role = f"aq_pw_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'old_pw'")
    try:
        p = start_pooler(_pool(pg, cache_ttl="1h"), ONE_WORKER)
        with psycopg.connect(p.dsn("aq", role, "old_pw"), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        pg.psql(f"ALTER ROLE {role} PASSWORD 'new_pw'")
        time.sleep(1.1)  # the cached answer is older than the forget interval
        with pytest.raises(psycopg.OperationalError, match=WRONG.format(role)):
            psycopg.connect(p.dsn("aq", role, "new_pw"))  # checked against the cached secret
        with psycopg.connect(p.dsn("aq", role, "new_pw"), autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with pytest.raises(psycopg.OperationalError, match=WRONG.format(role)):
            psycopg.connect(p.dsn("aq", role, "old_pw"))
    finally:
        pg.psql(f"DROP ROLE {role}")


def test_expired_cache_entry_is_looked_up_again(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    role = f"aq_ttl_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    p = start_pooler(_pool(pg, cache_ttl="1s", negative_cache_ttl="1h"), ONE_WORKER)
    try:
        with psycopg.connect(p.dsn("aq", role, "pw"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.psql(f"ALTER ROLE {role} NOLOGIN")  # the default query finds no password for it now
        time.sleep(1.2)
        with pytest.raises(psycopg.OperationalError, match=WRONG.format(role)):
            psycopg.connect(p.dsn("aq", role, "pw"))
        assert _lookups(p, role) == 1
    finally:
        pg.psql(f"DROP ROLE {role}")


def test_server_user_shares_one_backend_identity(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(_pool(pg, server_user="trust_user"), ADMIN)
    conns = [_user(p, "scram_user"), _user(p, "md5_user")]
    try:
        for conn in conns:
            assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
        with psycopg.connect(p.dsn("pgdoorman", "admin", "console_pw"), autocommit=True) as admin:
            pools = [row for row in admin.execute("SHOW POOLS").fetchall() if row[0] == "aq"]
            clients = {row[1] for row in admin.execute("SHOW CLIENTS").fetchall() if row[2] == "aq"}
        assert [row[1] for row in pools] == ["trust_user"]
        assert clients == {"scram_user", "md5_user"}  # each client shows as who it logged in as
    finally:
        for conn in conns:
            conn.close()


def test_pgbouncer_form(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    """[general] auth_user with its password from a pool's users, and PgBouncer's default query."""
    pools = {"aq": {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
                    "users": {"0": {"username": "md5_user", "password": PASSWORDS["md5_user"]}}}}
    p = start_pooler(pools, {"auth_user": "md5_user"})
    with _user(p, "scram_user") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("scram_user",)
    with _user(p, "md5_user") as conn:  # the auth user itself is a configured user as before
        assert conn.execute("SELECT current_user").fetchone() == ("md5_user",)


def test_custom_query_through_a_security_definer_function(pg: Cluster,
                                                         start_pooler: PoolerLauncher) -> None:
    """The usual production set-up: an unprivileged lookup role calls a SECURITY DEFINER function."""
    role = f"aq_lookup_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'lookup_pw'; "
            "CREATE OR REPLACE FUNCTION public.aq_secret(name text) RETURNS text "
            "LANGUAGE sql SECURITY DEFINER AS "
            "$$ SELECT rolpassword FROM pg_authid WHERE rolname = name AND rolcanlogin $$; "
            "REVOKE ALL ON FUNCTION public.aq_secret(text) FROM public; "
            f"GRANT EXECUTE ON FUNCTION public.aq_secret(text) TO {role}", db="testdb")
    try:
        p = start_pooler(_pool(pg, user=role, password="lookup_pw", query="SELECT public.aq_secret($1)"))
        with _user(p, "scram_user") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("scram_user",)
    finally:
        pg.psql(f"DROP FUNCTION public.aq_secret(text); DROP ROLE {role}", db="testdb")


def test_failed_lookup_is_a_clear_error_and_others_are_served(pg: Cluster,
                                                              start_pooler: PoolerLauncher) -> None:
    pools = {**_pool(pg, query="SELECT passwd FROM no_such_table WHERE usename = $1"),
             "tx": {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
                    "users": {"0": {"username": "trust_user", "password": ""}}}}
    p = start_pooler(pools)
    assert _sqlstate(p, "scram_user", PASSWORDS["scram_user"]) == (
        "08006", 'authentication lookup for user "scram_user" failed')
    assert 'relation "no_such_table" does not exist' in p.log()  # the reason, for the operator
    with psycopg.connect(p.dsn("tx", "trust_user"), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_many_logins_at_once_share_one_lookup(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    role = "aq_nobody_burst"
    p = start_pooler(_pool(pg), {"workers": 1})
    import threading

    errors: list[str] = []

    def login() -> None:
        try:
            psycopg.connect(p.dsn("aq", role, "x"))
        except psycopg.OperationalError as exc:
            errors.append("28P01" if WRONG.format(role) in str(exc) else str(exc))

    threads = [threading.Thread(target=login) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["28P01"] * 20
    assert _lookups(p, role) == 1


def test_reload_forgets_every_cached_secret(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    role = f"aq_reload_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'old_pw'")
    try:
        p = start_pooler(_pool(pg, cache_ttl="1h"), {**ONE_WORKER, **ADMIN})
        with psycopg.connect(p.dsn("aq", role, "old_pw"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            pg.psql(f"ALTER ROLE {role} PASSWORD 'new_pw'")
            with psycopg.connect(p.dsn("pgdoorman", "admin", "console_pw"), autocommit=True) as admin:
                admin.execute("RELOAD")
            assert conn.execute("SELECT 2").fetchone() == (2,)  # a reload leaves live clients be
        with psycopg.connect(p.dsn("aq", role, "new_pw"), autocommit=True) as conn:  # at once
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    finally:
        pg.psql(f"DROP ROLE {role}")


def test_client_caps_count_looked_up_users(pg: Cluster, start_pooler: PoolerLauncher) -> None:
    p = start_pooler(_pool(pg, server_user="trust_user"), {"max_user_client_connections": 1})
    with _user(p, "scram_user"), _user(p, "md5_user"):  # one pool, two users: each under its own cap
        with pytest.raises(psycopg.OperationalError,
                           match='too many connections for role "scram_user" '
                                 r'\(max_user_client_connections = 1\)'):
            _user(p, "scram_user")
