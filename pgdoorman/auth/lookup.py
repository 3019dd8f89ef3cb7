"""auth_query's pure parts: the lookup's SQL, the secret in its rows, and the cache of answers.

The lookup itself runs over a server pool (frontend/authquery.py); nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pgdoorman.auth.secrets import JWT_PREFIX, StoredSecret, parse_secret

FOUND, UNKNOWN_USER, FAILED = "found", "unknown", "failed"
# A failed login forgets the user's cached secret (its password may have changed on the server),
# but at most this often per user: a stream of wrong passwords is not a stream of lookups.
FORGET_INTERVAL = 1.0


def quote_literal(value: str) -> str:
    """value as an SQL string literal, as PostgreSQL's quote_literal() writes it: quotes doubled,
    and with backslashes doubled in an E'' string (right whatever standard_conforming_strings is)."""
    quoted = value.replace("'", "''")
    if "\\" in value:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


def lookup_sql(query: str, user: str) -> str:
    """The query with every $1 replaced by the user name as a literal. The lookup runs in the simple
    protocol; the name comes from an unauthenticated client, so it is quoted, never spliced."""
    if "\0" in user:
        raise ValueError("user name holds a NUL byte")
    return query.replace("$1", quote_literal(user))


def secret_of(rows: list[list[str | None]], user: str) -> StoredSecret | None:
    """The secret in the lookup's rows: one row of (name, password) as PgBouncer's query returns,
    or of the password alone. None: no such user, or one that cannot log in (NULL or empty
    password: never trust). ValueError: an answer that cannot be right (several rows, a malformed
    verifier, a JWT key path from the database)."""
    if not rows:
        return None
    if len(rows) > 1:
        raise ValueError(f"auth_query returned {len(rows)} rows for one user")
    row = rows[0]
    if not row or len(row) > 2:
        raise ValueError(f"auth_query returned {len(row)} columns (expected the password, or the "
                         "user name and the password)")
    password = row[-1]
    if not password:
        return None  # no password (NULL), or expired under the default query
    if password.startswith(JWT_PREFIX):
        raise ValueError("auth_query returned a JWT key path: only md5, SCRAM or plain-text secrets")
    return parse_secret(password, user)


@dataclass(slots=True)
class Answer:
    kind: str  # FOUND, UNKNOWN_USER or FAILED
    secret: StoredSecret | None = None
    text: str = field(default="", repr=False)  # the secret as the server gave it (a UserConfig password)
    why: str = ""  # FAILED: for the log


@dataclass(slots=True)
class _Entry:
    answer: Answer
    until: float
    looked_up: float


class LookupCache:
    """Answers by user name with their TTL, and the lookups in flight: a second login of a user
    whose lookup is running waits for the same answer (one query, however many logins)."""

    def __init__(self, ttl: float, negative_ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._waiting: dict[str, list[Callable[[Answer], None]]] = {}
        self.lookups = 0  # queries run (tests and SHOW read it)
        self.hits = 0

    def get(self, user: str) -> Answer | None:
        entry = self._entries.get(user)
        if entry is None:
            return None
        if self._clock() >= entry.until:
            del self._entries[user]
            return None
        self.hits += 1
        return entry.answer

    def wait(self, user: str, done: Callable[[Answer], None]) -> bool:
        """Queue done for user's answer; True if a lookup must start (none is running)."""
        waiting = self._waiting.get(user)
        if waiting is not None:
            waiting.append(done)
            return False
        self._waiting[user] = [done]
        self.lookups += 1
        return True

    def answer(self, user: str, answer: Answer) -> None:
        """A lookup's outcome: cached (a failure is not), and told to everyone waiting for it."""
        now = self._clock()
        ttl = self.ttl if answer.kind == FOUND else self.negative_ttl if answer.kind == UNKNOWN_USER else 0.0
        if ttl > 0:
            self._entries[user] = _Entry(answer, now + ttl, now)
        for done in self._waiting.pop(user, ()):
            done(answer)

    def forget(self, user: str) -> None:
        """A login with the cached secret failed: look it up again next time (FORGET_INTERVAL)."""
        entry = self._entries.get(user)
        if entry is not None and self._clock() - entry.looked_up >= FORGET_INTERVAL:
            del self._entries[user]

    def clear(self) -> None:
        self._entries.clear()

    def fail_waiting(self, why: str) -> None:
        for user in list(self._waiting):
            self.answer(user, Answer(FAILED, why=why))

    def __len__(self) -> int:
        return len(self._entries)
