"""Switching a live connection to TLS without an await: an SSL protocol goes between the socket's
transport and the pooler's protocol object at once, so no byte read after the switch can reach that
object in clear text. Both sides use it: clients after their SSLRequest or direct TLS
(frontend/tls.py), servers after theirs is answered `S` (backend/tls.py). When the handshake is done
the SSL protocol calls the protocol object's connection_made with the TLS transport."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

try:  # uvloop's SSL protocol is compiled; asyncio's works on any loop (the pure-asyncio fallback)
    from uvloop.loop import SSLProtocol as _UvSSLProtocol  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _UvSSLProtocol = None

ALPN = "postgresql"  # PostgreSQL 17: direct TLS needs it; after an SSLRequest it is optional


def start_tls(app_protocol: asyncio.Protocol, raw: asyncio.BaseTransport, context: ssl.SSLContext, *,
              server_side: bool, failed: Callable[[BaseException], None], timeout: float = 0.0,
              already_read: bytes = b"", server_hostname: str | None = None) -> None:
    """Put TLS between `raw` and `app_protocol` now. already_read: handshake bytes read before we
    knew (direct TLS). `failed` is called if the handshake does not complete."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()
    factory: Any = _UvSSLProtocol
    if factory is None or not type(loop).__module__.startswith("uvloop"):
        from asyncio.sslproto import SSLProtocol as factory
    ssl_protocol = factory(loop, app_protocol, context, waiter, server_side=server_side,
                           server_hostname=server_hostname, call_connection_made=True,
                           ssl_handshake_timeout=timeout or None)

    def done(future: asyncio.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            failed(exc or ConnectionError("TLS handshake cancelled"))

    waiter.add_done_callback(done)
    raw.set_protocol(ssl_protocol)
    ssl_protocol.connection_made(raw)
    if already_read:
        buffer = ssl_protocol.get_buffer(len(already_read))
        buffer[: len(already_read)] = already_read
        ssl_protocol.buffer_updated(len(already_read))


def reason(exc: BaseException) -> str:
    """A handshake failure in a few words (an SSLError's reason, else its text)."""
    if isinstance(exc, ssl.SSLCertVerificationError):  # say why: expired, wrong host, unknown CA
        return f"certificate verify failed: {exc.verify_message}"
    return str(getattr(exc, "reason", None) or exc or type(exc).__name__)


def end_point_of_file(certificate_file: str) -> bytes | None:
    """tls-server-end-point of the first certificate in a PEM file (ours; the rest is its chain);
    None if it has none. ValueError (as tls_server_end_point) when it cannot be bound."""
    from pgdoorman.auth.scram import tls_server_end_point

    with open(certificate_file, "rb") as f:
        pem = f.read().decode("ascii", "replace")
    start = pem.find("-----BEGIN CERTIFICATE-----")
    if start < 0:
        return None
    end = pem.find("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
    return tls_server_end_point(ssl.PEM_cert_to_DER_cert(pem[start:end]))
