"""A stand-in for a client on a server the pooler uses itself: the login probe of a client's
startup settings (settings.Probe) and a pool's listener connection (notify.Listener). The server
reports to it as to a client (server.ClientLink); what a stand-in does not care about is a no-op."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgdoorman.server import ServerConn


class StandIn:
    def on_ready(self, status: int) -> None:
        pass

    def on_server_lost(self, server: ServerConn, reason: str) -> None:
        pass

    def on_parameter_status(self, name: str, value: str) -> None:
        pass

    def on_statements_discarded(self) -> None:
        pass

    def on_verified(self, failed: bool) -> None:
        pass

    def name_of(self, stmt: object) -> bytes | None:
        return None

    def on_parse_failed(self, name: bytes, stmt: object) -> None:
        pass

    def on_copy_in(self) -> None:
        pass

    def on_stalled(self, copy_in: bool) -> None:
        pass

    def on_query_skipped(self) -> None:
        pass

    def on_unnamed_parses_skipped(self, count: int) -> None:
        pass

    def on_close_skipped(self, stmt: object, name: bytes) -> None:
        pass

    def held_by_server(self, size: int) -> bool:
        return True  # the pooler's own traffic is not a client's to pay for
