"""Stored credentials: what the configuration holds for a user, classified once at load time."""

import base64
import binascii
import re
from dataclasses import dataclass, field

from pgdoorman.auth.md5 import md5_hash

SCRAM_PREFIX = "SCRAM-SHA-256$"
JWT_PREFIX = "jwt-pkey-fpath:"  # PgDoorman's: the client's password is a JWT signed for this key
SCRAM_KEY_LEN = 32  # SHA-256 digest size
MAX_ITERATIONS = 2**31 - 1  # PostgreSQL keeps the count in an int

# PostgreSQL only recognises lowercase hex here; we also take uppercase (and store it lowercased)
# because a 35-character "md5<hex>" plaintext password is implausible, a pasted hash is not.
_MD5_RE = re.compile(r"md5[0-9a-fA-F]{32}")


class AuthFailed(Exception):
    """Authentication failed: malformed message or wrong proof. The text is for logs only;
    clients get a generic "password authentication failed" error."""


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it in pg_authid.rolpassword."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __str__(self) -> str:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode("ascii")

        return (f"{SCRAM_PREFIX}{self.iterations}:{b64(self.salt)}"
                f"${b64(self.stored_key)}:{b64(self.server_key)}")

    @classmethod
    def parse(cls, text: str) -> "ScramVerifier":
        """Parse "SCRAM-SHA-256$<iter>:<b64salt>$<b64storedkey>:<b64serverkey>"; ValueError if malformed."""
        if not text.startswith(SCRAM_PREFIX):
            raise ValueError("SCRAM verifier must start with 'SCRAM-SHA-256$'")
        shape = "SCRAM verifier must look like SCRAM-SHA-256$<iter>:<salt>$<storedkey>:<serverkey>"
        parts = text[len(SCRAM_PREFIX):].split("$")
        if len(parts) != 2:
            raise ValueError(shape)
        iter_salt, keys = (p.split(":") for p in parts)
        if len(iter_salt) != 2 or len(keys) != 2:
            raise ValueError(shape)
        iter_text, salt_text = iter_salt
        # isdecimal() alone would accept non-ASCII digits such as "٤"; int() would too.
        if not (iter_text.isascii() and iter_text.isdecimal() and len(iter_text) <= 10):
            raise ValueError(f"SCRAM verifier iteration count is not a number: {iter_text!r}")
        iterations = int(iter_text)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"SCRAM verifier iteration count out of range: {iterations}")
        salt = _b64decode(salt_text, "salt")
        if not salt:
            raise ValueError("SCRAM verifier salt is empty")
        stored_key = _b64decode(keys[0], "stored key")
        server_key = _b64decode(keys[1], "server key")
        if len(stored_key) != SCRAM_KEY_LEN or len(server_key) != SCRAM_KEY_LEN:
            raise ValueError(f"SCRAM verifier keys must be {SCRAM_KEY_LEN} bytes")
        return cls(iterations, salt, stored_key, server_key)


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(f"SCRAM verifier {what} is not valid base64") from exc


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """A user's configured password, classified. repr hides the secret parts (it ends up in logs)."""

    kind: str  # "trust" (empty password), "plain", "md5", "scram", "jwt"
    plain: str | None = field(default=None, repr=False)
    md5: str | None = field(default=None, repr=False)  # also derived from plain, so md5 auth works
    scram: ScramVerifier | None = None
    key_path: str | None = None  # "jwt": the public key the client's token must be signed for


def parse_secret(password: str, username: str) -> StoredSecret:
    """Classify a configured password the way PostgreSQL classifies rolpassword.

    Unlike PostgreSQL (which silently treats a malformed verifier as a plaintext password), a
    string starting with "SCRAM-SHA-256$" that does not parse raises ValueError: it is almost
    certainly a configuration mistake, and logging in with the verifier text would be absurd.
    """
    if password == "":
        return StoredSecret("trust")
    if _MD5_RE.fullmatch(password):
        return StoredSecret("md5", md5=password.lower())
    if password.startswith(SCRAM_PREFIX):
        return StoredSecret("scram", scram=ScramVerifier.parse(password))
    if password.startswith(JWT_PREFIX) and len(password) > len(JWT_PREFIX):
        return StoredSecret("jwt", key_path=password[len(JWT_PREFIX):])
    return StoredSecret("plain", plain=password, md5=md5_hash(password, username))
