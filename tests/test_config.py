"""Unit tests for pgdoorman.config: schema, loader errors (FILE:LINE: key), durations, rendering."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import pathlib
import textwrap

import pytest

from pgdoorman.config import (
    Config,
    ConfigError,
    GeneralConfig,
    PoolConfig,
    UserConfig,
    default_config,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    render_config,
)
from pgdoorman.config.locate import LineIndex

MD5 = "md5" + hashlib.md5(b"secretapp").hexdigest()


def scram_verifier(password: bytes = b"secret", salt: bytes = b"0123456789abcdef", iters: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iters)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = [base64.b64encode(x).decode() for x in (salt, hashlib.sha256(client_key).digest(), server_key)]
    return f"SCRAM-SHA-256${iters}:{b64[0]}${b64[1]}:{b64[2]}"


ZERO_ITER_SCRAM = scram_verifier().replace("$4096:", "$0:")
HUGE_ITER_SCRAM = scram_verifier().replace("$4096:", "$2147483648:")


def cfg(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "f.toml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(text)
    return str(e.value)


FULL = """\
[general]
host = ["127.0.0.1", "::1"]
port = 7432
pool_mode = "session"
server_idle_timeout = "5m"
server_lifetime = 0
query_wait_timeout = 2500
application_name = "gen"
server_reset_query = "RESET ALL"
prepared_statements_cache_size = 100

[pools.mydb]
server_host = "/var/run/postgresql"
server_port = 5433

[pools.mydb.users.0]
username = "app"
password = "secret"
pool_size = 5
min_pool_size = 2

[pools.mydb.users.1]
username = "batch"
password = "x"
pool_mode = "statement"
server_username = "batch_server"
server_password = "y"

[pools.other]
server_database = "real"
pool_mode = "transaction"
application_name = "other"
idle_timeout = "1s"
server_lifetime = "2h"
query_wait_timeout = "0"
prepared_statements_cache_size = 0
server_reset_query = ""
"""


# --- successful parsing and resolution ------------------------------------------------------------

def test_full_config_resolves_defaults() -> None:
    c = cfg(FULL)
    g = c.general
    assert c.path == "f.toml"
    assert g.host == ("127.0.0.1", "::1") and g.port == 7432 and g.pool_mode == "session"
    assert g.server_idle_timeout == 300.0 and g.server_lifetime == 0.0 and g.query_wait_timeout == 2.5
    assert g.server_connect_timeout == 3.0 and g.client_login_timeout == 60.0  # untouched defaults
    assert g.max_client_conn == 5000 and g.log_level == "info" and g.tcp_keepalive is True

    mydb = c.pools["mydb"]
    assert (mydb.name, mydb.server_host, mydb.server_port, mydb.server_database) == (
        "mydb", "/var/run/postgresql", 5433, "mydb")
    # Pool inherits from general.
    assert mydb.pool_mode == "session" and mydb.application_name == "gen"
    assert mydb.idle_timeout == 300.0 and mydb.server_lifetime == 0.0 and mydb.query_wait_timeout == 2.5
    assert mydb.prepared_statements_cache_size == 100 and mydb.server_reset_query == "RESET ALL"

    app, batch = mydb.users["app"], mydb.users["batch"]
    assert list(mydb.users) == ["app", "batch"]  # keyed by username, in file order
    assert (app.pool_size, app.min_pool_size, app.pool_mode) == (5, 2, "session")  # user <- pool <- general
    assert app.server_username == "app" and app.server_password is None
    assert (batch.pool_size, batch.min_pool_size, batch.pool_mode) == (20, 0, "statement")
    assert batch.server_username == "batch_server" and batch.server_password == "y"

    other = c.pools["other"]
    assert (other.server_host, other.server_port, other.server_database) == ("127.0.0.1", 5432, "real")
    assert other.pool_mode == "transaction" and other.application_name == "other"
    assert other.idle_timeout == 1.0 and other.server_lifetime == 7200.0 and other.query_wait_timeout == 0.0
    assert other.prepared_statements_cache_size == 0 and other.server_reset_query == ""
    assert other.users == {}


def test_user_pool_mode_inherits_pool_override() -> None:
    c = cfg("""
        [general]
        pool_mode = "statement"
        [pools.a]
        pool_mode = "session"
        [pools.a.users.0]
        username = "u"
        password = ""
        [pools.b.users.0]
        username = "u"
        password = ""
    """)
    assert c.pools["a"].users["u"].pool_mode == "session"
    assert c.pools["b"].pool_mode == "statement" and c.pools["b"].users["u"].pool_mode == "statement"


def test_empty_and_admin_only_configs_are_valid() -> None:
    assert cfg("") == Config(path="f.toml")
    c = cfg('[general]\nadmin_password = "pw"\n')
    assert c.pools == {} and c.general.admin_password == "pw"


def test_single_host_string_becomes_tuple() -> None:
    assert cfg('[general]\nhost = "0.0.0.0"\n').general.host == ("0.0.0.0",)


def test_passwords_accepted() -> None:
    verifier = scram_verifier()
    upper_md5 = "md5" + MD5[3:].upper()
    c = cfg(f"""
        [pools.a.users.0]
        username = "trust"
        password = ""
        [pools.a.users.1]
        username = "md5"
        password = "{upper_md5}"
        server_password = "{MD5}"
        [pools.a.users.2]
        username = "scram"
        password = "{verifier}"
        [pools.a.users.3]
        username = "plain"
        password = "p@ss$word:with=stuff"
    """)
    users = c.pools["a"].users
    assert users["trust"].password == ""
    assert users["md5"].password == MD5  # normalised to lowercase hex
    assert users["md5"].server_password == MD5
    assert users["scram"].password == verifier
    assert users["plain"].password == "p@ss$word:with=stuff"


def test_secrets_not_in_repr() -> None:
    c = cfg('[general]\nadmin_password = "adminpw"\n[pools.a.users.0]\nusername = "u"\npassword = "userpw"\n'
            'server_password = "serverpw"\n')
    text = repr(c)
    assert "adminpw" not in text and "userpw" not in text and "serverpw" not in text


def test_quoted_keys() -> None:
    c = cfg("""
        [pools."my-db.prod"]
        server_port = 5433
        [pools."my-db.prod".users."first user"]
        username = "u"
        password = ""
    """)
    assert c.pools["my-db.prod"].server_port == 5433
    assert "u" in c.pools["my-db.prod"].users


def test_dataclasses_are_frozen_and_constructible_with_defaults() -> None:
    g = GeneralConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.port = 1  # type: ignore[misc]
    assert PoolConfig(name="x").users == {} and UserConfig("u", "").pool_size == 20


def test_default_config_loads() -> None:
    c = default_config()
    assert c.general.host == ("127.0.0.1",) and c.general.port == 6432
    assert c.general.pool_mode == "transaction"
    pool = c.pools["postgres"]
    assert (pool.server_host, pool.server_port) == ("/var/run/postgresql", 5432)
    assert pool.server_database == "postgres"
    user = pool.users["postgres"]
    assert user.password == "" and user.pool_size == 20 and user.pool_mode == "transaction"
    assert c.path.endswith("default.toml")


def test_general_defaults_match_dataclass() -> None:
    assert cfg("").general == GeneralConfig()


def test_load_config_reads_file(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "pgdoorman.toml"
    p.write_text(FULL)
    c = load_config(str(p))
    assert c.path == str(p) and c.general.port == 7432


def test_load_config_missing_file(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^{p}: cannot read config file: No such file or directory$"):
        load_config(str(p))


def test_load_config_bad_utf8(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(b"[general]\nport = 1\napplication_name = \"\xff\"\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(e.value) == f"{p}:3: syntax error: invalid UTF-8"


# --- errors: exact FILE:LINE: key: message ------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys, with and without a suggestion
        ('[general]\nport = 1\npoort = 2\n', "f.toml:3: general.poort: unknown key (did you mean 'port'?)"),
        ("[genral]\nport = 1\n", "f.toml:1: genral: unknown key (did you mean 'general'?)"),
        ("zzz = 1\n", "f.toml:1: zzz: unknown key"),
        ('[pools.a]\nserver_hots = "x"\n',
         "f.toml:2: pools.a.server_hots: unknown key (did you mean 'server_host'?)"),
        ('[pools.a.users.0]\nusername = "u"\npassword = ""\npool_sise = 3\n',
         "f.toml:4: pools.a.users.0.pool_sise: unknown key (did you mean 'pool_size'?)"),
        # a typo is reported as unknown, not as the required key it hides
        ('[pools.a.users.0]\nusename = "u"\npassword = ""\n',
         "f.toml:2: pools.a.users.0.usename: unknown key (did you mean 'username'?)"),
        # wrong types; bool is not an integer, int is not a string
        ("[general]\nport = true\n", "f.toml:2: general.port: expected integer, got boolean"),
        ('[general]\nport = "6432"\n', "f.toml:2: general.port: expected integer, got string"),
        ("[general]\nport = 6432.0\n", "f.toml:2: general.port: expected integer, got float"),
        ("[general]\nprepared_statements = 1\n",
         "f.toml:2: general.prepared_statements: expected boolean, got integer"),
        ("[general]\napplication_name = 5\n",
         "f.toml:2: general.application_name: expected string, got integer"),
        ("[general]\nlog_level = 1979-05-27\n", "f.toml:2: general.log_level: expected string, got date"),
        ("[general]\nhost = 1\n", "f.toml:2: general.host: expected string or array of strings, got integer"),
        ('[general]\nhost = [\n  "a",\n  3,\n]\n', "f.toml:2: general.host.1: expected string, got integer"),
        ("[general]\nhost = []\n", "f.toml:2: general.host: must not be empty"),
        ('[general]\nhost = ""\n', "f.toml:2: general.host: must not be empty"),
        ("general = 1\n", "f.toml:1: general: expected table, got integer"),
        ("[general]\n[pools]\nmydb = 1\n", "f.toml:3: pools.mydb: expected table, got integer"),
        ("[pools.a]\nusers = 1\n", "f.toml:2: pools.a.users: expected table, got integer"),
        ('[pools.a]\nusers = ["u"]\n', "f.toml:2: pools.a.users: expected table, got array"),
        ("[pools.a.users]\n0 = 1\n", "f.toml:2: pools.a.users.0: expected table, got integer"),
        ("[pools]\na = { server_port = \"x\" }\n",
         "f.toml:2: pools.a.server_port: expected integer, got string"),
        # missing required keys: reported at the table's header line
        ('[general]\nport = 1\n\n[pools.a.users.0]\npassword = ""\n',
         "f.toml:4: pools.a.users.0.username: missing required key"),
        ('[pools.a.users.x]\nusername = "u"\n', "f.toml:1: pools.a.users.x.password: missing required key"),
        # enums
        ('[general]\npool_mode = "tx"\n',
         "f.toml:2: general.pool_mode: invalid value 'tx' "
         "(expected one of: session, transaction, statement)"),
        ('[general]\nlog_level = "WARN"\n',
         "f.toml:2: general.log_level: invalid value 'WARN' (expected one of: debug, info, warning, error)"),
        ('[pools.a.users.0]\nusername = "u"\npassword = ""\npool_mode = "x"\n',
         "f.toml:4: pools.a.users.0.pool_mode: invalid value 'x' "
         "(expected one of: session, transaction, statement)"),
        # ranges
        ("[general]\nport = 0\n", "f.toml:2: general.port: must be between 1 and 65535, got 0"),
        ("[general]\nport = 65536\n", "f.toml:2: general.port: must be between 1 and 65535, got 65536"),
        ("[pools.a]\nserver_port = -1\n",
         "f.toml:2: pools.a.server_port: must be between 1 and 65535, got -1"),
        ("[general]\nmax_client_conn = 0\n", "f.toml:2: general.max_client_conn: must be at least 1, got 0"),
        ("[general]\nworkers = 65\n", "f.toml:2: general.workers: must be between 0 and 64, got 65"),
        ("[general]\nprepared_statements_cache_size = -1\n",
         "f.toml:2: general.prepared_statements_cache_size: must be at least 0, got -1"),
        ('[pools.a.users.0]\nusername = "u"\npassword = ""\npool_size = 0\n',
         "f.toml:4: pools.a.users.0.pool_size: must be at least 1, got 0"),
        ('[pools.a.users.0]\nusername = "u"\npassword = ""\npool_size = 2\nmin_pool_size = 3\n',
         "f.toml:5: pools.a.users.0.min_pool_size: must not exceed pool_size (2), got 3"),
        ('[pools.a.users.0]\nusername = "u"\npassword = ""\nmin_pool_size = 21\n',
         "f.toml:4: pools.a.users.0.min_pool_size: must not exceed pool_size (20), got 21"),
        # empty names
        ('[pools.a]\nserver_host = ""\n', "f.toml:2: pools.a.server_host: must not be empty"),
        ('[pools.a]\nserver_database = ""\n', "f.toml:2: pools.a.server_database: must not be empty"),
        ('[pools.a.users.0]\nusername = ""\npassword = ""\n',
         "f.toml:2: pools.a.users.0.username: must not be empty"),
        ('[pools.""]\nserver_port = 1\n', "f.toml:1: pools.: pool name must not be empty"),
        # durations
        ('[general]\nserver_lifetime = "-5s"\n',
         "f.toml:2: general.server_lifetime: duration must not be negative, got '-5s'"),
        ("[general]\nserver_lifetime = -1\n",
         "f.toml:2: general.server_lifetime: duration must not be negative, got -1"),
        ('[general]\nquery_wait_timeout = "5 minutes"\n',
         "f.toml:2: general.query_wait_timeout: invalid duration '5 minutes' "
         "(expected a number with unit ms, s, m, h or d)"),
        ("[general]\nquery_wait_timeout = inf\n",
         "f.toml:2: general.query_wait_timeout: duration must be finite"),
        ("[general]\nclient_idle_timeout = true\n",
         "f.toml:2: general.client_idle_timeout: expected duration (milliseconds or a string like '5s'), "
         "got boolean"),
        ('[pools.a]\nidle_timeout = "x"\n',
         "f.toml:2: pools.a.idle_timeout: invalid duration 'x' "
         "(expected a number with unit ms, s, m, h or d)"),
        # passwords
        ('[pools.a.users.0]\nusername = "u"\npassword = "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB"\n',
         "f.toml:3: pools.a.users.0.password: invalid SCRAM verifier (expected "
         "'SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>')"),
        (f'[pools.a.users.0]\nusername = "u"\npassword = "{ZERO_ITER_SCRAM}"\n',
         "f.toml:3: pools.a.users.0.password: invalid SCRAM verifier (expected "
         "'SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>')"),
        (f'[pools.a.users.0]\nusername = "u"\npassword = "{HUGE_ITER_SCRAM}"\n',
         "f.toml:3: pools.a.users.0.password: invalid SCRAM verifier (expected "
         "'SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>')"),
        (f'[pools.a.users.0]\nusername = "u"\npassword = ""\nserver_password = "{scram_verifier()}"\n',
         "f.toml:4: pools.a.users.0.server_password: a SCRAM verifier cannot log in to the server; "
         "give the plain text password"),
        # duplicate username within one pool (another pool may reuse it)
        ('[pools.a.users.0]\nusername = "u"\npassword = ""\n'
         '[pools.a.users.1]\nusername = "u"\npassword = ""\n',
         "f.toml:5: pools.a.users.1.username: duplicate username 'u' (already in pools.a.users.0)"),
    ],
)
def test_errors(text: str, expected: str) -> None:
    assert error(text) == expected


def test_duplicate_username_in_other_pool_is_fine() -> None:
    c = cfg('[pools.a.users.0]\nusername = "u"\npassword = ""\n'
            '[pools.b.users.0]\nusername = "u"\npassword = ""\n')
    assert set(c.pools) == {"a", "b"}


def test_error_attributes() -> None:
    with pytest.raises(ConfigError) as e:
        cfg("[general]\n\nport = 0\n")
    assert (e.value.path, e.value.line, e.value.key) == ("f.toml", 3, "general.port")
    assert e.value.reason == "must be between 1 and 65535, got 0"


def test_errors_in_file_order_within_a_pool() -> None:
    # The pool's own bad key (line 2) is reported before a bad user entry further down.
    text = '[pools.a]\nserver_port = 0\n[pools.a.users.0]\nusername = 1\n'
    assert error(text).startswith("f.toml:2: pools.a.server_port:")


def test_syntax_errors() -> None:
    assert error("[general]\nport = = 3\n") == "f.toml:2: syntax error: Invalid value (column 8)"
    msg = error('[general]\nport = 1\nport = 2\n')
    assert msg.startswith("f.toml:3: syntax error: ")
    msg = error("[general]\nhost = [\n")
    assert msg.startswith("f.toml:3: syntax error: ") and msg.endswith("at end of file")


def test_line_numbers_skip_multiline_strings_and_arrays() -> None:
    text = textwrap.dedent('''\
        [general]
        application_name = """
        [pools.fake]
        log_level = "x"
        """
        host = [
          "a",  # port = 1
          '[pools.fake2]',
        ]
        server_reset_query = \'\'\'
        x\'\'\'
        log_level = "nope"
    ''')
    assert error(text).startswith("f.toml:12: general.log_level: invalid value 'nope'")


def test_line_index_paths() -> None:
    li = LineIndex(textwrap.dedent("""\
        # comment
        [pools.a.users.0]
        username = "u"
          [ pools . "b.c" ]   # spaced header
        users.x.username = "v"
        [pools.a]
        server_port = 1
    """))
    assert li.line_of(("pools", "a", "users", "0", "username")) == 3
    assert li.line_of(("pools", "a", "users", "0", "password")) == 2  # missing -> header
    assert li.line_of(("pools", "b.c")) == 4
    assert li.line_of(("pools", "b.c", "users", "x", "username")) == 5
    assert li.line_of(("pools", "b.c", "users", "x")) == 5  # implicit table from a dotted key
    assert li.line_of(("pools", "a")) == 6  # explicit header beats the earlier implicit definition
    assert li.line_of(("pools",)) == 2
    assert li.line_of(("general", "port")) == 1  # nothing known: line 1


# --- durations ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0), (1500, 1.5), (2.5, 0.0025), ("0", 0.0), ("250", 0.25), ("250ms", 0.25), ("5s", 5.0),
        ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0), (" 10 s ", 10.0), (".5s", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "s", "5x", "5 minutes", "1e3", "-1s", "5S", "1h30m", -5, float("nan")])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, None, [1]])
def test_parse_duration_rejects_types(value: object) -> None:
    with pytest.raises(TypeError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0"), (0.25, "250ms"), (1.5, "1500ms"), (5, "5s"), (90, "90s"), (300, "5m"), (3600, "1h"),
     (86400, "1d"), (0.0005, "0.5ms")],
)
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# --- render_config ------------------------------------------------------------------------------

def test_render_round_trip() -> None:
    data = {
        "general": {
            "host": ["127.0.0.1", "::1"],
            "port": 7000,
            "query_wait_timeout": "1s",
            "server_lifetime": 1500.5,
            "prepared_statements": False,
            "application_name": 'we"ird\\name\n\ttab\x01',
        },
        "pools": {
            "my db": {
                "server_host": "127.0.0.1",
                "server_port": 5432,
                "users": {
                    "0": {"username": "app", "password": "s3cr\"et", "pool_size": 3, "server_password": None},
                    1: {"username": "ro", "password": "", "pool_mode": "session"},
                },
            },
            "empty": {},
        },
    }
    text = render_config(data)
    c = parse_config(text, "gen.toml")
    assert c.general.host == ("127.0.0.1", "::1") and c.general.port == 7000
    assert c.general.query_wait_timeout == 1.0 and c.general.server_lifetime == 1.5005
    assert c.general.prepared_statements is False
    assert c.general.application_name == 'we"ird\\name\n\ttab\x01'
    pool = c.pools["my db"]
    assert pool.users["app"].password == 's3cr"et' and pool.users["app"].pool_size == 3
    assert pool.users["app"].server_password is None
    assert pool.users["ro"].pool_mode == "session"
    assert c.pools["empty"].server_database == "empty"
    assert '[pools."my db".users.0]' in text and "[pools.empty]" in text
    assert '[pools."my db"]\n' in text and "[pools]" not in text  # parents without keys stay implicit


def test_render_list_of_users_and_errors_point_at_rendered_lines() -> None:
    text = render_config({"pools": {"a": {"users": [{"username": "u", "password": ""},
                                                    {"username": "v", "password": "", "pool_size": 0}]}}})
    lines = text.splitlines()
    with pytest.raises(ConfigError) as e:
        parse_config(text, "gen.toml")
    assert e.value.key == "pools.a.users.1.pool_size"
    assert e.value.line is not None and lines[e.value.line - 1] == "pool_size = 0"


def test_render_default_config_shape() -> None:
    c = default_config()
    p = c.pools["postgres"]
    data = {
        "general": {"host": list(c.general.host), "port": c.general.port},
        "pools": {p.name: {"server_host": p.server_host, "server_port": p.server_port,
                           "users": {"0": {"username": "postgres", "password": ""}}}},
    }
    assert parse_config(render_config(data)) == dataclasses.replace(c, path="<config>")


def test_render_rejects_unsupported_values() -> None:
    with pytest.raises(TypeError):
        render_config({"general": {"x": object()}})
    with pytest.raises(TypeError):
        render_config({"general": {("a",): 1}})


def test_docs_cover_every_key() -> None:
    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "config.md"
    text = doc.read_text()
    for cls in (GeneralConfig, PoolConfig, UserConfig):
        for f in dataclasses.fields(cls):
            if f.name != "name":
                assert f"`{f.name}`" in text, f"{cls.__name__}.{f.name} missing from docs/config.md"


def test_docs_example_parses() -> None:
    doc = pathlib.Path(__file__).resolve().parent.parent / "docs" / "config.md"
    example = doc.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    user = parse_config(example).pools["mydb"].users["app"]
    assert user.password == MD5 and user.pool_size == 20


def test_crlf_line_endings() -> None:
    assert error("[general]\r\nport = 1\r\n\r\nlog_level = 3\r\n") == (
        "f.toml:4: general.log_level: expected string, got integer")


def test_md5_prefixed_plain_password_is_plain_text() -> None:
    # PostgreSQL treats only "md5" + 32 hex digits as a hash; "md5pass" is an ordinary password.
    cfg = parse_config('[pools.a.users.0]\nusername = "u"\npassword = "md5pass"\n', "f.toml")
    assert cfg.pools["a"].users["u"].password == "md5pass"


def test_hash_cannot_log_in_as_another_role() -> None:
    text = ('[pools.a.users.0]\nusername = "u"\npassword = "md5' + "0" * 32 + '"\n'
            'server_username = "owner"\n')
    assert error(text) == ("f.toml:4: pools.a.users.0.server_username: logging in as 'owner' needs "
                           "server_password: the password of 'u' is a hash, which only logs in as itself")
    user = parse_config(text + 'server_password = "pw"\n', "f.toml").pools["a"].users["u"]
    assert user.server_password == "pw"
