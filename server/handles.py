"""The per-session handle table: the client's handle ids mapped to the backend's objects.

Every id that arrives from the wire is looked up here, with its kind, before
the backend sees it; an id the session never created, or one of another
kind, is refused. Sessions have separate tables, so no session can name
another's objects.
"""
from __future__ import annotations

from typing import Any, TypeVar

from harp.errors import InvalidHandleError, ProtocolError, QuotaError
from harp.types import DEFAULT_STREAM, DEFAULT_STREAM_ID, Buffer, Event, Function, Module, Stream

T = TypeVar("T")

#: Most live handles one session may hold (a bound on what a client can make us store).
MAX_HANDLES = 1 << 20

_KIND = {Buffer: "buffer", Module: "module", Function: "function", Stream: "stream",
         Event: "event"}


class HandleTable:
    """Client handle id -> backend handle, checked by kind."""

    def __init__(self) -> None:
        self._objects: dict[int, Any] = {DEFAULT_STREAM_ID: DEFAULT_STREAM}

    def __len__(self) -> int:
        return len(self._objects)

    def add(self, client_id: int, obj: Any) -> None:
        """Bind a new client id; reusing a live id is a protocol error."""
        if client_id in self._objects:
            raise ProtocolError(f"handle id {client_id:#x} is already in use in this session")
        if len(self._objects) >= MAX_HANDLES:
            raise QuotaError(f"a session may hold at most {MAX_HANDLES} handles")
        self._objects[client_id] = obj

    def get(self, kind: type[T], client_id: int) -> T:
        """The backend object for `client_id`, which must be of `kind`."""
        obj = self._objects.get(client_id)
        if type(obj) is not kind:
            raise InvalidHandleError(
                f"{_KIND[kind]} handle {client_id:#x} is not "
                f"{'allocated' if kind is Buffer else 'known'} in this session"
                + (" (freed, or another session's)" if obj is None else f" (it is a {_KIND[type(obj)]})"))
        return obj

    def pop(self, kind: type[T], client_id: int) -> T:
        obj = self.get(kind, client_id)
        del self._objects[client_id]
        return obj
