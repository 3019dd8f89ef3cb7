"""Run-time settings a client asked for at startup: validated by PostgreSQL, replayed wherever it is lent.

PostgreSQL applies a startup packet's settings in this order: the `options` switches first
(`-c name=value`, `--name=value`), then every other parameter that is not `user`, `database`,
`options`, `replication` or a `_pq_.` protocol option. Each is a GUC set with SetConfigOption, and the
first that fails ends the login with a FATAL.

The pooler has PostgreSQL itself judge them, once per pool and set of startup settings (the probe):
on a pooled server it runs `RESET ALL` (from defaults, as a new backend starts) and then
`set_config(name, value, false)` for each, in order. set_config takes the value as the startup
packet gives it (SET would quote list values such as `search_path=a,b` as one identifier, and
cannot set an empty list). An error becomes the client's FATAL, with PostgreSQL's SQLSTATE and text;
on success the ParameterStatus values the server now reports are what the client is told
(`utf-8` -> `UTF8`), and the result is cached in `pool.welcomes`.

A client then carries its settings in two parts: `tracked` (the TRACKED_PARAMS values, which follow
the client's own SETs through ParameterStatus) and `settings`, every other one, as sorted
(lower-case name, value) pairs. A server records the same (`server.tracked`, `server.settings`);
on each loan `replay_sql` gives the server the client's values and sets back to DEFAULT what the
client lacks. This is the one replay mechanism; later kinds of session state extend it here.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from pgdoorman.frontend.standin import StandIn
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m
from pgdoorman.server import TRACKED_PARAMS, tracked_values

if TYPE_CHECKING:
    from pgdoorman.pool import Pool
    from pgdoorman.server import ServerConn

log = logging.getLogger("pgdoorman.settings")

Setting = tuple[str, str]
Settings = tuple[Setting, ...]

# Startup parameters that are not run-time settings (PostgreSQL's ProcessStartupPacket).
NOT_SETTINGS = frozenset(("user", "database", "options", "replication"))
# Settings RESET ALL does not undo: the pooler could not take them back before the next client.
REFUSED = frozenset(("role", "session_authorization"))
# process_postgres_switches' other switches: valid for PostgreSQL, not emulated by the pooler.
_OTHER_SWITCHES = frozenset("BbCDdEeFfhijklNnOPprSsTtvW")
_SPACE = frozenset(" \t\n\r\v\f")  # C isspace()
WELCOME_CACHE = 256  # distinct startup-setting sets per pool whose login reply is kept (LRU)


class Refused(Exception):
    """A startup parameter the client cannot have: its FATAL, as PostgreSQL (or the pooler) words it."""

    def __init__(self, code: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
        self.hint = hint

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Refused:
        """From a server's ErrorResponse fields (the probe's failed set_config)."""
        return cls(fields.get("C", codes.INTERNAL_ERROR), fields.get("M", "invalid startup parameter"),
                   fields.get("D"), fields.get("H"))


class Welcome(NamedTuple):
    """A login reply: what a client sending these startup settings is told, and then owns."""

    params: dict[str, str]  # ParameterStatus values (each client takes a copy)
    tracked: tuple[str | None, ...]  # their TRACKED_PARAMS values
    settings: Settings  # its other settings: sorted (lower-case name, value)
    block: bytes  # the ParameterStatus messages


# --- the startup packet ---

def check_replication(value: str | None) -> None:
    """replication=false (or absent) is an ordinary connection; anything else is refused (before
    authentication, where PostgreSQL reads it)."""
    if value is None:
        return
    if value != "database":
        wanted = _parse_bool(value)
        if wanted is None:
            raise Refused(codes.INVALID_PARAMETER_VALUE,
                          f'invalid value for parameter "replication": "{value}"',
                          hint='Valid values are: "false", 0, "true", 1, "database".')
        if not wanted:
            return
    raise Refused(codes.FEATURE_NOT_SUPPORTED,
                  "replication connections are not supported through the pooler; "
                  "connect to PostgreSQL directly")


def startup_settings(params: Mapping[str, str]) -> list[Setting]:
    """The settings a startup packet asks for, as (name as sent, value), in PostgreSQL's order.
    Raises Refused for what PostgreSQL would refuse while parsing, or the pooler cannot honour."""
    asked = option_settings(params["options"]) if "options" in params else []
    asked += [(name, value) for name, value in params.items()
              if name not in NOT_SETTINGS and not name.startswith("_pq_.")]
    for name, _ in asked:
        if name.lower() in REFUSED:
            raise Refused(codes.FEATURE_NOT_SUPPORTED,
                          f'parameter "{name}" cannot be set at startup through the pooler; '
                          "use SET after connecting")
    return asked


def split_options(text: str) -> list[str]:
    """PostgreSQL's pg_split_opts: words split at white space; a backslash makes the next
    character (a space, a backslash) part of the word."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in _SPACE:
            i += 1
        if i == n:
            break
        word: list[str] = []
        escaped = False
        while i < n and (escaped or text[i] not in _SPACE):
            if not escaped and text[i] == "\\":
                escaped = True
            else:
                escaped = False
                word.append(text[i])
            i += 1
        words.append("".join(word))
    return words


def option_settings(text: str) -> list[Setting]:
    """The settings of an `options` parameter: `-c name=value`, `-cname=value`, `--name=value`
    (a '-' in the name is '_'), as PostgreSQL's getopt loop reads them."""
    args = split_options(text)
    out: list[Setting] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":  # end of switches: anything after it is a stray argument
            if i < len(args):
                _invalid_argument(args[i])
            break
        if len(arg) < 2 or arg[0] != "-":
            _invalid_argument(arg)
        flag = arg[1]
        if flag == "-":
            out.append(_long_option(arg[2:], "--"))
        elif flag == "c":
            value = arg[2:]
            if not value:
                if i == len(args):
                    _invalid_argument(arg)
                value = args[i]
                i += 1
            out.append(_long_option(value, "-c "))
        elif flag in _OTHER_SWITCHES:
            raise Refused(codes.FEATURE_NOT_SUPPORTED,
                          f'option "-{flag}" in startup parameter "options" is not supported by the pooler; '
                          "use -c name=value")
        else:
            _invalid_argument(arg)
    return out


def _long_option(text: str, switch: str) -> Setting:
    """PostgreSQL's ParseLongOption."""
    name, eq, value = text.partition("=")
    if not eq:
        raise Refused(codes.SYNTAX_ERROR, f"{switch}{text} requires a value")
    return name.replace("-", "_"), value


def _invalid_argument(arg: str) -> None:
    raise Refused(codes.SYNTAX_ERROR, f"invalid command-line argument for server process: {arg}",
                  hint='Try "postgres --help" for more information.')


def _parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool: a case-insensitive prefix of true/false/yes/no, on/off, 1/0."""
    v = value.lower()
    if v and "true".startswith(v) or v and "yes".startswith(v) or v in ("on", "1"):
        return True
    if v and "false".startswith(v) or v and "no".startswith(v) or v in ("of", "off", "0"):
        return False
    return None


# --- the login reply, cached per pool ---

def _local(name: str, value: str) -> bool:
    """Settings the pooler can judge itself: an application_name PostgreSQL keeps as it is
    (printable ASCII; it replaces anything else). It varies per client; a probe per value would not."""
    return name.lower() == "application_name" and all(" " <= ch <= "~" for ch in value)


def split_local(asked: Sequence[Setting]) -> tuple[Settings, Settings]:
    """(the settings PostgreSQL must judge, the ones applied locally on top)."""
    apps = [(n, v) for n, v in asked if n.lower() == "application_name"]
    if apps and _local(*apps[-1]):
        return tuple(s for s in asked if s[0].lower() != "application_name"), (apps[-1],)
    return tuple(asked), ()


def _welcome(params: dict[str, str], settings: Settings) -> Welcome:
    block = b"".join(m.parameter_status(name, value) for name, value in params.items())
    return Welcome(params, tracked_values(params), settings, block)


def probed_welcome(reported: Mapping[str, str], asked: Sequence[Setting]) -> Welcome:
    """After a successful probe: the server's ParameterStatus values are now exactly what a new
    backend with these settings reports. Reported settings take the server's spelling of their
    value; the others keep the client's (PostgreSQL validated it)."""
    params = dict(reported)
    canonical = {name.lower(): name for name in params}
    settings: dict[str, str] = {}
    for name, value in asked:
        key = name.lower()
        known = canonical.get(key)
        if known is None:
            settings[key] = value
        elif known not in TRACKED_PARAMS:
            settings[key] = params[known]
    return _welcome(params, tuple(sorted(settings.items())))


def cached_welcome(pool: Pool, asked: Sequence[Setting]) -> Welcome | None:
    """The login reply for these startup settings, or None when PostgreSQL must judge them first
    (Probe) or no server has told the pool its ParameterStatus values yet."""
    welcomes = pool.welcomes
    key = tuple(asked)
    found = welcomes.pop(key, None)
    if found is not None:
        welcomes[key] = found  # least recently used last: evicted first
        return found
    judged, local = split_local(asked)
    if judged:
        base = welcomes.get(judged)
        if base is None:
            return None
    elif pool.server_params is None:
        return None
    else:
        params = dict(pool.server_params)
        params["application_name"] = pool.application_name
        base = _welcome(params, ())
    if local:
        params = dict(base.params)
        params["application_name"] = local[0][1]
        base = _welcome(params, base.settings)
    remember(pool, key, base)
    return base


def remember(pool: Pool, key: Settings, welcome: Welcome) -> None:
    welcomes = pool.welcomes
    welcomes.pop(key, None)
    while len(welcomes) >= WELCOME_CACHE:
        del welcomes[next(iter(welcomes))]
    welcomes[key] = welcome


# --- the probe ---

class _Discard(asyncio.Transport):
    """Where a probe's replies would go: nowhere (they are all the pooler's own)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_DISCARD = _Discard()


class Probe(StandIn):
    """Stands in for the client on a server while PostgreSQL judges the client's startup settings.
    done(server, None) on success (the result is cached in the pool), done(server, Refused) on
    PostgreSQL's error; lost(reason) if the server goes away first."""

    transport: asyncio.Transport = _DISCARD

    def __init__(self, server: ServerConn, asked: Settings,
                 done: Callable[[ServerConn, Refused | None], None], lost: Callable[[str], None]) -> None:
        self._server = server
        self._asked = asked
        self._done = done
        self._lost = lost
        self._saved = server.settings
        server.hidden_error = None
        server.client = self
        # (nothing asked: the pool has only servers an upgrade handed over, which told it nothing)
        server.send_hidden("RESET ALL;" + set_config_sql(asked) if asked else "RESET ALL")

    def on_ready(self, status: int) -> None:
        server = self._server
        server.client = None
        error, server.hidden_error = server.hidden_error, None
        if error is not None:
            server.settings = self._saved  # the probe's one transaction was rolled back
            self._done(server, Refused.from_fields(error))
            return
        welcome = probed_welcome(server.params, self._asked)
        if not self._asked and server.pool.server_params is None:
            # A pool whose servers were all handed over by an upgrade (none logged in here): after
            # RESET ALL this one reports what a fresh backend would, as connect() records.
            server.pool.server_params = dict(server.params)
        server.settings = welcome.settings
        remember(server.pool, self._asked, welcome)
        self._done(server, None)

    def on_server_lost(self, server: ServerConn, reason: str) -> None:
        self._lost(reason)


# --- the replay ---

def set_config_sql(settings: Sequence[Setting]) -> str:
    """One statement that sets each value exactly as a startup packet would (set_config), in order,
    and returns no row: the pooler's queries must not send the client rows."""
    calls = ", ".join(
        f"pg_catalog.set_config({m.quote_literal(name)}, {m.quote_literal(value)}, false) AS s{i}"
        for i, (name, value) in enumerate(settings))
    return f"SELECT FROM (SELECT {calls} OFFSET 0) AS s WHERE s.s0 IS NULL"


def replay_sql(tracked: tuple[str | None, ...], settings: Settings, server: ServerConn) -> str:
    """The pooler's query that gives server this client's settings ("" if it has them all); the
    server's record says it has them from now on. After a failed pooler query on the server its
    record cannot be trusted: then everything is reset and set again."""
    error = server.hidden_error
    full = error is not None or server.settings_unknown
    parts = []
    if error is not None:
        log.info("%s: a pooler query failed here (%s): settings reset and replayed", server.id,
                 error.get("M"))
        server.hidden_error = None
    if full:
        server.settings_unknown = False
        parts.append("SET SESSION AUTHORIZATION DEFAULT;RESET ROLE;RESET ALL")  # ALL keeps these two
    parts += [f"SET {m.quote_ident(name)} TO {m.quote_literal(mine)}"
              for name, mine, theirs in zip(TRACKED_PARAMS, tracked, server.tracked, strict=True)
              if mine is not None and (full or mine != theirs)]
    theirs = () if full else server.settings
    if settings != theirs:
        have = dict(theirs)
        mine = dict(settings)
        parts += [f"SET {m.quote_ident(name)} TO DEFAULT" for name in have if name not in mine]
        changed = [(name, value) for name, value in settings if have.get(name) != value]
        if changed:
            parts.append(set_config_sql(changed))
    server.settings = settings  # after a full reset too, whatever the server's record said
    return ";".join(parts)


def followed(settings: Settings, name: str, value: str) -> Settings:
    """settings after a ParameterStatus: a reported setting the client owns follows its own SETs,
    as tracked ones do."""
    key = name.lower()
    for i, (have, old) in enumerate(settings):
        if have == key:
            return settings if old == value else settings[:i] + ((key, value),) + settings[i + 1:]
    return settings


# --- reading a client's settings back (transaction and statement mode) ---

# PostgreSQL is the authority on what a transaction left: every setting whose source is the
# session (SET, set_config(..., false), a SET inside a function or DO block; a rolled-back SET is
# gone), then the two that pg_settings does not show. Schema-qualified: the client's search_path
# must not choose what runs.
_SESSION_SETTINGS_SQL = (
    "SELECT * FROM (SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session'"
    " ORDER BY name) s UNION ALL SELECT 'session_authorization',"
    " pg_catalog.current_setting('session_authorization')"
    " UNION ALL SELECT 'role', pg_catalog.current_setting('role')"
)
_TRACKED_LOWER = frozenset(name.lower() for name in TRACKED_PARAMS)
# Custom settings (myapp.tenant) that no extension defines are placeholders pg_settings does not
# show: their names come from the client's SET and set_config() texts.
_CUSTOM_SET = re.compile(rb"(?i)^\s*set\s+(?:session\s+)?([a-z_][\w$]*\.[a-z_][\w$]*)")
_CUSTOM_CONFIG = re.compile(rb"(?i)set_config\s*\(\s*'([a-z_][\w$]*\.[a-z_][\w$]*)'")
MAX_CUSTOM_NAMES = 64  # per client: the names it may have set, read back by name


def custom_names(sql: bytes | bytearray) -> list[str]:
    """Names of custom settings a query text sets (SET a.b ..., set_config('a.b', ...))."""
    names = [match.group(1) for match in _CUSTOM_CONFIG.finditer(sql)]
    first = _CUSTOM_SET.match(sql)
    if first is not None:
        names.append(first.group(1))
    return [name.decode("ascii").lower() for name in names]


def session_settings_sql(custom: Sequence[str]) -> str:
    """The query that reads a client's session settings back, custom ones by name."""
    return _SESSION_SETTINGS_SQL + "".join(
        f" UNION ALL SELECT {quoted}, pg_catalog.current_setting({quoted}, true)"
        for quoted in map(m.quote_literal, custom))


def session_settings(rows: Sequence[Sequence[str | None]], login_user: str,
                     initial: Settings = ()) -> Settings:
    """A client's settings from session_settings_sql's rows on the server it was lent, over its
    startup settings (initial: what its RESET goes back to). The ParameterStatus ones are tracked
    apart (TRACKED_PARAMS); session_authorization and role only where the client changed them."""
    merged = dict(initial)  # a value read back replaces the startup one, in the startup's order
    seen: set[str] = set()
    for name, value in rows:
        if name is None or value is None or name.lower() in _TRACKED_LOWER or name in seen or " " in name:
            # (a name with a space is no setting: the read-back's other rows, frontend/pins.py)
            continue
        seen.add(name)
        if value == "" and "." in name:  # a custom setting never set (or RESET): nothing to replay
            continue
        if (name == "session_authorization" and value == login_user) or (name == "role" and value == "none"):
            continue
        merged[name] = value
    return tuple(merged.items())
