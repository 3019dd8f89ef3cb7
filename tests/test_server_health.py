"""Issue 10: connect_query on every new server, server_check_query/server_check_delay on idle
servers, and live reload of what a pool connects to (servers replaced as released; a removed pool
takes no new clients while its current ones finish)."""

from __future__ import annotations

import psycopg
import pytest
from helpers import pconnect, pool_config, wait_until
from test_admin import ADMIN_PASSWORD, aconnect, show


@pytest.fixture
def log_table(pg):
    name = "health_log"
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (pid int, what text);"
            f" GRANT ALL ON {name} TO PUBLIC", db="testdb")
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}", db="testdb")


def _logged(pg, what: str) -> set[int]:
    out = pg.psql(f"SELECT pid FROM health_log WHERE what = '{what}'", db="testdb")
    return {int(x) for x in out.split()}


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_connect_query_runs_on_every_new_server(start_pooler, pg, log_table):
    p = start_pooler(pool_config("tx", "transaction", pool_size=2, users=("trust_user",),
                                 connect_query="INSERT INTO health_log VALUES (pg_backend_pid(), 'connect')"),
                     {"workers": 1})
    with pconnect(p) as a, pconnect(p) as b:
        a.execute("BEGIN")
        b.execute("BEGIN")  # two servers at once
        pids = {_pid(a), _pid(b)}
        a.execute("COMMIT")
        b.execute("COMMIT")
    assert pids <= _logged(pg, "connect")


def test_failing_connect_query_fails_the_login_cleanly(start_pooler):
    p = start_pooler(pool_config("tx", "transaction", pool_size=1, users=("trust_user",),
                                 connect_query="SELECT 1/0", query_wait_timeout="3s"), {"workers": 1})
    with pytest.raises(psycopg.OperationalError, match="connect_query failed: division by zero"):
        pconnect(p)
    assert "connect_query failed" in p.log()


def test_idle_servers_are_checked(start_pooler, pg, log_table):
    p = start_pooler(pool_config("tx", "transaction", pool_size=1, users=("trust_user",)),
                     {"workers": 1, "server_check_delay": "300ms",
                      "server_check_query": "INSERT INTO health_log VALUES (pg_backend_pid(), 'check')"})
    with pconnect(p) as c:
        pid = _pid(c)
        assert wait_until(lambda: pid in _logged(pg, "check"), timeout=5)
        assert _pid(c) == pid  # checked, and lent again


def test_a_server_failing_its_check_is_replaced(start_pooler):
    p = start_pooler(pool_config("tx", "transaction", pool_size=1, users=("trust_user",)),
                     {"workers": 1, "server_check_delay": "300ms", "server_check_query": "SELECT 1/0"})
    with pconnect(p) as c:
        pid = _pid(c)
        assert wait_until(lambda: "server check failed: division by zero" in p.log(), timeout=5)
        assert _pid(c) != pid  # a fresh server, and the client never saw the check


def test_reload_replaces_servers_of_a_changed_pool(start_pooler):
    p = start_pooler(pool_config("tx", "transaction", pool_size=1, users=("trust_user",),
                                 application_name="before"), {"workers": 2, "admin_password": ADMIN_PASSWORD})
    with pconnect(p) as c:
        c.execute("BEGIN")
        pid = _pid(c)
        p.config_path.write_text(p.config_path.read_text().replace('"before"', '"after"'))
        with aconnect(p) as admin:
            admin.execute("RELOAD")
            assert any(r["close_needed"] == 1 for r in show(p, "SERVERS"))
        c.execute("COMMIT")  # released: closed, not lent again
        assert _pid(c) != pid
        with aconnect(p) as admin:
            admin.execute("WAIT_CLOSE")


def test_removed_pool_finishes_its_clients_and_takes_no_new_ones(start_pooler):
    pools = pool_config("tx", "transaction", pool_size=1, users=("trust_user",))
    pools |= pool_config("other", "transaction", pool_size=1, users=("trust_user",))
    p = start_pooler(pools, {"workers": 1, "admin_password": ADMIN_PASSWORD})
    with pconnect(p, dbname="other") as current:
        current.execute("SELECT 1")
        text = p.config_path.read_text()
        start = text.index("[pools.other]")
        p.config_path.write_text(text[:start])
        with aconnect(p) as admin:
            admin.execute("RELOAD")
        assert current.execute("SELECT 2").fetchone() == (2,)  # it goes on
        with pytest.raises(psycopg.OperationalError):
            pconnect(p, dbname="other")
    assert wait_until(lambda: "pool removed from the config" in p.log())
    with pconnect(p) as c:
        assert c.execute("SELECT 3").fetchone() == (3,)


def test_reload_adds_a_pool_and_a_user_in_every_worker(start_pooler):
    p = start_pooler(pool_config("tx", "transaction", pool_size=2, users=("trust_user",)),
                     {"workers": 2, "admin_password": ADMIN_PASSWORD})
    extra = pool_config("added", "transaction", pool_size=2, users=("trust_user", "md5_user"))
    from helpers import render_toml

    p.config_path.write_text(p.config_path.read_text() + "\n" + render_toml({"pools": extra}))
    with aconnect(p) as admin:
        admin.execute("RELOAD")
    for _ in range(4):  # whichever worker each lands on
        with pconnect(p, dbname="added") as c, pconnect(p, dbname="added", user="md5_user") as d:
            assert c.execute("SELECT 1").fetchone() == (1,) and d.execute("SELECT 2").fetchone() == (2,)
    assert {(r["database"], r["user"]) for r in show(p, "POOLS")} >= {("added", "trust_user"),
                                                                       ("added", "md5_user")}
