"""Session state that cannot follow a client to another server pins it to its server.

In transaction and statement mode a client's session settings are replayed wherever it goes
(settings.py). A temporary table, a WITH HOLD cursor, a session advisory lock, a loaded
library or an SQL prepared statement whose PREPARE the pooler cannot tell (frontend/sqlprepare.py)
cannot be moved: while any of them lasts, the client keeps
its server (`pin_policy = "pin"`), or is refused with 0A000 naming it (`"refuse"`, and always in
statement mode). PostgreSQL is the authority on what a session holds: the same read-back that
learns its settings asks the catalogs, after every transaction the pre-filter flags and after
every transaction of a pinned client, which is how a pin ends. A server that held such state is
reset with DISCARD ALL (closed, after LOAD) before anyone else gets it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pgdoorman.protocol import codes

# What the session holds, as one row of session_settings_sql (settings.py), named so that no
# setting can be: names of settings hold no space.
HELD_ROW = " held"
HELD_SQL = (
    f" UNION ALL SELECT '{HELD_ROW}', pg_catalog.concat_ws(', ',"
    " CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_class"
    " WHERE relnamespace = pg_catalog.pg_my_temp_schema()) THEN 'temporary table' END,"
    " CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)"
    " THEN 'WITH HOLD cursor' END,"
    " CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype = 'advisory'"
    " AND pid = pg_catalog.pg_backend_pid()) THEN 'session advisory lock' END)"
)
PIN = "pin"  # config.schema.PIN_POLICIES


def held_state(rows: Sequence[Sequence[str | None]], loaded: bool, stuck_prepared: bool = False) -> str:
    """What the session holds that cannot move ("" for nothing), from the read-back's rows."""
    held = [next((row[1] or "" for row in rows if row[0] == HELD_ROW), "")]
    if stuck_prepared:
        held.append("SQL prepared statement")
    if loaded:
        held.append("LOAD")
    return ", ".join(filter(None, held))


def refusal(held: str, mode: str, policy: str) -> tuple[str, str] | None:
    """The error (SQLSTATE, message) that ends a client holding `held`, or None to pin it."""
    if not held or (policy == PIN and mode != "statement"):
        return None
    why = ('pin_policy = "refuse"' if mode != "statement"
           else "a statement-mode client has no server of its own")
    return codes.FEATURE_NOT_SUPPORTED, f"{held} not supported in {mode} pooling mode ({why})"
