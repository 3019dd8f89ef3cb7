"""The server's protocol state machine: what a server connection owes, and whether it may be lent.

docs/protocol.md describes the states and transitions; this module is the only place that changes
them. Everything here is bookkeeping over request kinds (scan.py's QUERY, SYNC, ...): no I/O, no
asyncio. The frame scanners do the frequent transitions inline (a reply pops the request it
answers); they stop at everything else, which lands here.

`pending` holds one kind per request still owed a reply, oldest first, counted when the request's
header is seen (a 300 KB Query is owed from its first byte). `refs` holds one entry per kind that
carries a statement (scan.py: PARSE_NAMED, HIDDEN_PARSE, BIND_NAMED), in the same order.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pgdoorman.protocol.scan import (
    BIND_NAMED,
    COPY_END,
    DESCRIBE_NAMED,
    HIDDEN_DESCRIBE,
    HIDDEN_EXECUTE,
    HIDDEN_PARSE,
    HIDDEN_QUERY,
    HIDDEN_ROWS,
    PARSE,
    PARSE_NAMED,
    QUERY,
    SYNC,
    SYNTH_CLOSE,
    SYNTH_QUERY,
)

STATUS_IDLE = 73  # 'I'
HAS_REF = (PARSE_NAMED, HIDDEN_PARSE, BIND_NAMED, DESCRIBE_NAMED, HIDDEN_DESCRIBE)
_READY_KINDS = (QUERY, SYNC, HIDDEN_QUERY, HIDDEN_ROWS)  # requests answered by ReadyForQuery


class ServerState:
    """Mixed into ServerConn: the protocol state of one server connection."""

    __slots__ = ("copy_in", "doubt", "client_names", "pending", "raised", "refs", "skipping", "status",
                 "synth_replies", "synth_closes", "unnamed_owner", "unsynced")

    def init_state(self) -> None:
        self.pending = bytearray()
        self.refs: deque[Any] = deque()
        self.status = STATUS_IDLE  # of the last ReadyForQuery
        # An extended-protocol message went out after the last Sync: the backend is in an implicit
        # transaction (or, after an error, skipping input until Sync) whatever `pending` says.
        self.unsynced = False
        # PostgreSQL is in COPY FROM STDIN and the client has not yet sent CopyDone/CopyFail: Syncs
        # the client sends now are ignored by the server, so they are owed nothing.
        self.copy_in = False
        # An extended-protocol request failed and no Sync has been sent since: PostgreSQL skips
        # every message but Sync, so none of them is owed a reply.
        self.skipping = False
        # The replies did not match the requests: never lend this server again.
        self.doubt = ""
        # The client whose Parse of the unnamed statement is the one on this server (or None).
        self.unnamed_owner: object | None = None
        # The replies of the pooler's own that SYNTH_QUERY entries stand for, in order.
        self.synth_replies: deque[bytes] = deque()
        # What each SYNTH_CLOSE in pending closed: (statement, the client's name). Skipped after an
        # error, the Close never happened, and the client keeps the statement, as PostgreSQL does.
        self.synth_closes: deque[tuple[Any, bytes]] = deque()
        # ServerConn.raise_error: the ErrorResponse to show for each raise (None: the server's),
        # one per HIDDEN_EXECUTE in pending.
        self.raised: deque[bytes | None] = deque()
        # The client's own statement name for each PARSE_NAMED, BIND_NAMED and DESCRIBE_NAMED owed
        # a reply, in order: a Parse that fails or is skipped leaves exactly that name undefined,
        # and an error names the statement as that request did (a query may have two names).
        self.client_names: deque[bytes] = deque()

    # --- whether the server may be lent ---

    def reusable(self, client_mid_message: bool = False) -> bool:
        """Ready for anyone: ReadyForQuery 'I' arrived, nothing owed, no batch open, no COPY, and
        no client message half written to it."""
        return (not self.pending and self.status == STATUS_IDLE and not self.unsynced
                and not self.copy_in and not client_mid_message and not self.doubt)

    def why_not_reusable(self, client_mid_message: bool = False) -> str:
        if self.doubt:
            return self.doubt
        if client_mid_message:
            return "a client message is half written to it"
        if self.copy_in:
            return "COPY FROM STDIN in progress"
        if self.pending:
            return f"{len(self.pending)} request(s) still owed a reply"
        if self.unsynced:
            return "extended-protocol batch without Sync"
        return "transaction open"

    # --- transitions the relay reports ---

    def requests_sent(self, start: int) -> None:
        """The client's requests were appended to pending from index start: note whether a batch
        is open, and settle COPY's markers (rare: only COPY puts a COPY_END or sets copy_in)."""
        pending = self.pending
        if len(pending) <= start:
            return
        if self.skipping:
            # pending held nothing when skipping began, and nothing but dropped requests since.
            while pending and pending[0] != SYNC:
                self._drop_head()
            if not pending:
                return
            self.skipping = False
        if self.copy_in:
            self._drop_ignored_syncs(start)
        i = len(pending) - 1
        while i >= start and pending[i] == COPY_END:
            i -= 1
        if i >= start:  # a Query ends a batch, Sync too; so does a Query the pooler answers
            last = pending[i]
            self.unsynced = last != SYNC and last != QUERY and last != SYNTH_QUERY and last != HIDDEN_QUERY
        while pending and pending[0] == COPY_END:
            del pending[0]  # a stray CopyDone/CopyFail: PostgreSQL drops it, nothing is owed

    def copy_in_started(self) -> None:
        """CopyInResponse for the oldest owed request: Syncs sent after it, up to the client's
        CopyDone/CopyFail, are ignored by PostgreSQL. Started by an Execute, the batch stays open
        until the Sync after CopyDone."""
        self.copy_in = True
        pending = self.pending
        if pending and pending[0] != QUERY:
            self._drop_ignored_syncs(1)
            # The batch is open until a Sync that counts: one sent after CopyDone, if any yet.
            i = len(pending) - 1
            while i > 0 and pending[i] == COPY_END:
                i -= 1
            self.unsynced = self.copy_in or pending[i] not in (SYNC, QUERY)
        else:
            self._drop_ignored_syncs(1)

    def _drop_ignored_syncs(self, start: int) -> None:
        pending = self.pending
        i = start
        while i < len(pending):
            kind = pending[i]
            if kind == COPY_END:
                del pending[i]
                self.copy_in = False
                return
            if kind == SYNC:
                del pending[i]
            else:
                i += 1

    def copy_over(self) -> None:
        """The server left COPY (CommandComplete or an error): later CopyData/Done/Fail from the
        client are dropped by PostgreSQL, and its Syncs count again."""
        self.copy_in = False

    def settle_ready(self) -> int:
        """A ReadyForQuery arrived while the oldest owed request is not one that gets it: the
        requests before the Query/Sync it answers were skipped by the server. Drop them (with
        their refs and owed errors); returns how many were dropped."""
        pending, dropped = self.pending, 0
        while pending and pending[0] not in _READY_KINDS:
            self._drop_head()
            dropped += 1
        if pending:
            del pending[0]
        self.skipping = False
        return dropped

    def skip_to_sync(self) -> None:
        """An ErrorResponse to an extended-protocol request: PostgreSQL now skips every message
        (Query included) until Sync. Drops the oldest owed requests up to that Sync."""
        pending = self.pending
        while pending and pending[0] != SYNC and pending[0] != HIDDEN_QUERY and pending[0] != HIDDEN_ROWS:
            self._drop_head()
        if not pending:
            # No Sync yet: whatever the client sends until its Sync is skipped too.
            self.unsynced = self.skipping = True

    def _drop_head(self) -> None:
        """The oldest owed request was skipped by the server: it gets no reply."""
        kind = self.pending[0]
        del self.pending[0]
        ref = None
        if kind in HAS_REF:
            ref = self.refs.popleft()
            if kind == PARSE_NAMED:
                ref = (ref, self.client_names.popleft())
            elif kind == BIND_NAMED or kind == DESCRIBE_NAMED:
                self.client_names.popleft()
        elif kind == SYNTH_QUERY:
            self.synth_replies.popleft()
        elif kind == SYNTH_CLOSE:
            ref = self.synth_closes.popleft()
        elif kind == HIDDEN_EXECUTE:
            self.raised.popleft()
        elif kind == PARSE:
            self.unnamed_owner = None  # that Parse never ran: the old unnamed statement is there
        self.skipped(kind, ref)

    def skipped(self, kind: int, ref: Any) -> None:
        """Hook: a request of this kind (and its ref) was skipped by the server. The ref of a
        PARSE_NAMED is (statement, client's name)."""
