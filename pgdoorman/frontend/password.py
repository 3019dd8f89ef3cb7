"""The password part of a client's login: md5 or SCRAM-SHA-256 against a stored secret, as
framed messages. Shared by pool clients (client.py) and console sessions (admin/console.py)."""

from __future__ import annotations

import os

from pgdoorman.auth import UNKNOWN, AuthFailed, ScramServer, StoredSecret, md5_verify, mock_scram, plain_salt
from pgdoorman.protocol import codes
from pgdoorman.protocol import messages as m

OK = m.authentication(codes.AUTH_OK)


class PasswordExchange:
    """start() says what to send first (None: trust, logged in); each PasswordMessage body goes
    to step(), which returns what to send and whether the login is done. AuthFailed on a wrong
    password; m.ProtocolError on a message that does not fit the exchange."""

    __slots__ = ("_kind", "_salt", "_scram", "_secret", "_method", "_key", "_user")

    def __init__(self, secret: StoredSecret, method: str, key: bytes, user: str) -> None:
        """method: what to ask for ("" = what the secret needs); UNKNOWN never authenticates."""
        self._secret = secret
        self._method = method or secret.kind
        self._key = key
        self._user = user
        self._kind = ""
        self._salt = b""
        self._scram: ScramServer | None = None

    def start(self) -> bytes | None:
        method = self._method
        if method == "trust":
            return None
        if method == "md5":
            self._kind = "md5"
            self._salt = os.urandom(4)
            return m.authentication(codes.AUTH_MD5, self._salt)
        # SCRAM for verifiers and for plain-text secrets
        self._kind = "scram"
        secret, key, user = self._secret, self._key, self._user
        if secret is UNKNOWN:
            self._scram = mock_scram(key, user)
        elif secret.plain is not None:  # a stable salt, as a stored verifier has
            self._scram = ScramServer(secret, salt=plain_salt(key, user, secret.plain))
        else:
            self._scram = ScramServer(secret)
        return m.authentication(codes.AUTH_SASL, b"SCRAM-SHA-256\0\0")

    def step(self, body: bytes) -> tuple[bytes, bool]:
        if self._kind == "md5":
            response, _ = m.read_cstr(body, 0)
            if not md5_verify(self._secret, self._salt, response.decode("ascii", "replace")):
                raise AuthFailed("md5 password mismatch")
            return b"", True
        if self._kind == "scram" and self._scram is not None:
            # SASLInitialResponse: mechanism, length, client-first-message
            mechanism, pos = m.read_cstr(body, 0)
            if mechanism != b"SCRAM-SHA-256":
                raise m.ProtocolError("unsupported SASL mechanism")
            reply = self._scram.handle_client_first(body[pos + 4 :])
            self._kind = "scram-final"
            return m.authentication(codes.AUTH_SASL_CONTINUE, reply), False
        if self._kind == "scram-final" and self._scram is not None:
            final = self._scram.handle_client_final(body)
            return m.authentication(codes.AUTH_SASL_FINAL, final), True
        raise m.ProtocolError("unexpected password message")


__all__ = ["OK", "AuthFailed", "PasswordExchange"]
