"""Mock authentication: a user or database the pooler does not know gets the exchange a known user
would get, then "password authentication failed", so configured names cannot be enumerated.

PostgreSQL does the same (auth.c: a SCRAM exchange with a salt derived from the user name and a
nonce stored by initdb). Here the salts come from a key derived from the configured secrets: the
same in every worker and after a restart, so repeated tries see one salt per name, as they do for a
known user; nobody who does not know those secrets can compute it. Plain-text passwords get their
SCRAM salt the same way (a random salt per process would differ between workers and restarts,
which would tell them from the mock).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pgdoorman.auth.md5 import password_bytes
from pgdoorman.auth.scram import SALT_LEN, ScramServer
from pgdoorman.auth.secrets import StoredSecret

# The secret of a name the pooler does not know: md5_verify fails and ScramServer mocks for it.
UNKNOWN = StoredSecret("unknown")


def auth_key(secrets: Iterable[str]) -> bytes:
    """The key the mock and plain-password salts derive from: a hash of every configured secret."""
    digest = hashlib.sha256(b"pgdoorman mock authentication\0")
    for secret in sorted(set(secrets)):
        digest.update(password_bytes(secret) + b"\0")
    return digest.digest()


def mock_salt(key: bytes, user: str) -> bytes:
    return hmac.digest(key, b"mock\0" + password_bytes(user), "sha256")[:SALT_LEN]


def plain_salt(key: bytes, user: str, password: str) -> bytes:
    """A stable SCRAM salt for a plain-text password (distinct per user and password)."""
    return hmac.digest(key, b"plain\0" + password_bytes(user) + b"\0" + password_bytes(password),
                       "sha256")[:SALT_LEN]


def mock_method(kinds: Iterable[str]) -> str:
    """What to ask a name the pooler does not know for: what the known users of that database (or
    of all of them) are mostly asked for. md5 secrets get md5; JWT keys get a cleartext password
    ("jwt"); plain-text and SCRAM secrets get SCRAM, which is also the default (PostgreSQL's
    password_encryption)."""
    counts = {"md5": 0, "jwt": 0, "scram": 0}
    for kind in kinds:
        if kind in ("md5", "jwt"):
            counts[kind] += 1
        elif kind != "trust":
            counts["scram"] += 1
    return max(("scram", "md5", "jwt"), key=lambda method: counts[method])  # ties: scram


def mock_scram(key: bytes, user: str, cbind_data: bytes | None = None) -> ScramServer:
    """A SCRAM exchange that always fails at the proof; cbind_data as a known user's would have, so
    SCRAM-SHA-256-PLUS gets as far as the proof too."""
    return ScramServer(UNKNOWN, mock_salt=mock_salt(key, user), cbind_data=cbind_data)
