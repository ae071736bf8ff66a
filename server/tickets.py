"""One-time tickets: how a session's client picks up what the server keeps for it off the stream.

The server gives a client a ticket in its session's handshake (over the
session's mutually authenticated stream) for something that cannot travel on
the stream: a shared-memory window's file descriptors (`door`), a data
channel's socket (`datachannel`). Whoever shows the ticket gets the thing,
once, while the ticket is good; a ticket that went stale, or whose session
ended, is dropped (and `on_drop` frees what it held).
"""
from __future__ import annotations

import secrets
import threading
import time
from typing import Any, Callable

from harp.shm import TICKET_BYTES


class TicketBook:
    """Tickets of one kind, each good once for `ttl_s` seconds."""

    def __init__(self, ttl_s: float, on_drop: Callable[[Any], None] | None = None) -> None:
        self.ttl_s = ttl_s
        self._on_drop = on_drop
        self._tickets: dict[bytes, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def offer(self, value: Any) -> bytes:
        """A new ticket for `value` (stale tickets are dropped on the way)."""
        ticket = secrets.token_bytes(TICKET_BYTES)
        now = time.monotonic()
        with self._lock:
            stale = [t for t, (_, at) in self._tickets.items() if now - at > self.ttl_s]
            dropped = [self._tickets.pop(t)[0] for t in stale]
            self._tickets[ticket] = (value, now)
        for value in dropped:
            self._drop(value)
        return ticket

    def claim(self, ticket: bytes | None) -> Any:
        """The value of a shown ticket, once, while it is good; else None."""
        with self._lock:
            found = self._tickets.pop(ticket, None) if ticket else None
        if found is None:
            return None
        value, at = found
        if time.monotonic() - at > self.ttl_s:
            self._drop(value)
            return None
        return value

    def discard(self, ticket: bytes) -> None:
        """Forget a ticket (its session has ended)."""
        with self._lock:
            found = self._tickets.pop(ticket, None)
        if found is not None:
            self._drop(found[0])

    def clear(self) -> None:
        with self._lock:
            values, self._tickets = [v for v, _ in self._tickets.values()], {}
        for value in values:
            self._drop(value)

    def _drop(self, value: Any) -> None:
        if self._on_drop is not None:
            self._on_drop(value)
