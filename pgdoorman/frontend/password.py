"""The password part of a client's login: md5, SCRAM-SHA-256(-PLUS), a cleartext password (hba's
`password` method) or a JWT sent as one, against a stored secret, as framed messages. Shared by pool
clients (client.py) and console sessions (admin/console.py)."""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from pgdoorman.auth import (
    UNKNOWN,
    AuthFailed,
    ScramServer,
    ScramVerifier,
    StoredSecret,
    md5_hash,
    md5_verify,
    mock_scram,
    plain_salt,
    scram_verifier,
    server_mechanisms,
)
from pgdoorman.auth.md5 import password_bytes
from pgdoorman.auth.scram import client_server_keys
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

OK = m.authentication(codes.AUTH_OK)
CLEARTEXT_METHODS = ("password", "jwt")


class PasswordExchange:
    """start() says what to send first (None: trust, logged in); each PasswordMessage body goes
    to step(), which returns what to send and whether the login is done. AuthFailed on a wrong
    password; m.ProtocolError on a message that does not fit the exchange.

    method: "" (what the secret needs), "trust", "md5", "scram", "password" (cleartext, checked
    against any kind of secret) or "jwt" (cleartext, checked by verify_jwt). cbind: our certificate's
    tls-server-end-point when the client is on TLS (SCRAM-SHA-256-PLUS is then offered first)."""

    __slots__ = ("_kind", "_salt", "_scram", "_secret", "_method", "_key", "_user", "_cbind", "_jwt",
                 "_mechanisms", "_keys")

    def __init__(self, secret: StoredSecret, method: str, key: bytes, user: str, *,
                 cbind: bytes | None = None, jwt: Callable[[str], None] | None = None) -> None:
        self._secret = secret
        self._method = method or ("jwt" if secret.kind == "jwt" else secret.kind)
        self._key = key
        self._user = user
        self._cbind = cbind
        self._jwt = jwt
        self._kind = ""
        self._salt = b""
        self._scram: ScramServer | None = None
        self._mechanisms: list[str] = []
        self._keys: tuple[bytes, bytes] | None = None  # from a clear-text password (see scram_keys)

    @property
    def scram_keys(self) -> tuple[bytes, bytes] | None:
        """(ClientKey, ServerKey) once done, what SCRAM pass-through logs in with: recovered from
        the client's SCRAM proof, or derived from its clear-text password; None after trust, md5..."""
        if self._keys is not None:
            return self._keys
        if self._scram is not None and self._secret.kind == "scram":
            try:
                return self._scram.client_key, self._scram.server_key
            except RuntimeError:
                return None
        return None

    def start(self) -> bytes | None:
        method = self._method
        if method == "trust":
            return None
        if method == "md5":
            self._kind = "md5"
            self._salt = os.urandom(4)
            return m.authentication(codes.AUTH_MD5, self._salt)
        if method in CLEARTEXT_METHODS:
            self._kind = method
            return m.authentication(codes.AUTH_CLEARTEXT)
        # SCRAM for verifiers and for plain-text secrets
        self._kind = "scram"
        secret, key, user, cbind = self._secret, self._key, self._user, self._cbind
        if secret is UNKNOWN or secret.kind not in ("scram", "plain"):
            self._scram = mock_scram(key, user, cbind)
        elif secret.plain is not None:  # a stable salt, as a stored verifier has
            self._scram = ScramServer(secret, salt=plain_salt(key, user, secret.plain), cbind_data=cbind)
        else:
            self._scram = ScramServer(secret, cbind_data=cbind)
        self._mechanisms = server_mechanisms(cbind is not None)
        names = b"".join(name.encode() + b"\0" for name in self._mechanisms)
        return m.authentication(codes.AUTH_SASL, names + b"\0")

    def step(self, body: bytes) -> tuple[bytes, bool]:
        if self._kind == "md5":
            response, _ = m.read_cstr(body, 0)
            if not md5_verify(self._secret, self._salt, response.decode("ascii", "replace")):
                raise AuthFailed("md5 password mismatch")
            return b"", True
        if self._kind in CLEARTEXT_METHODS:
            given, _ = m.read_cstr(body, 0)
            text = given.decode("utf-8", "surrogateescape")
            if self._kind == "jwt":
                if self._jwt is None or self._secret.kind != "jwt":
                    raise AuthFailed("JWT login for a user whose password is not a jwt-pkey-fpath key")
                self._jwt(text)
            elif not cleartext_matches(self._secret, text, self._user):
                raise AuthFailed("password mismatch")
            elif self._secret.kind == "scram" and self._secret.scram is not None:
                self._keys = client_server_keys(text, self._secret.scram)
            return b"", True
        if self._kind == "scram" and self._scram is not None:
            # SASLInitialResponse: mechanism, length, client-first-message
            mechanism, pos = m.read_cstr(body, 0)
            name = mechanism.decode("ascii", "replace")
            if name not in self._mechanisms:
                raise m.ProtocolError("client selected an invalid SASL authentication mechanism")
            self._scram.select_mechanism(name)
            reply = self._scram.handle_client_first(body[pos + 4 :])
            self._kind = "scram-final"
            return m.authentication(codes.AUTH_SASL_CONTINUE, reply), False
        if self._kind == "scram-final" and self._scram is not None:
            final = self._scram.handle_client_final(body)
            self._kind = "done"
            return m.authentication(codes.AUTH_SASL_FINAL, final), True
        raise m.ProtocolError("unexpected password message")


def cleartext_matches(secret: StoredSecret, password: str, user: str) -> bool:
    """A cleartext password against any stored kind, as PostgreSQL's `password` method checks it."""
    given = password_bytes(password)
    if secret.kind == "plain" and secret.plain is not None:
        return hmac.compare_digest(given, password_bytes(secret.plain))
    if secret.kind == "md5" and secret.md5 is not None:
        return hmac.compare_digest(md5_hash(password, user).encode(), secret.md5.encode())
    if secret.kind == "scram" and secret.scram is not None:
        stored = secret.scram  # scram_verifier hashes the SASLprep'd form, as the stored one was
        derived = ScramVerifier.parse(scram_verifier(password, stored.salt, stored.iterations))
        return hmac.compare_digest(derived.stored_key, stored.stored_key)
    return False


__all__ = ["OK", "AuthFailed", "PasswordExchange", "cleartext_matches"]
