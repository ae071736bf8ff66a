"""One session's call dispatch, without I/O: records in, backend calls, replies out.

The gRPC service feeds each decoded call record to `Session.execute`. Async
calls run on the backend and return nothing; their failures are kept, with the
client's sequence number, until the next sync call, whose reply carries the
earliest one. A chunked write returns a `ChunkSink` that the service feeds the
payload frames that follow it.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from typing import Any, Iterator

from harp import wire
from harp.device import Device
from harp.errors import ArgumentError, HarpError, InternalError, ProtocolError
from harp.frontend import DeferredErrors
from harp.types import ArrayArg, Buffer, BufferArg, Event, Function, Module, Scalar, Stream

from .handles import HandleTable

log = logging.getLogger("harp.server")


class SeqMap:
    """Backend call numbers -> client call numbers.

    The backend numbers the calls the server makes on it; a client call can
    become several backend calls (one per payload chunk) or none (a refused
    handle), so the two drift apart. Kept as breakpoints, not per call.
    """

    def __init__(self) -> None:
        self._starts = [1]
        self._offsets = [0]

    def note(self, backend_seq: int, client_seq: int) -> None:
        offset = client_seq - backend_seq
        if offset != self._offsets[-1]:
            self._starts.append(backend_seq)
            self._offsets.append(offset)

    def client(self, backend_seq: int) -> int:
        i = bisect.bisect_right(self._starts, backend_seq) - 1
        return backend_seq + self._offsets[max(i, 0)]


class Reply:
    """The frames answering one sync call: a reply record, then any payload frames."""

    __slots__ = ("seq", "error", "result", "payload")

    def __init__(self, seq: int, error: HarpError | None = None, result: Any = None,
                 payload: Iterator[bytes] | None = None) -> None:
        self.seq, self.error, self.result, self.payload = seq, error, result, payload

    def frames(self) -> Iterator[bytes]:
        err = wire.error_to_proto(self.error) if self.error is not None else None
        yield wire.pack([self.seq, err, self.result])
        if self.error is None and self.payload is not None:
            yield from self.payload


class ChunkSink:
    """Receives the payload frames of one chunked write and hands them to the backend."""

    def __init__(self, session: "Session", seq: int, buf: Buffer | None, offset: int,
                 stream: Stream | None, nbytes: int) -> None:
        self.session, self.seq, self.buf, self.stream = session, seq, buf, stream
        self.offset, self.remaining = offset, nbytes

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, chunk: bytes) -> None:
        if len(chunk) == 0 or len(chunk) > self.remaining:
            raise ProtocolError(f"payload frame of {len(chunk)} bytes where {self.remaining} "
                                "remain in the write")
        self.remaining -= len(chunk)
        if self.buf is not None:
            self.session._async(self.seq, "write", self.session.device.write, self.buf,
                                self.offset, chunk, self.stream)
        self.offset += len(chunk)


class Session:
    """A client's session on one backend device: handle table, call numbering, errors."""

    def __init__(self, device: Device, session_id: str, chunk_size: int = wire.CHUNK_SIZE) -> None:
        self.device = device
        self.id = session_id
        self.chunk_size = chunk_size
        self.handles = HandleTable()
        self.errors = DeferredErrors()
        self.seqmap = SeqMap()
        self.backend_calls = 0
        self.last_seq = 0
        self.closed = False
        self.lease_id = ""
        self.ending = False              # the lease reaper is closing it
        self.expires_at = float("inf")   # the lease's end; the server ends the session then
        self.lock = threading.Lock()     # one frame's calls, or the close, at a time
        self.context: Any = None         # the gRPC call, to end it from outside
        self._ops = {
            wire.ALLOC: self._alloc, wire.FREE: self._free, wire.WRITE: self._write,
            wire.WRITE_CHUNKED: self._write_chunked, wire.COPY: self._copy, wire.FILL: self._fill,
            wire.LOAD_MODULE: self._load_module, wire.FUNCTION: self._function,
            wire.LAUNCH: self._launch, wire.STREAM: self._stream, wire.EVENT: self._event,
            wire.RECORD: self._record, wire.WAIT: self._wait, wire.READ: self._read,
            wire.SYNCHRONIZE: self._synchronize, wire.ELAPSED: self._elapsed,
            wire.MEM_INFO: self._mem_info,
            wire.CLOSE: self._close,
        }

    # -- dispatch --------------------------------------------------------------
    def execute(self, call: list) -> Reply | ChunkSink | None:
        """Run one checked call record (see `wire.check_record`)."""
        op, seq = call[0], call[1]
        if seq <= self.last_seq:
            raise ProtocolError(f"call #{seq} after call #{self.last_seq}: numbers must increase")
        self.last_seq = seq
        return self._ops[op](seq, *call[2:])

    def _backend_call(self, seq: int) -> None:
        self.backend_calls += 1
        self.seqmap.note(self.backend_calls, seq)

    def _async(self, seq: int, name: str, method: Any, *args: Any) -> Any:
        """Call the backend for an async call; an immediate failure is kept for the next sync."""
        self._backend_call(seq)
        try:
            return method(*args)
        except (HarpError, TypeError, ValueError) as exc:
            self.errors.add(_as_harp(exc), name, seq)
            return None

    @contextlib.contextmanager
    def _pending_first(self, seq: int) -> Iterator[None]:
        """A sync call refused here, before the backend saw it, must still raise the
        backend's earlier failures first, as a local device does: ask the backend for them
        with a sync call of its own (`mem_info` raises what is pending)."""
        try:
            yield
        except HarpError:
            self._backend_call(seq)
            self.device.mem_info()
            raise

    def _sync(self, seq: int, name: str, fn: Any, payload: Any = None) -> Reply:
        """Run a sync call; its reply carries the earliest failure since the last sync."""
        error = None
        result = None
        try:
            result = fn()
        except (HarpError, TypeError, ValueError) as exc:
            error = _as_harp(exc)
            if error.seq is not None and error.call is not None:
                error.seq = self.seqmap.client(error.seq)
                for later in getattr(error, "later", ()):
                    if later.seq is not None:
                        later.seq = self.seqmap.client(later.seq)
            else:
                error.call, error.seq = name, seq
        mine = self.errors.take()
        if mine is not None:
            found = [mine, *getattr(mine, "later", ())]
            if error is not None:
                found += [error, *getattr(error, "later", ())]
            found.sort(key=lambda e: e.seq or 0)
            error = found[0]
            error.later = found[1:]  # type: ignore[attr-defined]
        return Reply(seq, error, None if error is not None else result, payload)

    # -- memory ----------------------------------------------------------------
    def _alloc(self, seq: int, client_id: int, nbytes: int) -> None:
        buf = self._async(seq, "alloc", self.device.alloc, nbytes)
        if buf is not None:
            self.handles.add(client_id, buf)

    def _free(self, seq: int, client_id: int) -> None:
        try:
            buf = self.handles.pop(Buffer, client_id)
        except HarpError as exc:
            self.errors.add(exc, "free", seq)
            return
        self._async(seq, "free", self.device.free, buf)

    def _lookup(self, seq: int, name: str, *wanted: tuple[type, int]) -> list | None:
        try:
            return [self.handles.get(kind, cid) for kind, cid in wanted]
        except HarpError as exc:
            self.errors.add(exc, name, seq)
            return None

    def _write(self, seq: int, buf: int, offset: int, stream: int, data: bytes) -> None:
        found = self._lookup(seq, "write", (Buffer, buf), (Stream, stream))
        if found:
            self._async(seq, "write", self.device.write, found[0], offset, data, found[1])

    def _write_chunked(self, seq: int, buf: int, offset: int, stream: int, nbytes: int) -> ChunkSink:
        if nbytes <= 0:
            raise ProtocolError("a chunked write must carry at least one byte")
        found = self._lookup(seq, "write", (Buffer, buf), (Stream, stream))
        if found:
            target = found[0]
            if offset < 0 or offset + nbytes > target.nbytes:
                self.errors.add(ArgumentError(f"write [{offset}, {offset + nbytes}) is outside "
                                              f"the buffer of {target.nbytes} bytes"), "write", seq)
                found = None
        return ChunkSink(self, seq, found[0] if found else None, offset,
                         found[1] if found else None, nbytes)

    def _copy(self, seq: int, dst: int, dst_off: int, src: int, src_off: int, nbytes: int,
              stream: int) -> None:
        found = self._lookup(seq, "copy", (Buffer, dst), (Buffer, src), (Stream, stream))
        if found:
            self._async(seq, "copy", self.device.copy, found[0], dst_off, found[1], src_off,
                        nbytes, found[2])

    def _fill(self, seq: int, buf: int, value: int, offset: int, nbytes: int, stream: int) -> None:
        found = self._lookup(seq, "fill", (Buffer, buf), (Stream, stream))
        if found:
            self._async(seq, "fill", self.device.fill, found[0], value, offset, nbytes, found[1])

    def _read(self, seq: int, buf: int, offset: int, nbytes: int, stream: int) -> Reply:
        state: dict[str, Any] = {}

        def run() -> list:
            with self._pending_first(seq):
                target, queue = self.handles.get(Buffer, buf), self.handles.get(Stream, stream)
                if offset < 0 or nbytes < 0 or offset + nbytes > target.nbytes:
                    raise ArgumentError(f"read [{offset}, {offset + nbytes}) is outside the "
                                        f"buffer of {target.nbytes} bytes")
            state["args"] = (target, queue)
            if nbytes <= wire.INLINE_LIMIT:  # small reads ride in the reply record itself
                return [nbytes, self._read_chunk(seq, target, offset, nbytes, queue)
                        if nbytes else b""]
            # the first chunk now, so that its failure is this call's reply
            state["first"] = self._read_chunk(seq, target, offset, nbytes, queue)
            return [nbytes]

        def payload() -> Iterator[bytes]:
            if nbytes <= wire.INLINE_LIMIT:
                return
            target, queue = state["args"]
            chunk = state.pop("first")
            pos = len(chunk)
            yield chunk
            while pos < nbytes:
                chunk = self._read_chunk(seq, target, offset + pos, nbytes - pos, queue)
                pos += len(chunk)
                yield chunk
        return self._sync(seq, "read", run, payload())

    def _read_chunk(self, seq: int, buf: Buffer, offset: int, left: int, stream: Stream) -> bytes:
        self._backend_call(seq)
        return self.device.read(buf, offset, min(left, self.chunk_size), None, stream)

    def _mem_info(self, seq: int) -> Reply:
        def run() -> list:
            self._backend_call(seq)
            info = self.device.mem_info()
            return [info.free, info.total]
        return self._sync(seq, "mem_info", run)

    # -- code ------------------------------------------------------------------
    def _load_module(self, seq: int, client_id: int, format: str, image: bytes) -> None:
        module = self._async(seq, "load_module", self.device.load_module, image, format)
        if module is not None:
            self.handles.add(client_id, module)

    def _function(self, seq: int, client_id: int, module: int, name: str) -> None:
        found = self._lookup(seq, "function", (Module, module))
        fn = self._async(seq, "function", self.device.function, found[0], name) if found else None
        if fn is not None:
            self.handles.add(client_id, fn)

    def _launch(self, seq: int, fn: int, grid: list, block: list, shared: int, stream: int,
                args: list) -> None:
        try:
            function = self.handles.get(Function, fn)
            target = self.handles.get(Stream, stream)
            kernel_args = [self._arg(a) for a in args]
        except HarpError as exc:
            self.errors.add(exc, "launch", seq)
            return
        self._async(seq, "launch", self.device.launch, function, grid, block, kernel_args,
                    shared, target)

    def _arg(self, a: Any) -> Any:
        if not isinstance(a, list) or not a:
            raise ProtocolError("a kernel argument is a tagged array")
        tag = a[0]
        if tag == wire.ARG_BUFFER and len(a) == 3 and type(a[2]) is int:
            return BufferArg(self.handles.get(Buffer, a[1]), a[2])
        if tag == wire.ARG_SCALAR and len(a) == 3 and isinstance(a[2], str) \
                and isinstance(a[1], (int, float)):
            try:
                return Scalar(a[1], a[2])
            except TypeError as exc:
                raise ArgumentError(str(exc)) from None
        if tag == wire.ARG_ARRAY and len(a) == 6 and isinstance(a[3], list) \
                and type(a[4]) is int and (a[5] is None or isinstance(a[5], list)):
            if not all(type(s) is int for s in a[3] + (a[5] or [])):
                raise ProtocolError("array shape and strides are ints")
            try:
                return ArrayArg(self.handles.get(Buffer, a[1]), a[2], tuple(a[3]), a[4],
                                tuple(a[5]) if a[5] is not None else None)
            except TypeError as exc:
                raise ArgumentError(str(exc)) from None
        raise ProtocolError(f"malformed kernel argument {a!r:.60}")

    # -- order -----------------------------------------------------------------
    def _stream(self, seq: int, client_id: int) -> None:
        stream = self._async(seq, "stream", self.device.stream)
        if stream is not None:
            self.handles.add(client_id, stream)

    def _event(self, seq: int, client_id: int) -> None:
        event = self._async(seq, "event", self.device.event)
        if event is not None:
            self.handles.add(client_id, event)

    def _record(self, seq: int, event: int, stream: int) -> None:
        found = self._lookup(seq, "record", (Event, event), (Stream, stream))
        if found:
            self._async(seq, "record", self.device.record, found[0], found[1])

    def _wait(self, seq: int, stream: int, event: int) -> None:
        found = self._lookup(seq, "wait", (Stream, stream), (Event, event))
        if found:
            self._async(seq, "wait", self.device.wait, found[0], found[1])

    def _synchronize(self, seq: int, stream: int | None) -> Reply:
        def run() -> None:
            with self._pending_first(seq):
                target = None if stream is None else self.handles.get(Stream, stream)
            self._backend_call(seq)
            self.device.synchronize(target)
        return self._sync(seq, "synchronize", run)

    def _elapsed(self, seq: int, start: int, end: int) -> Reply:
        def run() -> float:
            with self._pending_first(seq):
                a, b = self.handles.get(Event, start), self.handles.get(Event, end)
            self._backend_call(seq)
            return self.device.elapsed(a, b)
        return self._sync(seq, "elapsed", run)

    def _close(self, seq: int) -> Reply:
        self.close()
        return Reply(seq)

    def close(self) -> None:
        """Free everything the session holds (clean close, crash or broken stream alike)."""
        if not self.closed:
            self.closed = True
            try:
                self.device.close()
            except Exception:  # the session is going away regardless
                log.exception("closing session %s", self.id)


def _as_harp(exc: BaseException) -> HarpError:
    if isinstance(exc, HarpError):
        return exc
    if isinstance(exc, (TypeError, ValueError)):
        return ArgumentError(f"{type(exc).__name__}: {exc}")
    return InternalError(f"{type(exc).__name__}: {exc}")
