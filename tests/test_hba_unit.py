"""Unit tests for pgdoorman.auth.hba: pg_hba.conf parsing, matching and PostgreSQL's messages."""

import ipaddress

import pytest

from pgdoorman.auth.hba import (
    HBA_SQLSTATE,
    HbaError,
    HbaRule,
    HbaRules,
    Keyword,
    no_match_message,
    parse_hba,
    reject_message,
)

ALL = frozenset({Keyword.ALL})


def one(text: str) -> HbaRule:
    rules = parse_hba(text)
    assert len(rules) == 1
    return rules.rules[0]


def host(rules: HbaRules, address: str, *, tls: bool = False, database: str = "db",
         user: str = "u") -> HbaRule | None:
    return rules.match(conn_type="host", tls=tls, database=database, user=user, address=address)


def local(rules: HbaRules, *, database: str = "db", user: str = "u") -> HbaRule | None:
    return rules.match(conn_type="local", tls=False, database=database, user=user, address=None)


def method(rule: HbaRule | None) -> str | None:
    return rule.method if rule else None


def line(rule: HbaRule | None) -> int | None:
    return rule.line if rule else None


def error(text: str, path: str = "<hba>") -> HbaError:
    with pytest.raises(HbaError) as info:
        parse_hba(text, path)
    return info.value


# --- parsing: record types, fields, lists, quoting ---------------------------------------------------

def test_local_record() -> None:
    rule = one("local all all trust\n")
    assert rule == HbaRule(1, "local", ALL, ALL, None, "trust", {})


@pytest.mark.parametrize("conn_type", ["host", "hostssl", "hostnossl"])
def test_host_records(conn_type: str) -> None:
    rule = one(f"{conn_type} db u 10.0.0.0/8 md5")
    assert rule.conn_type == conn_type
    assert rule.databases == frozenset({"db"})
    assert rule.users == frozenset({"u"})
    assert rule.network == ipaddress.ip_network("10.0.0.0/8")
    assert rule.method == "md5"
    assert dict(rule.options) == {}


@pytest.mark.parametrize("method", ["trust", "reject", "password", "md5", "scram-sha-256", "jwt"])
@pytest.mark.parametrize("conn_type", ["local", "host", "hostssl", "hostnossl"])
def test_methods(conn_type: str, method: str) -> None:
    address = "" if conn_type == "local" else " all"
    assert one(f"{conn_type} all all{address} {method}").method == method


def test_cert_on_hostssl() -> None:
    rule = one("hostssl all all all cert")
    assert (rule.method, rule.network) == ("cert", None)


def test_comments_blank_lines_and_line_numbers() -> None:
    rules = parse_hba(
        "# header\n"
        "\n"
        "   \t  \n"
        "local all all trust   # trailing comment\n"
        "#host all all all reject\n"
        "host all all all md5#no space before the comment\n"
    )
    assert [r.line for r in rules] == [4, 6]
    assert [r.method for r in rules] == ["trust", "md5"]
    assert len(rules) == 2
    assert list(rules) == list(rules.rules)
    assert isinstance(rules.rules, tuple)


def test_crlf_and_tabs() -> None:
    rules = parse_hba("local\tall\tall\ttrust\r\nhost all all all md5\r\n")
    assert [(r.line, r.method) for r in rules] == [(1, "trust"), (2, "md5")]


def test_empty_file_matches_nothing() -> None:
    rules = parse_hba("# nothing\n\n")
    assert len(rules) == 0
    assert local(rules) is None


def test_path_is_kept() -> None:
    assert parse_hba("local all all trust", "/etc/pg_hba.conf").path == "/etc/pg_hba.conf"


@pytest.mark.parametrize(("field", "expected"), [
    ("db1,db2", {"db1", "db2"}),
    ("db1, db2", {"db1", "db2"}),  # a blank after a comma still continues the list, as in PostgreSQL
    ("db1,,db2", {"db1", "db2"}),
    ('"a b",c', {"a b", "c"}),
    ('"x,y"', {"x,y"}),
    ('"say ""hi"""', {'say "hi"'}),
    ('""', {""}),
    ('"a#b"', {"a#b"}),
    ('pre"fix me"', {"prefix me"}),
])
def test_database_lists_and_quoting(field: str, expected: set[str]) -> None:
    assert one(f"local {field} all trust").databases == frozenset(expected)


def test_user_list() -> None:
    assert one('local all alice,"Bob Smith", carol trust').users == frozenset({"alice", "Bob Smith", "carol"})


@pytest.mark.parametrize(("field", "expected"), [
    ("all", {Keyword.ALL}),
    ('"all"', {"all"}),
    ("sameuser", {Keyword.SAMEUSER}),
    ('"sameuser"', {"sameuser"}),
    ("replication", {Keyword.REPLICATION}),
    ('"replication"', {"replication"}),
    ('"samerole"', {"samerole"}),
    ('"@file"', {"@file"}),
    ("all,db", {Keyword.ALL, "db"}),
    ("@", {"@"}),
])
def test_database_keywords(field: str, expected: set[object]) -> None:
    assert one(f"local {field} all trust").databases == frozenset(expected)


@pytest.mark.parametrize(("field", "expected"), [
    ("all", {Keyword.ALL}),
    ('"all"', {"all"}),
    ('"+group"', {"+group"}),
    ("sameuser", {"sameuser"}),  # keywords of the database field are plain names here
    ("replication", {"replication"}),
])
def test_user_keywords(field: str, expected: set[object]) -> None:
    assert one(f"local all {field} trust").users == frozenset(expected)


@pytest.mark.parametrize(("address", "network"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3/8", "10.0.0.0/8"),  # host bits are ignored, as PostgreSQL masks both sides
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("192.168.1.7/32", "192.168.1.7/32"),
    ("192.168.1.7", "192.168.1.7/32"),
    ("::1/128", "::1/128"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::/0", "::/0"),
    ("::1", "::1/128"),
    ("10.0.0.0 255.0.0.0", "10.0.0.0/8"),
    ("10.9.9.9 255.255.255.0", "10.9.9.0/24"),
    ("10.0.0.1 255.255.255.255", "10.0.0.1/32"),
    ("0.0.0.0 0.0.0.0", "0.0.0.0/0"),
    ("2001:db8:: ffff:ffff::", "2001:db8::/32"),
])
def test_addresses(address: str, network: str) -> None:
    assert one(f"host all all {address} md5").network == ipaddress.ip_network(network)


def test_address_all_means_any() -> None:
    assert one("host all all all md5").network is None


def test_options() -> None:
    rule = one("hostssl all all all md5 clientcert=verify-ca")
    assert dict(rule.options) == {"clientcert": "verify-ca"}
    assert one("hostssl all all all trust clientcert=verify-full").options == {"clientcert": "verify-full"}
    assert one("hostssl all all all cert clientcert=verify-full").options == {"clientcert": "verify-full"}
    # Repeated: the last one wins, as in PostgreSQL; quotes may wrap the value.
    assert one('hostssl all all all md5 clientcert=verify-ca clientcert="verify-full"').options == {
        "clientcert": "verify-full"}


def test_rules_are_immutable_and_hashable() -> None:
    rule = one("hostssl all all all md5 clientcert=verify-ca")
    with pytest.raises(AttributeError):
        rule.method = "trust"  # type: ignore[misc]
    with pytest.raises(TypeError):
        rule.options["clientcert"] = "verify-full"  # type: ignore[index]
    assert hash(rule) == hash(one("hostssl all all all md5 clientcert=verify-ca"))


def test_line_continuation() -> None:
    rules = parse_hba("# a \\\nstill a comment\n"
                      "host db1,\\\ndb2 all \\\n  10.0.0.0/8 md5\n"
                      "local all all trust\n")
    assert [(r.line, r.conn_type) for r in rules] == [(3, "host"), (6, "local")]
    assert rules.rules[0].databases == frozenset({"db1", "db2"})
    assert rules.rules[0].network == ipaddress.ip_network("10.0.0.0/8")


def test_backslash_elsewhere_is_literal() -> None:
    assert one(r"local a\b all trust").databases == frozenset({r"a\b"})
    # Only the very last character continues: with a blank after it the backslash is a stray token.
    err = error("local all all trust \\ \nlocal all all trust")
    assert (err.line, err.message) == (1, 'authentication option not in name=value format: "\\"')


def test_continuation_at_end_of_file() -> None:
    assert one("local all all \\\ntrust\\").method == "trust"


# --- matching ------------------------------------------------------------------------------------------

SAMPLE = parse_hba("""\
local   all             postgres                trust
local   all             all                     md5
hostssl secure          all     10.0.0.0/8      cert
hostnossl plain         all     10.0.0.0/8      password
host    sameuser        all     10.0.0.0/8      scram-sha-256
host    app,"all"       alice,bob 10.0.0.0/8    md5
host    all             all     192.168.0.0 255.255.0.0 trust
host    all             all     2001:db8::/32   jwt
host    all             evil    all             reject
host    all             all     172.16.0.5      password
""")


@pytest.mark.parametrize(("user", "expected"), [("postgres", 1), ("alice", 2)])
def test_match_local(user: str, expected: int) -> None:
    assert line(local(SAMPLE, user=user)) == expected


def test_local_rules_do_not_match_tcp_and_vice_versa() -> None:
    rules = parse_hba("local all all trust")
    assert host(rules, "127.0.0.1") is None
    rules = parse_hba("host all all all trust")
    assert local(rules) is None


@pytest.mark.parametrize(("tls", "database", "expected"), [
    (True, "secure", 3),
    (False, "secure", None),
    (False, "plain", 4),
    (True, "plain", None),
])
def test_hostssl_hostnossl(tls: bool, database: str, expected: int | None) -> None:
    rule = host(SAMPLE, "10.1.2.3", tls=tls, database=database, user="nobody")
    assert line(rule) == expected


@pytest.mark.parametrize("tls", [True, False])
def test_host_matches_both_tls_and_plain(tls: bool) -> None:
    assert line(host(SAMPLE, "192.168.3.4", tls=tls)) == 7


@pytest.mark.parametrize(("database", "user", "expected"), [
    ("carol", "carol", 5),   # sameuser
    ("app", "alice", 6),
    ("all", "bob", 6),       # quoted "all" is a database literally named all
    ("other", "alice", None),
    ("app", "carol", None),
    ("App", "alice", None),  # names are case-sensitive
])
def test_names_and_sameuser(database: str, user: str, expected: int | None) -> None:
    rule = host(SAMPLE, "10.0.0.1", database=database, user=user)
    assert line(rule) == expected


@pytest.mark.parametrize(("address", "expected"), [
    ("192.168.255.255", 7),
    ("192.169.0.1", None),
    ("2001:db8::1", 8),
    ("2001:db9::1", None),
    ("::ffff:192.168.1.1", 7),   # IPv4-mapped IPv6 matches IPv4 rules
    ("::ffff:10.0.0.1", None),   # ...and only those that match the IPv4 address
    ("172.16.0.5", 10),          # bare IP: a single host
    ("172.16.0.6", None),
    ("::ffff:172.16.0.5", 10),
    ("fe80::1%eth0", None),
])
def test_address_matching(address: str, expected: int | None) -> None:
    rule = host(SAMPLE, address, database="x", user="y")
    assert line(rule) == expected


def test_ipv4_rule_does_not_match_plain_ipv6() -> None:
    rules = parse_hba("host all all 0.0.0.0/0 trust")
    assert host(rules, "::1") is None
    assert host(rules, "2001:db8::1") is None
    assert host(rules, "::ffff:8.8.8.8") is not None


def test_ipv6_rule_can_match_mapped_form() -> None:
    rules = parse_hba("host all all ::ffff:0:0/96 trust")
    assert host(rules, "::ffff:1.2.3.4") is not None
    assert host(rules, "1.2.3.4") is None  # a real IPv4 client is not an IPv6 address


def test_reject_rule_is_returned() -> None:
    rule = host(SAMPLE, "8.8.8.8", database="x", user="evil")
    assert rule is not None and (rule.line, rule.method) == (9, "reject")


def test_first_match_wins() -> None:
    rules = parse_hba("host all all 10.0.0.0/8 reject\nhost all all 10.1.0.0/16 trust\nhost all u all md5\n")
    assert method(host(rules, "10.1.2.3")) == "reject"
    assert method(host(rules, "11.0.0.1", user="u")) == "md5"
    rules = parse_hba("host all all 10.1.0.0/16 trust\nhost all all 10.0.0.0/8 reject\n")
    assert method(host(rules, "10.1.2.3")) == "trust"
    assert method(host(rules, "10.2.0.1")) == "reject"
    assert host(rules, "11.0.0.1") is None


def test_replication_matches_nothing() -> None:
    rules = parse_hba("local replication all trust\nlocal \"replication\" all md5\n")
    rule = local(rules, database="replication")
    assert rule is not None and rule.line == 2
    assert local(rules, database="db") is None


def test_no_match_returns_none() -> None:
    assert host(SAMPLE, "8.8.8.8", database="x", user="y") is None


@pytest.mark.parametrize(("kwargs", "what"), [
    ({"conn_type": "tcp", "address": "1.2.3.4"}, "conn_type"),
    ({"conn_type": "host", "address": None}, "address"),
    ({"conn_type": "local", "address": "1.2.3.4"}, "address"),
    ({"conn_type": "host", "address": "not-an-ip"}, "not-an-ip"),
])
def test_match_rejects_bad_arguments(kwargs: dict[str, str | None], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        SAMPLE.match(tls=False, database="d", user="u", **kwargs)  # type: ignore[arg-type]


# --- messages ------------------------------------------------------------------------------------------

def test_sqlstate() -> None:
    assert HBA_SQLSTATE == "28000"


@pytest.mark.parametrize(("conn_type", "tls", "address", "text"), [
    ("host", True, "1.2.3.4", 'host "1.2.3.4", user "u", database "d", SSL encryption'),
    ("host", False, "1.2.3.4", 'host "1.2.3.4", user "u", database "d", no encryption'),
    ("host", False, "::ffff:1.2.3.4", 'host "::ffff:1.2.3.4", user "u", database "d", no encryption'),
    ("local", False, None, 'host "[local]", user "u", database "d", no encryption'),
])
def test_messages(conn_type: str, tls: bool, address: str | None, text: str) -> None:
    kw = {"conn_type": conn_type, "tls": tls, "database": "d", "user": "u", "address": address}
    assert no_match_message(**kw) == "no pg_hba.conf entry for " + text  # type: ignore[arg-type]
    assert reject_message(**kw) == "pg_hba.conf rejects connection for " + text  # type: ignore[arg-type]


def test_message_exact_wording() -> None:
    assert no_match_message(conn_type="host", tls=False, database="d", user="u", address="1.2.3.4") == (
        'no pg_hba.conf entry for host "1.2.3.4", user "u", database "d", no encryption')
    with pytest.raises(ValueError):
        no_match_message(conn_type="host", tls=False, database="d", user="u", address=None)


# --- errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("record", "message"), [
    ("hostgssenc all all all md5", 'connection type "hostgssenc" is not supported by pgdoorman'),
    ("hostnogssenc all all all md5", 'connection type "hostnogssenc" is not supported by pgdoorman'),
    ("hots all all all md5", 'invalid connection type "hots"'),
    ("host,local all all all md5", "multiple values specified for connection type"),
    ("local", "end-of-line before database specification"),
    ("local all", "end-of-line before role specification"),
    ("local all all", "end-of-line before authentication method"),
    ("host all all", "end-of-line before IP address specification"),
    ("host all all 10.0.0.0/8", "end-of-line before authentication method"),
    ("host all all 10.0.0.0 255.0.0.0", "end-of-line before authentication method"),
    ("host all all md5", 'expected an IP address before authentication method "md5"'),
    ("host all all 10.0.0.0/8,::1/128 md5", "multiple values specified for host address"),
    ("host all all samehost md5", 'address keyword "samehost" is not supported by pgdoorman'),
    ("host all all samenet md5", 'address keyword "samenet" is not supported by pgdoorman'),
    ("host all all db.example.com md5", 'host names are not supported by pgdoorman: "db.example.com"'),
    ("host all all .example.com md5", 'host names are not supported by pgdoorman: ".example.com"'),
    ('host all all "all" md5', 'host names are not supported by pgdoorman: "all"'),
    ("host all all 10.0.0.256 md5", 'invalid IP address "10.0.0.256"'),
    ("host all all 10.0.0.256/8 md5", 'invalid IP address "10.0.0.256"'),
    ("host all all fe80::1%eth0 md5", 'invalid IP address "fe80::1%eth0"'),
    ("host all all 10.0.0.0/33 md5", 'invalid CIDR mask in address "10.0.0.0/33"'),
    ("host all all ::/129 md5", 'invalid CIDR mask in address "::/129"'),
    ("host all all 10.0.0.0/ md5", 'invalid CIDR mask in address "10.0.0.0/"'),
    ("host all all 10.0.0.0/x md5", 'invalid CIDR mask in address "10.0.0.0/x"'),
    ("host all all 10.0.0.0/255.0.0.0 md5", 'invalid CIDR mask in address "10.0.0.0/255.0.0.0"'),
    ("host all all 10.0.0.0/0008 md5", 'invalid CIDR mask in address "10.0.0.0/0008"'),
    ("host all all 10.0.0.0 255.0.255.0 md5", 'invalid IP mask "255.0.255.0": not a contiguous netmask'),
    ("host all all 10.0.0.0 0.0.0.255 md5", 'invalid IP mask "0.0.0.255": not a contiguous netmask'),
    ("host all all 10.0.0.0 255.0.0 md5", 'invalid IP mask "255.0.0"'),
    ("host all all 10.0.0.0 ffff:: md5", "IP address and mask do not match"),
    ("host all all 10.0.0.0 255.0.0.0,255.0.0.0 md5", "multiple values specified for netmask"),
    ("local samerole all md5", 'database keyword "samerole" is not supported by pgdoorman'),
    ("local samegroup all md5", 'database keyword "samegroup" is not supported by pgdoorman'),
    ("local @dbs.txt all md5", 'file inclusion is not supported by pgdoorman: "@dbs.txt"'),
    ("local all @users md5", 'file inclusion is not supported by pgdoorman: "@users"'),
    ("local all +admins md5", 'group membership ("+role") is not supported by pgdoorman: "+admins"'),
    ("local all a,+admins md5", 'group membership ("+role") is not supported by pgdoorman: "+admins"'),
    ("local all all ident", 'authentication method "ident" is not supported by pgdoorman'),
    ("local all all peer", 'authentication method "peer" is not supported by pgdoorman'),
    ("host all all all gss", 'authentication method "gss" is not supported by pgdoorman'),
    ("host all all all sspi", 'authentication method "sspi" is not supported by pgdoorman'),
    ("host all all all pam", 'authentication method "pam" is not supported by pgdoorman'),
    ("host all all all ldap", 'authentication method "ldap" is not supported by pgdoorman'),
    ("host all all all radius", 'authentication method "radius" is not supported by pgdoorman'),
    ("host all all all bsd", 'authentication method "bsd" is not supported by pgdoorman'),
    ("host all all all MD5", 'invalid authentication method "MD5"'),
    ("host all all all scram", 'invalid authentication method "scram"'),
    ("host all all all md5,trust", "multiple values specified for authentication type"),
    ("local all all cert", "cert authentication is only supported on hostssl connections"),
    ("host all all all cert", "cert authentication is only supported on hostssl connections"),
    ("hostnossl all all all cert", "cert authentication is only supported on hostssl connections"),
    ("hostssl all all all md5 verify-full", 'authentication option not in name=value format: "verify-full"'),
    ("hostssl all all all md5 map=corp", 'authentication option "map" is not supported by pgdoorman'),
    ("hostssl all all all md5 foo=bar", 'unrecognized authentication option name: "foo"'),
    ("hostssl all all all md5 =x", 'unrecognized authentication option name: ""'),
    ("host all all all md5 clientcert=verify-full", 'clientcert can only be configured for "hostssl" rows'),
    ("local all all md5 clientcert=verify-ca", 'clientcert can only be configured for "hostssl" rows'),
    ("hostssl all all all md5 clientcert=1", 'invalid value for clientcert: "1"'),
    ("hostssl all all all md5 clientcert=", 'invalid value for clientcert: ""'),
    ("hostssl all all all cert clientcert=verify-ca",
     'clientcert only accepts "verify-full" when using "cert" authentication'),
    ('local "unterminated all md5', "unterminated quoted string"),
])
def test_errors(record: str, message: str) -> None:
    err = error(f"# comment\n\nlocal all all trust\n{record}\nlocal all all md5\n", "/etc/pg_hba.conf")
    assert (err.path, err.line, err.message) == ("/etc/pg_hba.conf", 4, message)
    assert str(err) == f"/etc/pg_hba.conf:4: {message}"
    assert isinstance(err, ValueError)


def test_error_line_of_continued_record_is_its_first_line() -> None:
    err = error("local all all trust\nhost all \\\nall \\\n10.0.0.0/8 ident\n")
    assert (err.line, err.message) == (2, 'authentication method "ident" is not supported by pgdoorman')


def test_default_path() -> None:
    assert str(error("bogus")) == '<hba>:1: invalid connection type "bogus"'
