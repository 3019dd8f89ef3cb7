"""The HTTP endpoint of [prometheus]: /metrics (every worker's snapshot, merged) and /health
(200 while serving, 503 when paused or shutting down), for scrapers and load balancers.

A tiny HTTP/1.0 responder on the event loop: a scrape fans out to the workers over their
channels like a console SHOW, so it never blocks the loop and never touches the hot path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from pgdoorman.config import Config
from pgdoorman.metrics.prometheus import exposition

log = logging.getLogger("pgdoorman.metrics")
Ask = Callable[[dict[str, Any]], Awaitable[list[Any]]]
READ_TIMEOUT = 10.0
MAX_REQUEST = 8192
RETRY_BIND = 0.1


class MetricsServer:
    def __init__(self, ask: Ask, config: Callable[[], Config], stopping: Callable[[], bool]) -> None:
        self._ask = ask
        self._config = config
        self._stopping = stopping
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, wait: bool = False) -> None:
        """wait: the port is still the old pooler's of an upgrade, which frees it once this one
        serves: try again until it is free."""
        while True:
            try:
                self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
                break
            except OSError as exc:
                if not (wait and exc.errno == errno.EADDRINUSE):
                    raise
                await asyncio.sleep(RETRY_BIND)
        log.info("metrics on http://%s:%d/metrics (and /health)", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _snapshots(self) -> list[dict[str, Any]]:
        return [
            s for s in await self._ask({"op": "snapshot", "what": []}) if isinstance(s, dict) and "pools" in s
        ]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            request = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            path = request[1].split("?", 1)[0] if len(request) >= 2 else ""
            method = request[0] if request else ""
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif path == "/metrics":
                status, kind = "200 OK", CONTENT_TYPE_LATEST
                body = exposition(await self._snapshots(), self._config())
            elif path in ("/health", "/healthz"):
                snapshots = [] if self._stopping() else await self._snapshots()
                down = (
                    self._stopping()
                    or not snapshots
                    or any(s["paused"] or s["shutting_down"] for s in snapshots)
                )
                status = "503 Service Unavailable" if down else "200 OK"
                body, kind = (b"unavailable\n" if down else b"ok\n"), "text/plain"
            else:
                status, body, kind = "404 Not Found", b"try /metrics or /health\n", "text/plain"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
