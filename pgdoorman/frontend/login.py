"""Who may log in, and how: hba rules (auth/hba.py), tls_mode, client certificates and JWT, decided
once per login from what the startup packet and the connection say. The password exchange itself
is frontend/password.py; this module only picks its method, or refuses with PostgreSQL's words."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgdoorman.auth import AuthFailed, StoredSecret
from pgdoorman.frontend.tls import peer_common_name
from pgdoorman.protocol import codes

if TYPE_CHECKING:
    import ssl

    from pgdoorman.auth.jwt import JwtKeyCache
    from pgdoorman.config import Config

log = logging.getLogger("pgdoorman.login")
# hba methods -> PasswordExchange methods ("cert" is settled here, before any exchange)
_EXCHANGE = {"trust": "trust", "password": "password", "md5": "md5", "scram-sha-256": "scram", "jwt": "jwt"}


@dataclass(frozen=True, slots=True)
class Decision:
    method: str = ""  # for PasswordExchange: "" = what the stored secret needs
    refusal: tuple[str, str] | None = None  # FATAL (SQLSTATE, message) instead of a login
    why: str = ""  # the refusal's reason for the log, when the message hides it


@dataclass(frozen=True, slots=True)
class Peer:
    """What the connection says about the client."""

    local: bool  # came over the unix socket
    address: str | None  # its IP (None on the unix socket)
    tls: ssl.SSLObject | None

    def where(self) -> str:
        return "[local]" if self.local else str(self.address)


def _no_entry(peer: Peer, user: str, database: str) -> tuple[str, str]:
    encryption = "SSL encryption" if peer.tls is not None else "no encryption"
    return codes.INVALID_AUTHORIZATION, (
        f'no pg_hba.conf entry for host "{peer.where()}", user "{user}", database "{database}", {encryption}')


_NO_CERTIFICATE = (codes.INVALID_AUTHORIZATION, "connection requires a valid client certificate")


def _cert_failed(user: str) -> tuple[str, str]:
    return codes.INVALID_AUTHORIZATION, f'certificate authentication failed for user "{user}"'


def admitted(config: Config, peer: Peer, database: str, user: str) -> Decision:
    """The connection-level checks: tls_mode, verify-full's CN and the hba rule that matches (its
    method, or the refusal). The console goes through this too; its method is its own."""
    from pgdoorman.auth.hba import reject_message

    general = config.general
    if not peer.local and peer.tls is None and general.tls_mode in ("require", "verify-ca", "verify-full"):
        return Decision(refusal=_no_entry(peer, user, database), why="tls_mode requires TLS")
    if peer.tls is not None and general.tls_mode == "verify-full" and peer_common_name(peer.tls) != user:
        return Decision(refusal=_cert_failed(user),
                        why=f"client certificate CN {peer_common_name(peer.tls)!r} is not the user name")
    rules = config.hba_rules
    if rules is None:
        return Decision()
    rule = rules.match(conn_type="local" if peer.local else "host", tls=peer.tls is not None,
                       database=database, user=user, address=peer.address)
    if rule is None:
        return Decision(refusal=_no_entry(peer, user, database), why="no hba rule matches")
    if rule.method == "reject":
        message = reject_message(conn_type="local" if peer.local else "host", tls=peer.tls is not None,
                                 database=database, user=user, address=peer.address)
        return Decision(refusal=(codes.INVALID_AUTHORIZATION, message), why=f"hba line {rule.line} rejects")
    if rule.method == "cert" or rule.options.get("clientcert") == "verify-full":
        cn = peer_common_name(peer.tls) if peer.tls is not None else None
        if cn is None:
            return Decision(refusal=_NO_CERTIFICATE, why=f"hba line {rule.line}: no client certificate")
        if cn != user:
            return Decision(refusal=_cert_failed(user),
                            why=f"hba line {rule.line}: certificate CN {cn!r} is not the user name")
    elif rule.options.get("clientcert") == "verify-ca" and (peer.tls is None or not peer.tls.getpeercert()):
        return Decision(refusal=_NO_CERTIFICATE, why=f"hba line {rule.line}: no client certificate")
    return Decision(method="trust" if rule.method == "cert" else _EXCHANGE[rule.method])


def login_method(config: Config, decision: Decision, secret: StoredSecret, peer: Peer) -> Decision:
    """The exchange for a pool user: hba's method against what the secret can do (PostgreSQL's
    rules: md5 with a SCRAM verifier does SCRAM), and JWT's clear-text rule."""
    method = decision.method
    if method == "md5" and secret.kind == "scram":
        method = "scram"
    if method == "jwt" or (method == "" and secret.kind == "jwt"):
        if peer.tls is None and not peer.local and not config.general.jwt_allow_cleartext:
            return Decision(refusal=(codes.INVALID_AUTHORIZATION,
                                     "JWT authentication requires an encrypted connection (TLS)"),
                            why="JWT over clear text (jwt_allow_cleartext = false)")
        method = "jwt"
    return Decision(method=method)


def jwt_checker(config: Config, keys: JwtKeyCache, secret: StoredSecret, user: str) -> Callable[[str], None]:
    """What checks a token sent as this user's password (AuthFailed when it does not verify)."""
    general = config.general

    def check(token: str) -> None:
        from pgdoorman.auth.jwt import verify_jwt

        if secret.key_path is None:
            raise AuthFailed("user has no JWT key")
        try:
            key = keys.get(secret.key_path)
        except ValueError as exc:  # unreadable or not a public key: refuse (fail closed)
            raise AuthFailed(str(exc)) from None
        verify_jwt(token, key, user=user, claim=general.jwt_claim, leeway=general.jwt_leeway,
                   audience=general.jwt_audience or None)

    return check
