"""TLS towards clients: the context built from [general] tls_* keys, for clients that send an
SSLRequest (answered `S`) or start with a ClientHello (PostgreSQL 17's direct TLS). The switch
itself is tlswrap.start_tls; client.py calls it."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgdoorman.config.tlsfiles import parse_protocols
from pgdoorman.tlswrap import ALPN, end_point_of_file

if TYPE_CHECKING:
    from pgdoorman.config import GeneralConfig

log = logging.getLogger("pgdoorman.tls")
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a ClientHello: a direct-TLS client
VERIFY_MODES = ("verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class ClientTls:
    """What a worker needs to answer SSLRequests: built at start and on every reload, so a renewed
    certificate serves new connections while current ones keep the context they started with."""

    mode: str = "disable"
    context: ssl.SSLContext | None = field(default=None, repr=False)
    # tls-server-end-point of our certificate, for SCRAM-SHA-256-PLUS; None: PLUS is not offered
    cbind: bytes | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.context is not None

    @property
    def required(self) -> bool:
        return self.mode not in ("disable", "allow", "prefer")


def client_tls(general: GeneralConfig) -> ClientTls:
    """The client-side TLS of a loaded config; its files were checked by the loader, so an error
    here means one changed since (ssl.SSLError / OSError propagate: the caller keeps the old one)."""
    if general.tls_mode == "disable":
        return ClientTls()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version, context.maximum_version = parse_protocols(general.tls_protocols)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if general.tls_ciphers:
        context.set_ciphers(general.tls_ciphers)
    context.load_cert_chain(general.tls_certificate, general.tls_private_key)
    context.set_alpn_protocols([ALPN])
    if general.tls_ca_file:
        context.load_verify_locations(cafile=general.tls_ca_file)
        # verify-*: no certificate, no connection. Otherwise one is asked for, and checked if given,
        # for hba's `cert` method.
        context.verify_mode = ssl.CERT_REQUIRED if general.tls_mode in VERIFY_MODES else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return ClientTls(general.tls_mode, context, _end_point(general.tls_certificate))


def _end_point(certificate_file: str) -> bytes | None:
    try:
        return end_point_of_file(certificate_file)
    except ValueError as exc:  # e.g. an Ed25519 certificate: no hash to bind with, as in PostgreSQL
        log.warning("%s: no channel binding (SCRAM-SHA-256-PLUS not offered): %s", certificate_file, exc)
        return None


def peer_common_name(ssl_object: ssl.SSLObject) -> str | None:
    """The CN of a verified client certificate (hba `cert`, tls_mode verify-full), or None."""
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def describe(ssl_object: ssl.SSLObject | None) -> str | None:
    """SHOW CLIENTS' tls column: PgBouncer's "TLSv1.3/TLS_AES_256_GCM_SHA384/ECDH=X25519"-like text."""
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else '?'}"
