"""A TCP proxy between the pooler and PostgreSQL that can cut, freeze and resume the network.

    proxy = Proxy(listen_port, pg.host, pg.port)
    await proxy.start()
    proxy.cut()                     # close every connection at once (as a router reboot would)
    proxy.freeze()                  # stop forwarding without closing; new connections hang too
    proxy.freeze(existing=True)     # only the connections open now: a black hole for them, while
                                    # new connections work (what tcp_user_timeout is for)
    proxy.resume()                  # forward again what was held
    await proxy.close()

A frozen connection neither reads nor writes, so its bytes wait in the kernel buffers exactly as
they would behind a dead link: nothing is dropped and nothing is closed. Unlike a dead link, the
proxy's kernel still ACKs what fits in its buffers and answers keepalive probes, so what the pooler
sees is a peer that stops answering on a healthy connection (a hung server process).
"""

from __future__ import annotations

import asyncio
import contextlib


class _Link:
    """One client connection and its upstream connection, pumped both ways through a gate."""

    def __init__(self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.down = (reader, writer)
        self.up_writer: asyncio.StreamWriter | None = None
        self.gate = asyncio.Event()  # set = forwarding
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        try:
            await self.proxy.new_gate.wait()  # a full freeze holds new connections before the connect
            up_reader, self.up_writer = await asyncio.open_connection(self.proxy.target_host,
                                                                      self.proxy.target_port)
        except (OSError, asyncio.CancelledError):
            self.abort()
            return
        self.gate.set()
        if self.proxy.frozen_all:
            self.gate.clear()
        self.tasks = [asyncio.create_task(self._pump(self.down[0], self.up_writer)),
                      asyncio.create_task(self._pump(up_reader, self.down[1]))]
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self.gate.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self.gate.wait()  # frozen while reading: hold these bytes too
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        for w in (self.down[1], self.up_writer):
            if w is not None and not w.is_closing():
                w.transport.abort()
        for t in self.tasks:
            t.cancel()
        self.proxy.links.discard(self)


class Proxy:
    def __init__(self, listen_port: int, target_host: str, target_port: int,
                 listen_host: str = "127.0.0.1") -> None:
        self.listen_host, self.listen_port = listen_host, listen_port
        self.target_host, self.target_port = target_host, target_port
        self.links: set[_Link] = set()
        self.new_gate = asyncio.Event()
        self.new_gate.set()
        self.frozen_all = False
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port,
                                                  reuse_address=True)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(self, reader, writer)
        self.links.add(link)
        await link.run()

    def cut(self) -> int:
        """Close every open connection (both sides); returns how many."""
        links = list(self.links)
        for link in links:
            link.abort()
        return len(links)

    def freeze(self, existing: bool = False) -> int:
        """Stop forwarding on every open connection; unless `existing`, new ones wait as well."""
        for link in self.links:
            link.gate.clear()
        if not existing:
            self.frozen_all = True
            self.new_gate.clear()
        return len(self.links)

    def resume(self) -> None:
        self.frozen_all = False
        self.new_gate.set()
        for link in self.links:
            link.gate.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.resume()
        self.cut()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
