"""pg_hba.conf parsing and matching with PostgreSQL 15 semantics, minus what a pooler cannot do.

The file format is PostgreSQL's: one record per line (a trailing backslash continues it), `#` comments,
fields split on blanks, comma-separated lists inside a field, double quotes to protect blanks, commas and
keywords (`"all"` is a database or user literally named all; `""` inside quotes is a literal quote).
The first record matching connection type, address, database and user decides; no match means reject.

Unsupported, and rejected at load time rather than silently ignored:
  * connection types hostgssenc / hostnogssenc; addresses samehost / samenet and host names;
  * database keywords samerole / samegroup, user groups (`+role`), `@file` inclusions, option `map`;
  * methods other than trust, reject, password, md5, scram-sha-256, cert and jwt (pgdoorman's own).
The `replication` database keyword is accepted but matches nothing: a pooler never carries replication
connections, and PostgreSQL's `all` does not match them either.

Deliberate differences from PostgreSQL: a bare address without a mask (`10.1.2.3`) means a single host
(/32 or /128), where PostgreSQL would read the next field as a netmask; an unterminated quote is an error;
an IPv4-mapped IPv6 client (`::ffff:1.2.3.4`, seen on dual-stack sockets, which PostgreSQL avoids with
IPV6_V6ONLY) also matches IPv4 rules, as older PostgreSQL releases did by promoting IPv4 rules.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

__all__ = [
    "CONN_TYPES",
    "HBA_SQLSTATE",
    "METHODS",
    "HbaError",
    "HbaRule",
    "HbaRules",
    "Keyword",
    "no_match_message",
    "parse_hba",
    "reject_message",
]

HBA_SQLSTATE = "28000"  # invalid_authorization_specification, for both "no entry" and "rejects"
CONN_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "reject", "password", "md5", "scram-sha-256", "cert", "jwt")
# PostgreSQL's other methods: valid there, so they get a clearer message than "invalid".
_FOREIGN_METHODS = frozenset({"ident", "peer", "gss", "sspi", "pam", "ldap", "radius", "bsd"})
_CLIENTCERT = ("verify-ca", "verify-full")
_BLANKS = " \t\r"  # PostgreSQL's pg_isblank(): other whitespace is part of a token
# Text that is clearly an attempt at a numeric address: gets "invalid IP address", not "host name".
_IPISH = re.compile(r"[0-9.]+|[0-9A-Fa-f:.%]*:[0-9A-Za-z:.%]*")

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class Keyword(enum.Enum):
    """Unquoted keywords in the database and user fields; never equal to a (quoted) name string."""

    ALL = "all"
    SAMEUSER = "sameuser"  # database field only: matches when database == user
    REPLICATION = "replication"  # database field only: matches nothing in a pooler


class HbaError(ValueError):
    """A pg_hba.conf problem; str() is `PATH:LINE: message`.

    Not a ConfigError: the config loader is what imports this module (and wraps the error), so
    importing pgdoorman.config from here would make a cycle.
    """

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


class _Bad(Exception):
    """Raised inside one record; parse_hba() adds the path and line."""


@dataclass(frozen=True, slots=True)
class HbaRule:
    """One pg_hba.conf record. network is None for `all` and for local rules.

    options holds the name=value options as written (read-only); `cert` implies clientcert=verify-full
    without it being listed here.
    """

    line: int
    conn_type: str  # one of CONN_TYPES
    databases: frozenset[str | Keyword]
    users: frozenset[str | Keyword]
    network: Network | None
    method: str  # one of METHODS
    options: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}), hash=False)


# What match() walks: (rule, local, tls ok, plaintext ok, any address, v4 net, v6 net, any db,
# sameuser, any user). Flat tuples so the per-connection walk does no attribute or set lookups for keywords.
_Compiled: TypeAlias = tuple[HbaRule, bool, bool, bool, bool, ipaddress.IPv4Network | None,
                             ipaddress.IPv6Network | None, bool, bool, bool]


def _compile(rule: HbaRule) -> _Compiled:
    net = rule.network
    return (
        rule,
        rule.conn_type == "local",
        rule.conn_type in ("host", "hostssl"),
        rule.conn_type in ("host", "hostnossl"),
        net is None,
        net if isinstance(net, ipaddress.IPv4Network) else None,
        net if isinstance(net, ipaddress.IPv6Network) else None,
        Keyword.ALL in rule.databases,
        Keyword.SAMEUSER in rule.databases,
        Keyword.ALL in rule.users,
    )


class HbaRules:
    """The parsed file: rules in file order, first match wins."""

    __slots__ = ("path", "rules", "_compiled")

    def __init__(self, rules: Iterable[HbaRule] = (), path: str = "<hba>") -> None:
        self.path = path
        self.rules: tuple[HbaRule, ...] = tuple(rules)
        self._compiled = tuple(_compile(r) for r in self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[HbaRule]:
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"HbaRules({self.path!r}, {len(self.rules)} rules)"

    def match(self, *, conn_type: str, tls: bool, database: str, user: str,
              address: str | None) -> HbaRule | None:
        """The first rule for this connection, or None (the caller then refuses, as PostgreSQL does).

        conn_type is "local" (Unix socket, address None) or "host" (TCP, address the peer IP as text).
        A returned rule may have method "reject": the caller refuses with reject_message().
        ValueError if the arguments are inconsistent or address is not an IP address.
        """
        _check_conn(conn_type, address)
        local = conn_type == "local"
        v4: ipaddress.IPv4Address | None = None
        v6: ipaddress.IPv6Address | None = None
        if address is not None:
            ip = ipaddress.ip_address(address)
            if isinstance(ip, ipaddress.IPv6Address):
                v6, v4 = ip, ip.ipv4_mapped
            else:
                v4 = ip
        for (rule, is_local, tls_ok, plain_ok, any_addr, net4, net6,
             any_db, same_db, any_user) in self._compiled:
            if local:
                if not is_local:
                    continue
            elif is_local or not (tls_ok if tls else plain_ok):
                continue
            elif not (any_addr or (net4 is not None and v4 is not None and v4 in net4)
                      or (net6 is not None and v6 is not None and v6 in net6)):
                continue
            if not (any_db or database in rule.databases or (same_db and database == user)):
                continue
            if any_user or user in rule.users:
                return rule
        return None


def _check_conn(conn_type: str, address: str | None) -> None:
    if conn_type == "local":
        if address is not None:
            raise ValueError("a local connection has no address")
    elif conn_type == "host":
        if address is None:
            raise ValueError("a host connection needs an address")
    else:
        raise ValueError(f"conn_type must be 'local' or 'host', got {conn_type!r}")


def _describe(conn_type: str, tls: bool, database: str, user: str, address: str | None) -> str:
    _check_conn(conn_type, address)
    host = "[local]" if conn_type == "local" else address
    return f'host "{host}", user "{user}", database "{database}", {"SSL" if tls else "no"} encryption'


def no_match_message(*, conn_type: str, tls: bool, database: str, user: str, address: str | None) -> str:
    """PostgreSQL's FATAL text when no rule matches (SQLSTATE HBA_SQLSTATE)."""
    return "no pg_hba.conf entry for " + _describe(conn_type, tls, database, user, address)


def reject_message(*, conn_type: str, tls: bool, database: str, user: str, address: str | None) -> str:
    """PostgreSQL's FATAL text when the matching rule is `reject` (SQLSTATE HBA_SQLSTATE)."""
    return "pg_hba.conf rejects connection for " + _describe(conn_type, tls, database, user, address)


@dataclass(frozen=True, slots=True)
class _Token:
    text: str
    quoted: bool  # began with a quote: keywords and @file lose their meaning, as in PostgreSQL


def _next_token(line: str, pos: int) -> tuple[_Token | None, int, bool]:
    """(token or None at end of line, position after it, whether an unquoted comma ends it).

    Mirrors PostgreSQL's next_token(): quotes may cover part of a token (`a"b c"`), `""` inside
    quotes is a literal quote, and only a quote at the very start makes the token "quoted".
    """
    n = len(line)
    while pos < n and (line[pos] in _BLANKS or line[pos] == ","):
        pos += 1
    buf: list[str] = []
    in_quote = was_quote = saw_quote = initial_quote = comma = False
    while pos < n and (in_quote or line[pos] not in _BLANKS):
        c = line[pos]
        if c == "#" and not in_quote:
            pos = n
            break
        if c == "," and not in_quote:
            comma = True
            break  # left in place: the next call skips it
        if c != '"' or was_quote:
            buf.append(c)
        was_quote = (not was_quote) if in_quote and c == '"' else False
        if c == '"':
            in_quote = not in_quote
            saw_quote = True
            initial_quote = initial_quote or not buf
        pos += 1
    if in_quote:
        raise _Bad("unterminated quoted string")
    if not (saw_quote or buf):
        return None, pos, False
    return _Token("".join(buf), initial_quote), pos, comma


def _split_fields(line: str) -> list[list[_Token]]:
    fields: list[list[_Token]] = []
    pos = 0
    while True:
        items: list[_Token] = []
        comma = True
        while comma:
            tok, pos, comma = _next_token(line, pos)
            if tok is None:
                break
            items.append(tok)
        if not items:
            return fields
        fields.append(items)


def _records(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, logical line): a backslash as the very last character joins the next line,
    even inside comments and quotes, as in PostgreSQL 15."""
    start = 0
    parts: list[str] = []
    for number, raw in enumerate(text.split("\n"), 1):
        raw = raw.rstrip("\r")
        if not parts:
            start = number
        if raw.endswith("\\"):
            parts.append(raw[:-1])
            continue
        parts.append(raw)
        yield start, "".join(parts)
        parts = []
    if parts:
        yield start, "".join(parts)


def _single(items: list[_Token], what: str) -> _Token:
    if len(items) > 1:
        raise _Bad(f"multiple values specified for {what}")
    return items[0]


def _names(items: list[_Token], database: bool) -> frozenset[str | Keyword]:
    out: set[str | Keyword] = set()
    for tok in items:
        t = tok.text
        if not tok.quoted:
            if t == "all":
                out.add(Keyword.ALL)
                continue
            if len(t) > 1 and t[0] == "@":
                raise _Bad(f'file inclusion is not supported by pgdoorman: "{t}"')
            if database:
                if t in ("sameuser", "replication"):
                    out.add(Keyword(t))
                    continue
                if t in ("samerole", "samegroup"):
                    raise _Bad(f'database keyword "{t}" is not supported by pgdoorman')
            elif t.startswith("+"):
                raise _Bad(f'group membership ("+role") is not supported by pgdoorman: "{t}"')
        out.add(t)
    return frozenset(out)


def _ip(text: str) -> Address | None:
    if "%" in text:  # a zone id would silently never match a peer address
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _mask_prefix(addr: Address, text: str) -> int:
    mask = _ip(text)
    if mask is None:
        raise _Bad(f'invalid IP mask "{text}"')
    if mask.version != addr.version:
        raise _Bad("IP address and mask do not match")
    bits, value = mask.max_prefixlen, int(mask)
    ones = bits - (~value & ((1 << bits) - 1)).bit_length()
    # Contiguous means ones-then-zeros; ipaddress would also take a host mask like 0.0.0.255.
    if value != ((1 << bits) - 1) ^ ((1 << (bits - ones)) - 1):
        raise _Bad(f'invalid IP mask "{text}": not a contiguous netmask')
    return ones


def _address(fields: list[list[_Token]], i: int) -> tuple[Network | None, int]:
    """Parse the address (and optional mask) starting at fields[i]; return it and the next index."""
    tok = _single(fields[i], "host address")
    t = tok.text
    if not tok.quoted and t == "all":
        return None, i + 1
    if not tok.quoted and t in ("samehost", "samenet"):
        raise _Bad(f'address keyword "{t}" is not supported by pgdoorman')
    if "/" in t:
        addr_text, _, length = t.partition("/")
        addr = _ip(addr_text)
        if addr is None:
            raise _Bad(f'invalid IP address "{addr_text}"')
        if not (length.isascii() and length.isdecimal() and len(length) <= 3
                and int(length) <= addr.max_prefixlen):
            raise _Bad(f'invalid CIDR mask in address "{t}"')
        return ipaddress.ip_network((addr, int(length)), strict=False), i + 1
    addr = _ip(t)
    if addr is None:
        if t in METHODS or t in _FOREIGN_METHODS:
            raise _Bad(f'expected an IP address before authentication method "{t}"')
        if _IPISH.fullmatch(t):
            raise _Bad(f'invalid IP address "{t}"')
        raise _Bad(f'host names are not supported by pgdoorman: "{t}"')
    # A following field that looks like an address is a netmask; anything else is the method.
    if i + 1 < len(fields) and _IPISH.fullmatch(fields[i + 1][0].text):
        prefix = _mask_prefix(addr, _single(fields[i + 1], "netmask").text)
        return ipaddress.ip_network((addr, prefix), strict=False), i + 2
    return ipaddress.ip_network(addr), i + 1


def _options(fields: list[list[_Token]], conn_type: str, method: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for tok in (t for items in fields for t in items):
        name, eq, value = tok.text.partition("=")
        if not eq:
            raise _Bad(f'authentication option not in name=value format: "{tok.text}"')
        if name == "map":
            raise _Bad('authentication option "map" is not supported by pgdoorman')
        if name != "clientcert":
            raise _Bad(f'unrecognized authentication option name: "{name}"')
        if conn_type != "hostssl":
            raise _Bad('clientcert can only be configured for "hostssl" rows')
        if value not in _CLIENTCERT:
            raise _Bad(f'invalid value for clientcert: "{value}"')
        if method == "cert" and value != "verify-full":
            raise _Bad('clientcert only accepts "verify-full" when using "cert" authentication')
        options[name] = value  # a repeated option overrides, as in PostgreSQL
    return options


def _rule(number: int, fields: list[list[_Token]]) -> HbaRule:
    conn_type = _single(fields[0], "connection type").text
    if conn_type in ("hostgssenc", "hostnogssenc"):
        raise _Bad(f'connection type "{conn_type}" is not supported by pgdoorman')
    if conn_type not in CONN_TYPES:
        raise _Bad(f'invalid connection type "{conn_type}"')
    if len(fields) < 2:
        raise _Bad("end-of-line before database specification")
    databases = _names(fields[1], database=True)
    if len(fields) < 3:
        raise _Bad("end-of-line before role specification")
    users = _names(fields[2], database=False)
    network: Network | None = None
    i = 3
    if conn_type != "local":
        if len(fields) <= i:
            raise _Bad("end-of-line before IP address specification")
        network, i = _address(fields, i)
    if len(fields) <= i:
        raise _Bad("end-of-line before authentication method")
    method = _single(fields[i], "authentication type").text
    if method in _FOREIGN_METHODS:
        raise _Bad(f'authentication method "{method}" is not supported by pgdoorman')
    if method not in METHODS:
        raise _Bad(f'invalid authentication method "{method}"')
    # PostgreSQL refuses cert elsewhere too: on a `host` line it would silently not apply to plaintext.
    if method == "cert" and conn_type != "hostssl":
        raise _Bad("cert authentication is only supported on hostssl connections")
    options = _options(fields[i + 1:], conn_type, method)
    return HbaRule(number, conn_type, databases, users, network, method, types.MappingProxyType(options))


def parse_hba(text: str, path: str = "<hba>") -> HbaRules:
    """Parse pg_hba.conf text; HbaError (with path and 1-based line) on the first bad record."""
    rules: list[HbaRule] = []
    for number, line in _records(text):
        try:
            fields = _split_fields(line)
            if fields:
                rules.append(_rule(number, fields))
        except _Bad as e:
            raise HbaError(path, number, str(e)) from None
    return HbaRules(rules, path)
