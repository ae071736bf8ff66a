"""The server's side of a session stream, without I/O.

Receiving: a batch frame becomes its checked call records (`Calls`); a sync
call must end its batch, and a batch that says it is sync (`BATCH_SYNC`)
must end with one; a chunked write ends its batch, and exactly its `nbytes`
then arrive as payload (`Chunk`s) before anything else, or a `DATA` frame
says they all come on the data channel (`External`); a shared-memory write
ends its batch too (its bytes come through the window). Any breach is a
`ProtocolError`, and the session ends.

Sending: a reply record per sync call, then a large read's payload frames.
"""
from __future__ import annotations

from typing import Any

from .. import wire
from ..errors import ProtocolError


class Calls:
    """The call records of one batch; `sync` when its last record expects a reply."""
    __slots__ = ("records", "sync")

    def __init__(self, records: list, sync: bool) -> None:
        self.records, self.sync = records, sync


class Chunk:
    """Bytes of the chunked write in progress; `last` on its final chunk."""
    __slots__ = ("data", "last")

    def __init__(self, data: Any, last: bool) -> None:
        self.data, self.last = data, last


class External:
    """The rest of the chunked write in progress (`nbytes`) comes on the data channel;
    the carrier reads it and hands it over with `receive_payload`."""
    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class ServerProtocol:
    """Frame rules of one session, for the side that executes its calls."""

    __slots__ = ("_left",)

    def __init__(self) -> None:
        self._left = 0          # payload bytes of a chunked write still due

    @property
    def expecting_payload(self) -> int:
        return self._left

    def receive(self, frame: Any) -> Calls | Chunk | External:
        """The event one client frame carries (the frame's kind byte included)."""
        if not len(frame):
            raise ProtocolError("an empty frame")
        kind = frame[0]
        if kind == wire.PAYLOAD:
            return self.receive_payload(memoryview(frame)[1:])
        if kind == wire.DATA:
            n = wire.data_frame_size(frame)
            if n != self._left:
                raise ProtocolError(f"a data frame announces {n} bytes where the chunked "
                                    f"write has {self._left} to come")
            return External(n)
        if kind not in (wire.BATCH, wire.BATCH_SYNC):
            raise ProtocolError(f"unknown frame kind {kind}")
        if self._left:
            raise ProtocolError(f"a batch arrived where {self._left} bytes of a chunked "
                                "write were due")
        records = wire.unpack_batch(memoryview(frame)[1:])
        last = len(records) - 1
        for i, record in enumerate(records):
            op = record[0]
            if op in wire.SYNC_OPS or op == wire.WRITE_CHUNKED or op == wire.WRITE_SHM:
                if i != last:
                    raise ProtocolError(f"{wire.SCHEMA[op][0]} (call #{record[1]}) must end "
                                        "its batch")
        op = records[last][0]
        sync = op in wire.SYNC_OPS
        if sync != (kind == wire.BATCH_SYNC):
            raise ProtocolError("a sync batch must end with a sync call, and only a sync "
                                "batch may")
        if op == wire.WRITE_CHUNKED:
            nbytes = records[last][5]
            if nbytes <= 0 or nbytes > 1 << 62:
                raise ProtocolError("a chunked write carries at least one byte")
            self._left = nbytes
        elif op == wire.WRITE_SHM and not 0 < records[last][5] <= 1 << 62:
            raise ProtocolError("a shared-memory write carries at least one byte")
        return Calls(records, sync)

    def receive_payload(self, data: Any) -> Chunk:
        """Payload bytes that arrived apart from a frame (a worker's shared memory)."""
        n = len(data)
        if n == 0 or n > self._left:
            raise ProtocolError(f"payload frame of {n} bytes where {self._left} remain "
                                "in the write")
        self._left -= n
        return Chunk(data, self._left == 0)

    @staticmethod
    def reply(seq: int, error: bytes | None, result: Any) -> bytes:
        """The reply record of one sync call (`error`: a serialized ErrorRecord)."""
        return wire.pack([seq, error, result])
