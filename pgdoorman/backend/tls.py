"""TLS towards servers: libpq's sslmode semantics over TCP (unix sockets never use TLS).

disable: clear text. prefer: SSLRequest; TLS if the server answers `S`, clear text on `N`.
require: TLS or no connection; with server_tls_ca_file set the certificate is checked as verify-ca
does (libpq too verifies when a root certificate is there). verify-ca: the certificate must chain to
server_tls_ca_file. verify-full: and name the host.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgdoorman.config.tlsfiles import parse_protocols
from pgdoorman.tlswrap import ALPN

if TYPE_CHECKING:
    from pgdoorman.config import GeneralConfig


@dataclass(frozen=True, slots=True)
class ServerTls:
    mode: str = "disable"
    context: ssl.SSLContext | None = field(default=None, repr=False)
    channel_binding: str = "prefer"  # disable / prefer / require (SCRAM-SHA-256-PLUS)

    @property
    def required(self) -> bool:
        return self.mode not in ("disable", "prefer")

    def hostname(self, host: str) -> str | None:
        """What to send as SNI and check the certificate against (verify-full); an IP address is
        checked against the certificate's IP entries but never sent as SNI (RFC 6066)."""
        return host if self.context is not None and self.context.check_hostname else (
            None if _is_ip(host) else host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_tls(general: GeneralConfig) -> ServerTls:
    """Build from a loaded config (its files were checked by the loader; ssl errors propagate)."""
    mode = general.server_tls_mode
    if mode == "disable":
        return ServerTls(mode, None, general.server_channel_binding)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version, context.maximum_version = parse_protocols(general.server_tls_protocols)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols([ALPN])
    verify = mode in ("verify-ca", "verify-full") or (mode == "require" and bool(general.server_tls_ca_file))
    if general.server_tls_ca_file:
        context.load_verify_locations(cafile=general.server_tls_ca_file)
    context.check_hostname = mode == "verify-full"
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if general.server_tls_certificate:
        context.load_cert_chain(general.server_tls_certificate, general.server_tls_key)
    return ServerTls(mode, context, general.server_channel_binding)
