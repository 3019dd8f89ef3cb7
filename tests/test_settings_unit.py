"""Unit tests of pgdoorman/frontend/settings.py: options parsing, the replay SQL, the login cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pgdoorman.frontend import settings as st
from pgdoorman.frontend.pins import HELD_ROW, held_state, refusal


@pytest.mark.parametrize(("text", "words"), [
    ("", []),
    ("  -c a=b\t--c-d=e  ", ["-c", "a=b", "--c-d=e"]),
    ("-c search_path=a\\ b", ["-c", "search_path=a b"]),
    ("-c x=back\\\\slash", ["-c", "x=back\\slash"]),
    ("-c x=\\", ["-c", "x="]),
])
def test_split_options_as_pg_split_opts(text, words):
    assert st.split_options(text) == words


def test_option_settings():
    assert st.option_settings("-c a=1 -cb=2 --c-d=3 -c e.f=x=y") == [
        ("a", "1"), ("b", "2"), ("c_d", "3"), ("e.f", "x=y")]
    with pytest.raises(st.Refused) as ei:
        st.option_settings("-c a=1 -F")
    assert ei.value.code == "0A000" and '"-F"' in ei.value.message


def test_startup_settings_order_and_non_settings():
    params = {"user": "u", "database": "d", "TimeZone": "UTC", "options": "-c search_path=x",
              "_pq_.thing": "1", "replication": "false"}
    assert st.startup_settings(params) == [("search_path", "x"), ("TimeZone", "UTC")]


@pytest.mark.parametrize(("value", "wanted"), [("t", True), ("TRUE", True), ("yes", True), ("on", True),
                                               ("1", True), ("f", False), ("no", False), ("of", False),
                                               ("off", False), ("0", False), ("o", None), ("onn", None),
                                               ("", None), ("truex", None), ("10", None)])
def test_parse_bool_as_postgres(value, wanted):
    assert st._parse_bool(value) is wanted


def _server(tracked, settings=(), error=None):
    return SimpleNamespace(id="S-1", tracked=tracked, settings=settings, hidden_error=error,
                           settings_unknown=False)


def test_replay_sets_what_differs_and_defaults_what_is_missing():
    mine = ("UTF8", "ISO, MDY", "UTC", "postgres", "app")
    server = _server(("UTF8", "ISO, MDY", "Europe/Paris", "postgres", "app"),
                     (("search_path", "old"), ("work_mem", "1MB")))
    sql = st.replay_sql(mine, (("search_path", "new"), ("statement_timeout", "5s")), server)
    assert sql == ('SET "TimeZone" TO \'UTC\';SET "work_mem" TO DEFAULT;'
                   "SELECT FROM (SELECT pg_catalog.set_config('search_path', 'new', false) AS s0, "
                   "pg_catalog.set_config('statement_timeout', '5s', false) AS s1 OFFSET 0) AS s "
                   "WHERE s.s0 IS NULL")
    assert server.settings == (("search_path", "new"), ("statement_timeout", "5s"))
    assert st.replay_sql(mine, server.settings, _server(mine, server.settings)) == ""


def test_replay_after_a_failed_pooler_query_resets_and_sets_everything():
    mine = ("UTF8", None, None, None, "a'b\\c")
    server = _server(mine, (("x.y", "1"),), {"M": "boom"})
    sql = st.replay_sql(mine, (("x.y", "1"),), server)
    assert sql.startswith("SET SESSION AUTHORIZATION DEFAULT;RESET ROLE;RESET ALL;"
                          "SET \"client_encoding\" TO 'UTF8';SET \"application_name\" TO E'a''b\\\\c';")
    assert "set_config('x.y', '1', false)" in sql
    assert server.hidden_error is None


def test_followed():
    have = (("default_transaction_read_only", "on"), ("search_path", "x"))
    assert st.followed(have, "default_transaction_read_only", "off") == (
        ("default_transaction_read_only", "off"), ("search_path", "x"))
    assert st.followed(have, "TimeZone", "UTC") is have


def test_login_cache_is_lru_and_local_application_name_needs_no_probe():
    pool = SimpleNamespace(welcomes={}, server_params={"TimeZone": "UTC", "application_name": "p"},
                           application_name="p")
    plain = st.cached_welcome(pool, [("application_name", "mine")])
    assert plain is not None and plain.params["application_name"] == "mine"
    assert st.cached_welcome(pool, [("search_path", "x")]) is None  # PostgreSQL must judge it
    assert st.cached_welcome(pool, [("application_name", "caf\u00e9")]) is None
    for i in range(st.WELCOME_CACHE + 10):
        st.remember(pool, (("n", str(i)),), plain)
        st.cached_welcome(pool, [("application_name", "mine")])  # kept: used every time
    assert len(pool.welcomes) == st.WELCOME_CACHE
    assert (("application_name", "mine"),) in pool.welcomes
    assert (("n", "0"),) not in pool.welcomes


def test_the_held_row_is_no_setting_and_says_what_pins():
    rows = [["work_mem", "7MB"], [HELD_ROW, "temporary table, LISTEN"]]
    assert st.session_settings(rows, "alice") == (("work_mem", "7MB"),)
    assert held_state(rows, loaded=False) == "temporary table, LISTEN"
    assert held_state(rows, loaded=True) == "temporary table, LISTEN, LOAD"
    assert held_state([[HELD_ROW, ""]], loaded=False) == ""
    assert held_state([[HELD_ROW, ""]], loaded=True) == "LOAD"
    assert refusal("", "statement", "refuse") is None
    assert refusal("LISTEN", "transaction", "pin") is None
    assert refusal("LISTEN", "transaction", "refuse") == (
        "0A000", 'LISTEN not supported in transaction pooling mode (pin_policy = "refuse")')
    assert refusal("LISTEN", "statement", "pin")[0] == "0A000"
