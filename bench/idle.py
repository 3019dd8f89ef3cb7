"""Many idle clients, each fully logged in (StartupMessage ... ReadyForQuery), over raw asyncio sockets."""

from __future__ import annotations

import asyncio
import hashlib
import resource
import ssl
import struct
from dataclasses import dataclass, field

PROTOCOL_V3 = 196608
SSL_REQUEST = struct.pack("!II", 8, 80877103)


def client_tls_context() -> ssl.SSLContext:
    """What libpq's sslmode=require does: TLS, no check of the certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE of this process (and so of the children started after) to `wanted`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # not root: as far as allowed
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def startup_message(user: str, database: str) -> bytes:
    body = struct.pack("!I", PROTOCOL_V3)
    for key, value in (("user", user), ("database", database), ("application_name", "bench-idle")):
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def password_message(secret: str) -> bytes:
    payload = secret.encode() + b"\0"
    return b"p" + struct.pack("!I", len(payload) + 4) + payload


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


class LoginError(Exception):
    pass


async def login(host: str, port: int, user: str, database: str, password: str,
                timeout: float, tls: ssl.SSLContext | None = None) -> asyncio.StreamWriter:
    """Connect and authenticate (first SSLRequest and the TLS handshake when `tls` is given); return the
    open writer once ReadyForQuery arrives."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        if tls is not None:
            writer.write(SSL_REQUEST)
            answer = await asyncio.wait_for(reader.readexactly(1), timeout)
            if answer != b"S":
                raise LoginError(f"TLS refused: the answer to SSLRequest was {answer!r}")
            await asyncio.wait_for(writer.start_tls(tls), timeout)
        writer.write(startup_message(user, database))
        while True:
            header = await asyncio.wait_for(reader.readexactly(5), timeout)
            kind, length = header[:1], struct.unpack("!I", header[1:])[0]
            body = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            if kind == b"Z":
                return writer
            if kind == b"E":
                raise LoginError(body.replace(b"\0", b" ").decode(errors="replace").strip())
            if kind == b"R":
                code = struct.unpack("!I", body[:4])[0]
                if code == 3:
                    writer.write(password_message(password))
                elif code == 5:
                    writer.write(password_message(md5_password(user, password, body[4:8])))
                elif code != 0:
                    raise LoginError(f"unsupported authentication request {code}")
    except BaseException:
        writer.close()
        raise


@dataclass
class IdleClients:
    """Logged-in clients held open until close()."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    async def open(self, host: str, port: int, user: str, database: str, count: int,
                   batch: int = 250, password: str = "", timeout: float = 30.0, tls: bool = False) -> None:
        context = client_tls_context() if tls else None
        while len(self.writers) < count:
            n = min(batch, count - len(self.writers))
            results = await asyncio.gather(
                *(login(host, port, user, database, password, timeout, context) for _ in range(n)),
                return_exceptions=True)
            failed = 0
            for r in results:
                if isinstance(r, asyncio.StreamWriter):
                    self.writers.append(r)
                else:
                    failed += 1
                    key = f"{type(r).__name__}: {r}"[:200]
                    self.errors[key] = self.errors.get(key, 0) + 1
            if failed == n:
                return  # the pooler takes no more: report what we have

    async def close(self) -> None:
        for w in self.writers:
            try:
                w.write(b"X\0\0\0\4")
                w.close()
            except (OSError, RuntimeError):
                pass
        for w in self.writers:
            try:
                await w.wait_closed()
            except (OSError, RuntimeError):
                pass
        self.writers.clear()
