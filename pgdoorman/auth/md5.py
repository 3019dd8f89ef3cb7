"""MD5 password authentication (PostgreSQL's AuthenticationMD5Password).

This is the lowest module of the package: it imports nothing else from it, so that
secrets.py and scram.py can both build on it without an import cycle.
"""

import hashlib
import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgdoorman.auth.secrets import StoredSecret


def password_bytes(text: str) -> bytes:
    """UTF-8 bytes of a password or user name, as PostgreSQL hashes them.

    A caller holding non-UTF-8 bytes (a client with a LATIN1 password) can decode them with
    errors="surrogateescape"; this restores the original bytes. Any other lone surrogate is
    encoded as-is rather than raising, so no str can make authentication crash.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def md5_hash(password: str, username: str) -> str:
    """The stored form: "md5" + hex(md5(password + username)); the user name is the salt."""
    return "md5" + hashlib.md5(password_bytes(password) + password_bytes(username)).hexdigest()


def md5_salted_response(md5_hashed: str, salt: bytes) -> str:
    """What a client sends for AuthenticationMD5Password: "md5" + hex(md5(hashed[3:] + salt))."""
    return "md5" + hashlib.md5(md5_hashed[3:].encode("ascii") + salt).hexdigest()


def md5_verify(secret: "StoredSecret", salt: bytes, response: str) -> bool:
    """Check a client's PasswordMessage against a stored secret (kind "plain" or "md5").

    A SCRAM verifier cannot answer an MD5 challenge (it lacks md5(password + user)), so
    that kind and "trust" simply return False.
    """
    if secret.md5 is None:
        return False
    expected = md5_salted_response(secret.md5, salt).encode("ascii")
    # Compare as bytes: hmac.compare_digest refuses non-ASCII str, and the response is untrusted.
    return hmac.compare_digest(expected, password_bytes(response))
