"""Session parameters follow their client in transaction mode: a SET on a shared server never leaks.

The pooler keeps each client's client_encoding, DateStyle, TimeZone, IntervalStyle and
application_name, and SETs them on whichever server the client is lent.
"""

from __future__ import annotations

from helpers import aconnect, pconnect, pool_config


def _show(conn, name: str) -> str:
    return conn.execute(f"SHOW {name}").fetchone()[0]


def test_set_does_not_leak_to_next_client(start_pooler):
    pooler = start_pooler(pool_config("tx", pool_size=1, users=("trust_user",)))
    with pconnect(pooler) as a, pconnect(pooler) as b:
        default_tz = _show(b, "TimeZone")
        a.execute("SET TimeZone = 'Pacific/Chatham'")
        a.execute("SET DateStyle = 'SQL, DMY'")
        a.execute("SET application_name = 'client-a'")
        # One server: B runs on the very connection A changed, and must see its own settings.
        assert _show(b, "TimeZone") == default_tz
        assert _show(b, "DateStyle") == "ISO, MDY"
        assert _show(b, "application_name") != "client-a"
        # A gets its settings back on its next transaction.
        assert _show(a, "TimeZone") == "Pacific/Chatham"
        assert _show(a, "DateStyle") == "SQL, DMY"
        assert _show(a, "application_name") == "client-a"
        assert b.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'client-a'"
                         ).fetchone() == (0,)


def test_startup_parameters_apply_per_client(start_pooler):
    pooler = start_pooler(pool_config("tx", pool_size=1, users=("trust_user",)))
    with pconnect(pooler, application_name="app-one") as a, \
            pconnect(pooler, application_name="app-two") as b:
        for _ in range(3):
            assert _show(a, "application_name") == "app-one"
            assert _show(b, "application_name") == "app-two"
        assert a.info.parameter_status("application_name") == "app-one"


def test_quoting_of_replayed_values(start_pooler):
    """A value with quotes and backslashes is replayed as a literal, never spliced into SQL."""
    pooler = start_pooler(pool_config("tx", pool_size=1, users=("trust_user",)))
    tricky = "x'; SELECT pg_sleep(10); --\\"
    with pconnect(pooler, application_name=tricky) as a, pconnect(pooler) as b:
        b.execute("SELECT 1")
        assert _show(a, "application_name") == tricky


def test_plain_set_never_reaches_the_next_client(pg, start_pooler):
    """Any SET a client leaves on a shared server (not only the tracked ones) is undone first."""
    pg.psql("DO $$ BEGIN CREATE ROLE params_reader NOLOGIN; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    pooler = start_pooler(pool_config("tx", pool_size=1, users=("trust_user",)))
    with pconnect(pooler) as a, pconnect(pooler) as b:
        defaults = {name: _show(b, name) for name in ("statement_timeout", "search_path", "work_mem")}
        a.execute("SET statement_timeout = '1234ms'")
        a.execute("SET search_path = pg_catalog")
        a.execute("SET work_mem = '7MB'")
        a.execute("SET ROLE params_reader")
        for name, value in defaults.items():
            assert _show(b, name) == value, name
        assert b.execute("SELECT current_user").fetchone() == ("trust_user",)
        # SET LOCAL inside a transaction works as usual.
        with b.transaction():
            b.execute("SET LOCAL statement_timeout = '4321ms'")
            assert _show(b, "statement_timeout") == "4321ms"
        assert _show(b, "statement_timeout") == defaults["statement_timeout"]


async def test_login_reply_is_per_client_even_when_shared(start_pooler):
    """Clients with the same startup values share one prebuilt login reply; what one of them changes
    later (a reported SET) must not reach the next one's ParameterStatus or session."""
    pooler = start_pooler(pool_config("tx", pool_size=1, users=("trust_user",)))
    same = {"TimeZone": "Europe/Berlin", "application_name": "same"}
    a = await aconnect(pooler, server_settings=same)
    try:
        assert a.get_settings().TimeZone == "Europe/Berlin"
        await a.execute("SET TimeZone = 'Asia/Tokyo'")  # reported: a's own values now differ
        assert a.get_settings().TimeZone == "Asia/Tokyo"
        b = await aconnect(pooler, server_settings=same)
        c = await aconnect(pooler, server_settings={"TimeZone": "Europe/Paris", "application_name": "other"})
        try:
            assert b.get_settings().TimeZone == "Europe/Berlin"
            assert b.get_settings().application_name == "same"
            assert await b.fetchval("SHOW TimeZone") == "Europe/Berlin"
            assert c.get_settings().TimeZone == "Europe/Paris"
            assert c.get_settings().application_name == "other"
            assert await c.fetchval("SHOW TimeZone") == "Europe/Paris"
            assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
        finally:
            await b.close()
            await c.close()
    finally:
        await a.close()
