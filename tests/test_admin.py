"""Issue 10: the admin console covers the whole pooler (every worker): SHOW views with PgBouncer
1.25's columns, exact counters, the control commands' effects, who may use it, RELOAD/SET."""

from __future__ import annotations

import subprocess
import threading
import time

import psycopg
import pytest
from helpers import pconnect, pool_config, wait_until

ADMIN_PASSWORD = "admin_pw"

# PgBouncer 1.25's columns (doc/usage.md, src/admin.c), written out here on their own so that a
# renamed or reordered column in the console fails this test.
PGBOUNCER_COLUMNS = {
    "pools": "database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req sv_active "
             "sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login maxwait maxwait_us "
             "pool_mode load_balance_hosts",
    "stats": "database total_server_assignment_count total_xact_count total_query_count total_received "
             "total_sent total_xact_time total_query_time total_wait_time total_client_parse_count "
             "total_server_parse_count total_bind_count avg_server_assignment_count avg_xact_count "
             "avg_query_count avg_recv avg_sent avg_xact_time avg_query_time avg_wait_time "
             "avg_client_parse_count avg_server_parse_count avg_bind_count",
    "stats_totals": "database server_assignment_count xact_count query_count bytes_received bytes_sent "
                    "xact_time query_time wait_time client_parse_count server_parse_count bind_count",
    "stats_averages": "database server_assignment_count xact_count query_count bytes_received bytes_sent "
                      "xact_time query_time wait_time avg_client_parse_count avg_server_parse_count "
                      "avg_bind_count",
    "totals": "name value",
    "clients": "type user database replication state addr port local_addr local_port connect_time "
               "request_time wait wait_us close_needed ptr link remote_pid tls application_name "
               "prepared_statements id",
    "databases": "name host port database force_user pool_size min_pool_size reserve_pool_size "
                 "server_lifetime pool_mode load_balance_hosts max_connections current_connections "
                 "max_client_connections current_client_connections paused disabled",
    "users": "name pool_size reserve_pool_size pool_mode max_user_connections current_connections "
             "max_user_client_connections current_client_connections",
    "config": "key value default changeable",
    "version": "version",
    "lists": "list items",
    "state": "key value",
    "mem": "name size used free memtotal",
}
PGBOUNCER_COLUMNS["servers"] = PGBOUNCER_COLUMNS["clients"]
OWN_COLUMNS = {
    "prepared_statements": "database user server_name query uses clients servers",
    "workers": "worker pid clients servers uptime cpu_seconds rss",
    "latency": "database user metric count p50_us p90_us p99_us max_us",
}


def admin_dsn(p, user: str = "admin", password: str = ADMIN_PASSWORD, db: str = "pgdoorman") -> str:
    return f"host={p.host} port={p.port} dbname={db} user={user} password={password} sslmode=disable"


def aconnect(p, user: str = "admin", password: str = ADMIN_PASSWORD, db: str = "pgdoorman"):
    """The console speaks the simple query protocol: psycopg's ClientCursor uses it."""
    return psycopg.connect(admin_dsn(p, user, password, db), autocommit=True,
                           cursor_factory=psycopg.ClientCursor)


def show(p, what: str) -> list[dict]:
    with aconnect(p) as conn:
        cur = conn.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def psql(p, command: str, user: str = "admin", password: str = ADMIN_PASSWORD) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", admin_dsn(p, user, password), "-c", command], capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def console(start_pooler):
    def make(workers: int = 2, pool_size: int = 2, general: dict | None = None, **pool):
        gen = {"admin_password": ADMIN_PASSWORD, "workers": workers, "stats_users": ["md5_user"],
               "admin_users": ["scram_user"], **(general or {})}
        pool.setdefault("query_wait_timeout", "10s")
        return start_pooler(pool_config("tx", "transaction", pool_size=pool_size, **pool), gen)
    return make


def _pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


# --- SHOW ---

@pytest.mark.parametrize("what", sorted(PGBOUNCER_COLUMNS) + sorted(OWN_COLUMNS))
def test_show_columns_are_pgbouncers(console, what):
    p = console()
    with pconnect(p) as c:
        c.execute("SELECT 1")
        with aconnect(p) as conn:
            cur = conn.execute(f"show {what};")  # lower case, trailing ;
            names = [d.name for d in cur.description]
            rows = cur.fetchall()
    expected = (PGBOUNCER_COLUMNS.get(what) or OWN_COLUMNS[what]).split()
    if what == "pools":
        assert names[: len(expected)] == expected and names[len(expected):] == ["cl_pinned"]
    else:
        assert names == expected
    if what in ("pools", "databases", "users", "lists", "state", "config", "version", "totals", "mem",
                "workers", "stats", "stats_totals", "stats_averages", "clients", "servers", "latency"):
        assert rows, what


def test_every_show_through_psql(console):
    p = console()
    for what in [*PGBOUNCER_COLUMNS, *OWN_COLUMNS, "help"]:
        r = psql(p, f"SHOW {what.upper()}")
        assert r.returncode == 0, (what, r.stderr)
        if what == "help":
            assert "SHOW HELP" in r.stderr  # a NOTICE, as PgBouncer's
        else:
            assert PGBOUNCER_COLUMNS.get(what, OWN_COLUMNS.get(what, "")).split()[0] in r.stdout
    # psql's expanded display and formatting options work on the console too
    r = subprocess.run(["psql", "-X", admin_dsn(p), "-c", "\\x", "-c", "SHOW STATE", "-c",
                        "\\pset format csv", "-c", "SHOW VERSION"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "key   | active" in r.stdout and "pgdoorman" in r.stdout, r.stdout + r.stderr


def test_counters_are_exact_over_two_workers(console):
    p = console(workers=2, pool_size=4)
    before = {r["database"]: r for r in show(p, "STATS")}.get("tx")
    base_x = int(before["total_xact_count"]) if before else 0
    base_q = int(before["total_query_count"]) if before else 0
    conns = [pconnect(p) for _ in range(8)]  # spread over both workers by the acceptor
    try:
        workers = {s["worker"]: s["clients"] for s in show(p, "WORKERS")}
        assert len(workers) == 2 and all(n > 0 for n in workers.values()), workers
        for i in range(25):
            for c in conns:
                c.execute("SELECT %s::int", (i,))
        with conns[0].transaction():  # one transaction of three requests: BEGIN, SELECT, COMMIT
            conns[0].execute("SELECT 1")
    finally:
        for c in conns:
            c.close()
    row = {r["database"]: r for r in show(p, "STATS")}["tx"]
    assert int(row["total_xact_count"]) - base_x == 25 * 8 + 1
    assert int(row["total_query_count"]) - base_q == 25 * 8 + 3
    assert int(row["total_received"]) > 0 and int(row["total_sent"]) > 0
    assert int(row["total_query_time"]) > 0 and int(row["total_xact_time"]) >= int(row["total_query_time"])
    totals = {r["name"]: int(r["value"]) for r in show(p, "TOTALS")}
    assert totals["total_xact_count"] == int(row["total_xact_count"])


def test_show_clients_and_servers_list_every_worker(console):
    p = console(workers=2, pool_size=4)
    conns = [pconnect(p, application_name=f"app{i}") for i in range(6)]
    try:
        for c in conns[:4]:  # each holds a server in a transaction: the pool is full
            c.execute("BEGIN")
            c.execute("SELECT 1")
        waiting = [_in_thread(lambda c=c: c.execute("SELECT 2").fetchone()) for c in conns[4:]]
        assert wait_until(lambda: sum(r["cl_waiting"] for r in show(p, "POOLS")) == 2), show(p, "POOLS")
        pools = show(p, "POOLS")[0]
        assert pools["sv_active"] == 4 and pools["cl_active"] == 4
        assert pools["maxwait_us"] + pools["maxwait"] > 0
        clients = show(p, "CLIENTS")
        assert {r["application_name"] for r in clients} >= {f"app{i}" for i in range(6)}
        assert sorted(r["state"] for r in clients) == ["active"] * 4 + ["waiting"] * 2
        servers = show(p, "SERVERS")
        active = [s for s in servers if s["state"] == "active"]
        assert len(active) == 4, servers
        assert {s["link"] for s in active} == {r["ptr"] for r in clients if r["state"] == "active"}
        for c in conns[:4]:
            c.execute("COMMIT")
        for thread, result in waiting:
            thread.join(10)
            assert result.get("value") == (2,), result
    finally:
        for c in conns:
            c.close()


def test_prepared_statements_and_latency(console):
    p = console(workers=1)
    with psycopg.connect(p.dsn("tx"), autocommit=True, prepare_threshold=0) as c:
        for i in range(5):
            c.execute("SELECT %s::int + 40", (i,))
    rows = show(p, "PREPARED_STATEMENTS")
    mine = [r for r in rows if "+ 40" in r["query"]]
    assert mine and mine[0]["server_name"].startswith("PGDOORMAN_") and int(mine[0]["uses"]) == 5
    assert mine[0]["servers"].startswith("S-")


# --- who may use it ---

def test_non_admin_refused_and_stats_user_cannot_control(console):
    p = console()
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        aconnect(p, user="trust_user", password="")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        aconnect(p, password="wrong")
    with aconnect(p, user="md5_user", password="md5_pass") as stats:  # stats_users: SHOW only
        assert stats.execute("SHOW POOLS").fetchall()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="admin access needed"):
            stats.execute("PAUSE")
        assert stats.execute("SHOW STATE").fetchall()  # the session goes on
    with aconnect(p, user="scram_user", password="scram_pass", db="pgbouncer") as admin:  # admin_users
        admin.execute("RECONNECT")


def test_unknown_command_and_extended_protocol(console):
    p = console(workers=1)
    with aconnect(p) as conn:
        with pytest.raises(psycopg.errors.ProtocolViolation, match="invalid command 'FROB', use SHOW HELP;"):
            conn.execute("FROB")
        with pytest.raises(psycopg.errors.ProtocolViolation, match="invalid command"):
            conn.execute("SHOW NONSENSE")
        assert conn.execute("ShOw VeRsIoN").fetchone()[0].startswith("pgdoorman")
    with psycopg.connect(admin_dsn(p), autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError, match="extended query protocol not supported"):
            conn.execute("SHOW POOLS", prepare=True)  # Parse, Bind, ...
    assert show(p, "STATE")  # the pooler serves on


def test_peer_credentials_over_unix_socket(start_pooler, tmp_path):
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    p = start_pooler(pool_config("tx", "transaction", pool_size=1), {"unix_socket_dir": str(sock_dir)})
    # no admin_password at all: the OS user the pooler runs as (root here) gets in by its credentials
    with psycopg.connect(f"host={sock_dir} port={p.port} dbname=pgdoorman user=anyone", autocommit=True,
                         cursor_factory=psycopg.ClientCursor) as conn:
        conn.execute("PAUSE tx")
        conn.execute("RESUME tx")
    with pytest.raises(psycopg.OperationalError, match="not allowed"):  # over TCP: no
        aconnect(p, user="admin", password="")


# --- control commands ---

def _in_thread(fn):
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            result["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_pause_waits_for_release_and_resume(console):
    p = console(workers=2, pool_size=2)
    holder = pconnect(p)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    admin = aconnect(p)
    pause, paused = _in_thread(lambda: admin.execute("PAUSE tx").statusmessage)
    time.sleep(0.8)
    assert pause.is_alive(), "PAUSE returned while a server was still in a transaction"
    holder.execute("COMMIT")  # the last server is released: PAUSE returns
    pause.join(10)
    assert paused.get("value") == "PAUSE", paused
    assert {r["key"]: r["value"] for r in show(p, "STATE")}["paused"] == "yes"
    assert show(p, "DATABASES")[0]["paused"] == 1
    query, answered = _in_thread(lambda: holder.execute("SELECT 42").fetchone())
    time.sleep(0.8)
    assert query.is_alive(), "a transaction ran while paused"
    admin.execute("RESUME tx")
    query.join(10)
    assert answered.get("value") == (42,), answered
    admin.close()
    holder.close()


def test_reconnect_gives_new_backends_and_wait_close(console):
    p = console(workers=1, pool_size=1)
    with pconnect(p) as c:
        before = _pid(c)
        with aconnect(p) as admin:
            admin.execute("RECONNECT tx")
            admin.execute("WAIT_CLOSE tx")
        assert _pid(c) != before


def test_kill_ends_clients_with_a_reason(console):
    p = console(workers=2)
    conns = [pconnect(p) for _ in range(4)]
    for c in conns:
        c.execute("SELECT 1")
    with aconnect(p) as admin:
        admin.execute("KILL tx")
        for c in conns:
            with pytest.raises(psycopg.OperationalError, match="killed from the admin console"):
                c.execute("SELECT 1")
        # KILL leaves the database paused, as PgBouncer's: new transactions wait for RESUME
        admin.execute("RESUME tx")
    with pconnect(p) as c:
        assert c.execute("SELECT 5").fetchone() == (5,)


def test_kill_client_by_id(console):
    p = console(workers=2)
    with pconnect(p, application_name="victim") as victim, pconnect(p) as other:
        victim.execute("SELECT 1")
        ids = [r["id"] for r in show(p, "CLIENTS") if r["application_name"] == "victim"]
        assert len(ids) == 1
        with aconnect(p) as admin:
            admin.execute(f"KILL_CLIENT {ids[0]}")
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
                admin.execute("KILL_CLIENT 999999")
        with pytest.raises(psycopg.OperationalError, match="KILL_CLIENT"):
            victim.execute("SELECT 1")
        assert other.execute("SELECT 2").fetchone() == (2,)


def test_disable_refuses_new_clients_and_enable(console):
    p = console(workers=2)
    with pconnect(p) as current:
        with aconnect(p) as admin:
            admin.execute("DISABLE tx")
            for _ in range(3):  # whichever worker the client lands on
                with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
                    pconnect(p)
            assert current.execute("SELECT 1").fetchone() == (1,)  # current ones go on
            assert show(p, "DATABASES")[0]["disabled"] == 1
            admin.execute("ENABLE tx")
        with pconnect(p) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
    with aconnect(p) as admin, pytest.raises(psycopg.errors.ProtocolViolation, match="no such database"):
        admin.execute("DISABLE nosuchdb")


# --- RELOAD / SET ---

def test_reload_broken_file_keeps_serving_and_good_file_applies(console):
    p = console(workers=2, pool_size=2)
    good = p.config_path.read_text()
    p.config_path.write_text(good.replace("pool_size = 2", "pool_sise = 2", 1))
    with aconnect(p) as admin:
        with pytest.raises(psycopg.errors.ConfigFileError,
                           match=r"\.toml:\d+: pools\.tx\.users\.\d\.pool_sise: unknown key"):
            admin.execute("RELOAD")
    with pconnect(p) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    p.config_path.write_text(good.replace("pool_size = 2", "pool_size = 5", 1))
    with aconnect(p) as admin:
        admin.execute("RELOAD")
    assert {r["name"]: r["pool_size"] for r in show(p, "DATABASES")}["tx"] == 5


def test_set_changes_a_key_everywhere(console):
    p = console(workers=2)
    with aconnect(p) as admin:
        assert admin.execute("SET query_wait_timeout = '7s'").statusmessage.startswith("SET")
        assert admin.execute("SET log_level = debug").statusmessage.startswith("SET")
        with pytest.raises(psycopg.errors.ConfigFileError, match="SET log_level"):
            admin.execute("SET log_level = 'loud'")
        with pytest.raises(psycopg.errors.ConfigFileError, match="unknown key"):
            admin.execute("SET no_such_key = 1")
    config = {r["key"]: r["value"] for r in show(p, "CONFIG")}
    assert config["query_wait_timeout"] == "7s" and config["log_level"] == "debug"
    show(p, "POOLS")  # every worker answers it, and now logs that at debug level
    logged = lambda: all(f"worker {w}: console request snapshot" in p.log() for w in (0, 1))  # noqa: E731
    assert wait_until(logged), p.log()


def test_sighup_pool_size_change_is_visible(console):
    import signal

    p = console(workers=2, pool_size=2)
    p.config_path.write_text(p.config_path.read_text().replace("pool_size = 2", "pool_size = 6", 1))
    p.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: show(p, "DATABASES")[0]["pool_size"] == 6), p.log()
    # the workers' shares add up to the new size: six transactions at once each get a server
    conns = [pconnect(p) for _ in range(6)]
    try:
        for c in conns:
            c.execute("BEGIN")
            c.execute("SELECT 1")
        assert sum(r["sv_active"] for r in show(p, "POOLS")) == 6
    finally:
        for c in conns:
            c.close()


def test_bytes_of_a_client_that_reset_its_connection(console):
    """Bytes come from the kernel's counters of the client socket (TCP_INFO). A client that
    vanishes with a RST (its socket is gone before the pooler hears of it) keeps what the last
    reading saw: here a SHOW; a clean close or an EOF is read at that moment."""
    import socket
    import struct

    from helpers import query_message, startup_packet

    p = console(workers=1)
    before = int(show(p, "STATS")[0]["total_sent"]) if show(p, "STATS") else 0
    s = socket.create_connection((p.host, p.port))
    s.sendall(startup_packet({"user": "trust_user", "database": "tx"}))
    assert s.recv(65536)
    s.sendall(query_message("SELECT repeat('x', 100000)"))
    got = 0
    while got < 100000:
        got += len(s.recv(1 << 20))
    # read from the live socket (acknowledged bytes: a delayed ACK may still be on its way)
    assert wait_until(lambda: int(show(p, "STATS")[0]["total_sent"]) - before > 100000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST
    assert wait_until(lambda: int(show(p, "STATS")[0]["total_sent"]) - before > 100000)
    assert int(show(p, "STATS")[0]["total_received"]) > 0


def test_console_input_split_at_every_byte_and_pipelined(console):
    """Console requests cut at every byte boundary, and several in one read, get the same answers."""
    from helpers import query_message as query
    from rawproto import read_replies, rows_of, send_split, via

    p = console(workers=1, general={"stats_users": ["trust_user"]})
    conn = via(p, db="pgdoorman")  # trust_user: a stats user with no password
    try:
        request = query("SHOW VERSION")
        for cut in range(1, len(request)):
            send_split(conn, request, cuts=(cut,), pause=0.01)
            assert rows_of(read_replies(conn))[0][0].startswith("pgdoorman")
        conn.send(query("SHOW STATE") + query("show version;") + query("SHOW LISTS"))
        replies = read_replies(conn, ready=3)
        rows = rows_of(replies)
        assert ["paused", "no"] in rows and any(r[0].startswith("pgdoorman") for r in rows)
        assert ["databases", "1"] in rows
    finally:
        conn.close()
