"""The client's side of a session stream, without I/O.

Sending: async call records are queued and leave in a batch when it holds
`BATCH_CALLS` records or `BATCH_BYTES` of inline payload, or with the next
sync call (which ends its batch and gets one reply), or before a chunked
write (which ends its batch and is followed by its payload frames).

Receiving: after a sync call the client waits for its reply record; a large
read's reply is followed by exactly `nbytes` of payload frames. Anything
else, a reply for another call, more payload than asked, is a
`ProtocolError`, after which the session is broken for good.
"""
from __future__ import annotations

from typing import Any, Callable

import msgpack

from .. import wire
from ..wire import short as short_result
from ..errors import HarpError, ProtocolError

IDLE, AWAIT_REPLY, AWAIT_PAYLOAD = "idle", "await-reply", "await-payload"


class Reply:
    """The reply to the pending sync call: its result (a large read's data follows)."""
    __slots__ = ("result",)

    def __init__(self, result: Any) -> None:
        self.result = result


class Payload:
    """Bytes of a large read's data; `done` on the last frame."""
    __slots__ = ("data", "done")

    def __init__(self, data: bytes, done: bool) -> None:
        self.data, self.done = data, done


class ClientProtocol:
    """Batches, frames and reply checks of one session, for one client."""

    __slots__ = ("calls", "nbytes", "state", "_seq", "_left", "_decode_error")

    def __init__(self, decode_error: Callable[[bytes], HarpError]) -> None:
        self.calls: list[list] = []
        self.nbytes = 0
        self.state = IDLE
        self._seq = 0           # the sync call awaited
        self._left = 0          # payload bytes still to come
        self._decode_error = decode_error

    # -- sending -------------------------------------------------------------------
    def call(self, record: list, payload: int = 0) -> bytes | None:
        """Queue an async call record; returns a batch frame to send when one is cut."""
        if payload:
            return self._call_with_payload(record, payload)
        calls = self.calls
        calls.append(record)
        if len(calls) >= wire.BATCH_CALLS:
            return self.flush()
        return None

    def _call_with_payload(self, record: list, payload: int) -> bytes | None:
        frame = None
        if self.calls and self.nbytes + payload > wire.BATCH_BYTES:
            frame = self.flush()                 # keep every frame under the frame limit
        self.calls.append(record)
        self.nbytes += payload
        if len(self.calls) >= wire.BATCH_CALLS or self.nbytes >= wire.BATCH_BYTES:
            assert frame is None
            frame = self.flush()
        return frame

    def flush(self) -> bytes | None:
        """The queued async calls as one batch frame, or None when there are none."""
        if not self.calls:
            return None
        frame = wire.batch_frame(self.calls, False)
        self.calls, self.nbytes = [], 0
        return frame

    def sync(self, record: list) -> bytes:
        """The frame that carries a sync call (with the queued calls before it)."""
        if self.state != IDLE:
            raise ProtocolError(f"a sync call while the session is {self.state}")
        self.calls.append(record)
        frame = wire.batch_frame(self.calls, True)
        self.calls, self.nbytes = [], 0
        self.state, self._seq = AWAIT_REPLY, record[1]
        return frame

    def chunked_write(self, record: list) -> bytes:
        """The frame that opens a chunked write; `payload_frame` frames of its bytes follow."""
        self.calls.append(record)
        frame = wire.batch_frame(self.calls, False)
        self.calls, self.nbytes = [], 0
        return frame

    def shm_write(self, record: list) -> bytes:
        """The frame that opens a write through the shared-memory window (it ends its batch)."""
        return self.chunked_write(record)

    @staticmethod
    def data_frame(nbytes: int) -> bytes:
        """The frame after a chunked write's record when its bytes go on the data channel."""
        return wire.data_frame(nbytes)

    @staticmethod
    def payload_frame(chunk: Any) -> bytes:
        """One payload frame: the kind byte and the chunk, in one copy."""
        return wire.PAYLOAD_TAG + chunk

    # -- receiving -----------------------------------------------------------------
    def receive(self, frame: bytes) -> Reply | Payload:
        """The meaning of one frame from the server; raises the reply's error, if any."""
        if self.state == AWAIT_PAYLOAD:
            n = len(frame)
            if n == 0 or n > self._left:
                raise self._broken(f"the server sent a payload frame of {n} bytes where "
                                   f"{self._left} remained")
            self._left -= n
            if self._left == 0:
                self.state = IDLE
            return Payload(frame, self._left == 0)
        if self.state != AWAIT_REPLY:
            raise self._broken("the server sent a frame when none was due")
        try:
            seq, error, result = msgpack.unpackb(frame, raw=False)
        except Exception:
            raise self._broken("the server sent a malformed reply") from None
        if seq != self._seq:
            raise self._broken(f"reply for call #{seq} while waiting for #{self._seq}")
        self.state = IDLE
        if error is not None:
            raise self._decode_error(error)
        return Reply(result)

    def read_data(self, result: Any, nbytes: int, external: bool = False) -> bytes | None:
        """A read's inline data (small reads), or None when `nbytes` of payload follow: in
        frames, or on the data channel (`external`), which the carrier reads itself."""
        if type(result) is not list or not result or result[0] != nbytes:
            raise self._broken("the server sent a read reply of the wrong size")
        if len(result) == 2:
            if type(result[1]) is not bytes or len(result[1]) != nbytes:
                raise self._broken("the server sent a read reply of the wrong size")
            return result[1]
        if nbytes and not external:
            self.state, self._left = AWAIT_PAYLOAD, nbytes
        return None if nbytes else b""

    def shm_read_done(self, result: Any, nbytes: int, received: int) -> None:
        """Check the reply of a read whose data came through the window (`received` bytes)."""
        if type(result) is not list or result != [nbytes] or received != nbytes:
            raise self._broken(f"the server replied to a shared-memory read of {nbytes} bytes "
                               f"with {short_result(result)} after {received} bytes")

    def _broken(self, message: str) -> ProtocolError:
        self.state = "broken"
        return ProtocolError(message)
