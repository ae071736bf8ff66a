"""The session protocol's two sides, without I/O (h11 is the model).

`ClientProtocol` turns calls into frames and frames into replies;
`ServerProtocol` turns frames into call records and payload chunks, and
replies into frames. Whatever moves the bytes (`harp.client.RemoteDevice`
over gRPC, the pool server's handler, a session's worker process over a unix
socket and shared memory) is a thin pump around one of these; the rules live
here, once, with tests that need no network (`tests/protocol/`).

The frame format itself is in `harp.wire`.
"""
from __future__ import annotations

from .client import ClientProtocol, Payload, Reply
from .server import Calls, Chunk, External, ServerProtocol

__all__ = ["ClientProtocol", "ServerProtocol", "Reply", "Payload", "Calls", "Chunk", "External"]
