"""hba rules through the pooler: each connection type, each method, list and address forms, the
first match winning, no match and reject in PostgreSQL's words, and a live reload."""

from __future__ import annotations

import signal
import struct
import time
from pathlib import Path

import psycopg
import pytest
from helpers import (
    PASSWORDS,
    Pooler,
    PoolerLauncher,
    RawConn,
    parse_error_fields,
    render_toml,
    startup_packet,
)
from tlscerts import CertAuthority

from pgdoorman.config import ConfigError, parse_config
from pgdoorman.devcluster import Cluster

HBA = """\
# first match wins: reject_user in clear text is refused before any later line
hostnossl all reject_user 127.0.0.1/32 reject
hostssl   all cert_user   127.0.0.1/32 cert
host      tx,"sess" md5_user 127.0.0.0/8 md5
host      tx scram_user 127.0.0.1 255.255.255.255 scram-sha-256
host      all clear_user 127.0.0.1/32 password
host      all md5_user   ::1/128 trust
host      sameuser trust_user 127.0.0.1/32 trust
host      all all 10.0.0.0/8 trust
"""


def _users(pg_port: int) -> dict[str, object]:
    def user(name: str, password: str, server: str) -> dict[str, object]:
        return {"username": name, "password": password, "server_username": server,
                "server_password": PASSWORDS[server], "pool_size": 1}

    users = [user("md5_user", "md5_pass", "md5_user"), user("scram_user", "scram_pass", "scram_user"),
             user("clear_user", "clear_pass", "md5_user"), user("trust_user", "", "trust_user"),
             user("cert_user", "", "trust_user"), user("reject_user", "", "trust_user")]
    return {str(i): u for i, u in enumerate(users)}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return CertAuthority(tmp_path_factory.mktemp("hbatls"))


@pytest.fixture(scope="module")
def hba_pooler(pg: Cluster, ca: CertAuthority, tmp_path_factory: pytest.TempPathFactory):
    server = ca.issue("hba_server", "localhost", server=True)
    launcher = PoolerLauncher(tmp_path_factory.mktemp("hbapoolers"), pg)
    pools = {db: {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
                  "users": _users(pg.port)} for db in ("tx", "sess", "other", "trust_user")}
    general = {"hba": HBA, "tls_mode": "prefer", "tls_certificate": str(server.cert),
               "tls_private_key": str(server.key), "tls_ca_file": str(ca.cert)}
    yield launcher(pools, general)
    launcher.stop_all()


def _first_auth_request(p: Pooler, user: str, database: str) -> tuple[bytes, bytes]:
    conn = RawConn.for_pooler(p)
    conn.send(startup_packet({"user": user, "database": database}))
    return conn.recv_message()


@pytest.mark.parametrize(("user", "database", "code"), [
    ("md5_user", "tx", 5),       # md5, list form, CIDR /8
    ("md5_user", "sess", 5),     # the quoted list member
    ("scram_user", "tx", 10),    # address + mask form
    ("clear_user", "tx", 3),     # password: cleartext, even though the secret is plain
    ("clear_user", "other", 3),  # all
    ("trust_user", "trust_user", 0),  # sameuser
])
def test_each_method_asks_what_its_rule_says(hba_pooler: Pooler, user: str, database: str, code: int) -> None:
    kind, body = _first_auth_request(hba_pooler, user, database)
    assert kind == b"R", parse_error_fields(body) if kind == b"E" else kind
    assert struct.unpack("!i", body[:4])[0] == code


@pytest.mark.parametrize(("user", "database"), [
    ("md5_user", "tx"), ("scram_user", "tx"), ("clear_user", "tx"), ("trust_user", "trust_user"),
])
def test_methods_log_in_with_real_drivers(hba_pooler: Pooler, user: str, database: str) -> None:
    password = {"clear_user": "clear_pass"}.get(user)
    with psycopg.connect(hba_pooler.dsn(database, user, password), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if user != "trust_user":
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(hba_pooler.dsn(database, user, "wrong"))


@pytest.mark.parametrize(("user", "database", "sslmode", "message"), [
    ("trust_user", "tx", "disable",
     'no pg_hba.conf entry for host "127.0.0.1", user "trust_user", database "tx", no encryption'),
    ("trust_user", "tx", "require",
     'no pg_hba.conf entry for host "127.0.0.1", user "trust_user", database "tx", SSL encryption'),
    ("scram_user", "sess", "disable",
     'no pg_hba.conf entry for host "127.0.0.1", user "scram_user", database "sess", no encryption'),
    ("reject_user", "tx", "disable",
     'pg_hba.conf rejects connection for host "127.0.0.1", user "reject_user", database "tx", no encryption'),
    # hostnossl does not match a TLS client, and nothing after it does either
    ("reject_user", "tx", "require",
     'no pg_hba.conf entry for host "127.0.0.1", user "reject_user", database "tx", SSL encryption'),
    # hostssl does not match a clear-text client
    ("cert_user", "tx", "disable",
     'no pg_hba.conf entry for host "127.0.0.1", user "cert_user", database "tx", no encryption'),
    # an unknown user gets the rule's verdict, as in PostgreSQL (hba comes before the role lookup)
    ("nobody", "tx", "disable",
     'no pg_hba.conf entry for host "127.0.0.1", user "nobody", database "tx", no encryption'),
])
def test_refusals_in_postgresql_wording(hba_pooler: Pooler, user: str, database: str, sslmode: str,
                                        message: str) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(hba_pooler.dsn(database, user, "x", sslmode=sslmode))
    assert message in str(info.value)
    assert info.value.sqlstate is None or info.value.sqlstate == "28000"


def test_refusal_sqlstate(hba_pooler: Pooler) -> None:
    kind, body = _first_auth_request(hba_pooler, "trust_user", "tx")
    assert kind == b"E"
    fields = parse_error_fields(body)
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")


def test_cert_method(hba_pooler: Pooler, ca: CertAuthority) -> None:
    mine = ca.issue("hba_cert_user", "cert_user", server=False)
    theirs = ca.issue("hba_cert_other", "md5_user", server=False)
    base = {"sslmode": "verify-full", "sslrootcert": str(ca.cert)}
    with psycopg.connect(hba_pooler.dsn("tx", "cert_user", "", sslcert=str(mine.cert), sslkey=str(mine.key),
                                        **base), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trust_user",)
    with pytest.raises(psycopg.OperationalError,
                       match='certificate authentication failed for user "cert_user"'):
        psycopg.connect(hba_pooler.dsn("tx", "cert_user", "", sslcert=str(theirs.cert),
                                       sslkey=str(theirs.key), **base))
    with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
        psycopg.connect(hba_pooler.dsn("tx", "cert_user", "", **base))


def test_hba_reload(pg: Cluster, start_pooler: PoolerLauncher, tmp_path: Path) -> None:
    hba_file = tmp_path / "pg_hba.conf"
    hba_file.write_text("host all md5_user 127.0.0.1/32 md5\n")
    pools = {"tx": {"server_host": pg.host, "server_port": pg.port, "server_database": "testdb",
                    "users": _users(pg.port)}}
    p = start_pooler(pools, {"hba_file": str(hba_file)})
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(p.dsn("tx", "scram_user"))
    held = psycopg.connect(p.dsn("tx", "md5_user"), autocommit=True)
    hba_file.write_text("host all scram_user 127.0.0.1/32 scram-sha-256\n")
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(p.dsn("tx", "scram_user")).close()
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the new rules were not applied"
            time.sleep(0.1)
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(p.dsn("tx", "md5_user"))
    # a client already logged in is not judged again
    assert held.execute("SELECT 1").fetchone() == (1,)
    held.close()
    # a broken file is refused by the reload, and the old rules stay
    hba_file.write_text("host all scram_user 127.0.0.1/32 ident\n")
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    psycopg.connect(p.dsn("tx", "scram_user")).close()
    assert f"{hba_file}:1: " in p.log()


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    text = render_toml({"general": {"hba": "host all all 127.0.0.1/32 trust\nhost all all nowhere md5\n"}})
    with pytest.raises(ConfigError) as info:
        parse_config(text, "p.toml")
    assert str(info.value).startswith("p.toml:2: ")  # one line of TOML: the key's own line
    text = ('[general]\nport = 6432\nhba = """\nhost all all 127.0.0.1/32 trust\n'
            'host all all nowhere md5\n"""\n')
    with pytest.raises(ConfigError) as info:
        parse_config(text, "p.toml")
    assert str(info.value).startswith("p.toml:5: ")  # the second rule, on the file's fifth line
    hba_file = tmp_path / "hba.conf"
    hba_file.write_text("# rules\n\nlocal all all peer\n")
    with pytest.raises(ConfigError) as info:
        parse_config(f'[general]\nhba_file = "{hba_file}"\n', "p.toml")
    assert str(info.value).startswith(f"{hba_file}:3: ")
    assert "peer" in str(info.value)
    with pytest.raises(ConfigError, match="hba_file or hba, not both"):
        parse_config(f'[general]\nhba_file = "{hba_file}"\nhba = "local all all trust"\n', "p.toml")
