"""One session's call dispatch, without I/O: call records in, backend calls, replies out.

Whatever carries a session's frames (the gRPC handler in thread isolation, a
session's worker process otherwise) feeds the events of `ServerProtocol` to
`Session.handle`. Async calls run on the backend and return nothing; their
failures are kept, with the client's sequence number, until the next sync
call, whose `Reply` carries the earliest one. A large read's reply carries a
`ReadPlan`, from which the carrier reads the payload chunk by chunk, into
bytes or straight into shared memory.

The dispatch table comes from the API table (`harp.api`): call `key` is
served by the method `_key`.
"""
from __future__ import annotations

import bisect
import logging
from typing import Any, Iterator

from harp import api, wire
from harp.device import Device
from harp.errors import ArgumentError, HarpError, InternalError, ProtocolError
from harp.frontend import DeferredErrors
from harp.protocol import Calls, Chunk
from harp.shm import SharedWindow
from harp.types import ArrayArg, Buffer, BufferArg, Event, Function, Module, Scalar, Stream

from .handles import HandleTable

log = logging.getLogger("harp.server")

#: Most kernel arguments a session keeps made (`Session._known_args`); past it, it starts over.
_KNOWN_ARGS = 4096


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


class ReadPlan:
    """The payload of a large read: `nbytes` from a buffer, read from the device a chunk
    at a time as the carrier asks (so a slow reader holds no more than one chunk)."""

    __slots__ = ("session", "seq", "buf", "stream", "offset", "nbytes", "first")

    def __init__(self, session: "Session", seq: int, buf: Buffer, stream: Stream, offset: int,
                 nbytes: int, first: bytes) -> None:
        self.session, self.seq, self.buf, self.stream = session, seq, buf, stream
        self.offset, self.nbytes, self.first = offset, nbytes, first

    def chunks(self) -> Iterator[bytes]:
        """The payload as bytes, chunk by chunk (the first was read with the reply)."""
        pos = len(self.first)
        yield self.first
        self.first = b""
        while pos < self.nbytes:
            chunk = self.session._read_chunk(self.seq, self.buf, self.offset + pos,
                                             self.nbytes - pos, self.stream)
            pos += len(chunk)
            yield chunk

    def read_into(self, pos: int, out: memoryview) -> int:
        """Read the payload bytes from `pos` into `out` (at most its size); returns how many."""
        n = min(len(out), self.nbytes - pos)
        self.session._backend_call(self.seq)
        self.session.device.read(self.buf, self.offset + pos, n, out[:n], self.stream)
        return n


class Reply:
    """The answer to one sync call: a result or an error, and a large read's payload."""

    __slots__ = ("seq", "error", "result", "payload")

    def __init__(self, seq: int, error: HarpError | None = None, result: Any = None,
                 payload: ReadPlan | None = None) -> None:
        self.seq, self.error, self.result, self.payload = seq, error, result, payload


class ChunkSink:
    """Receives the payload of one chunked write and hands it to the backend."""

    def __init__(self, session: "Session", seq: int, buf: Buffer | None, offset: int,
                 stream: Stream | None) -> None:
        self.session, self.seq, self.buf, self.stream = session, seq, buf, stream
        self.offset = offset

    def feed(self, chunk: Any) -> None:
        if self.buf is not None:
            self.session._async(self.seq, "write", self.session.device.write, self.buf,
                                self.offset, chunk, self.stream)
        self.offset += len(chunk)


class Session:
    """A client's session on one backend device: handle table, call numbering, errors."""

    def __init__(self, device: Device, session_id: str, chunk_size: int = wire.CHUNK_SIZE,
                 window: SharedWindow | None = None) -> None:
        self.device = device
        #: The same-host session's shared-memory window (`harp.shm`), if it took one.
        self.window = window
        self.id = session_id
        self.chunk_size = chunk_size
        self.handles = HandleTable()
        self.errors = DeferredErrors()
        self.seqmap = SeqMap()
        self.backend_calls = 0
        self.last_seq = 0
        self.closed = False
        #: What the session did, for the server's metrics (`counters.Counts`): calls run here,
        #: bytes its writes and reads named, failures reported to it by code (and their sum).
        self.calls = self.write_bytes = self.read_bytes = self.failed = 0
        self.failures: dict[str, int] = {}
        #: The seq of the last call after which the device was known drained: a whole-device
        #: synchronize that succeeded, everything before it done and its errors taken.
        self.drained_seq = 0
        self._sink: ChunkSink | None = None
        #: Kernel arguments already made from their wire form, by (type, value, value, tag)
        #: of a buffer or scalar argument: launches in a loop pass the same ones, and making
        #: a `BufferArg` or `Scalar` costs more than the rest of the argument's path. Buffer
        #: entries go when any buffer is freed (an id can then name another buffer).
        self._known_args: dict[tuple, Any] = {}
        #: Per function (client id): the wire arguments of its last launch and the kernel
        #: arguments made of them, reused when the next launch's compare equal (one list
        #: comparison), unless equal could mean different (`_same_means_equal`). Dropped,
        #: like `_known_args`, when a buffer is freed.
        self._last_args: dict[int, tuple[list, list]] = {}
        self._ops = {c.op: getattr(self, "_" + c.key) for c in api.CALLS}
        settle = getattr(device, "settle", None)      # a wrapped device may not have it
        self._settle = settle if callable(settle) else _nothing

    # -- dispatch --------------------------------------------------------------
    def handle(self, event: Calls | Chunk) -> Reply | None:
        """Run one protocol event: a batch's calls, or a chunk of the write in progress."""
        if type(event) is Chunk:
            sink = self._sink
            if sink is None:
                raise ProtocolError("payload without a chunked write")
            sink.feed(event.data)
            if event.last:
                self._sink = None
            return None
        reply = None
        execute = self.execute
        for record in event.records:
            reply = execute(record)
        self._settle()                  # the batch is issued: see `BackendDevice.settle`
        if type(reply) is ChunkSink:
            self._sink = reply
            return None
        return reply

    def execute(self, call: list) -> Reply | ChunkSink | None:
        """Run one checked call record (see `wire.check_record`)."""
        op, seq = call[0], call[1]
        if op != _LAUNCH:
            self._settle()       # anything but a launch may wait: see `BackendDevice.settle`
        if seq <= self.last_seq:
            raise ProtocolError(f"call #{seq} after call #{self.last_seq}: numbers must increase")
        self.last_seq = seq
        self.calls += 1
        try:
            return self._ops[op](seq, *call[2:])
        except (HarpError, TypeError, ValueError, OverflowError) as exc:
            # A value the checks let through that the backend refused in a way of its own:
            # never a traceback, a typed error for the call.
            if isinstance(exc, ProtocolError):
                raise
            error = _as_harp(exc)
            if op in wire.SYNC_OPS:
                return self._failed(seq, _named(error, wire.SCHEMA[op][0], seq))
            self.errors.add(error, wire.SCHEMA[op][0], seq)
            return None

    def _backend_call(self, seq: int) -> None:
        self.backend_calls += 1
        self.seqmap.note(self.backend_calls, seq)

    def _async(self, seq: int, name: str, method: Any, *args: Any) -> Any:
        """Call the backend for an async call; an immediate failure is kept for the next sync."""
        self._backend_call(seq)
        try:
            return method(*args)
        except (HarpError, TypeError, ValueError, OverflowError) as exc:
            self.errors.add(_as_harp(exc), name, seq)
            return None

    def _refused(self, seq: int, error: HarpError) -> HarpError:
        """A sync call refused here, before the backend saw it, must still raise the
        backend's earlier failures first, as a local device does: ask the backend for them
        with a sync call of its own (`mem_info` raises what is pending); else `error`."""
        self._backend_call(seq)
        self.device.mem_info()
        return error

    def _sync(self, seq: int, name: str, fn: Any) -> Reply:
        """Run a sync call; its reply carries the earliest failure since the last sync."""
        error = None
        result = None
        try:
            result = fn()
        except (HarpError, TypeError, ValueError, OverflowError) as exc:
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
        if error is not None:
            return self._failed(seq, error)
        if type(result) is Reply:
            return result
        return Reply(seq, None, result)

    def _failed(self, seq: int, error: HarpError) -> Reply:
        """The reply to a sync call that reports `error` (and the failures after it, in
        `error.later`), counted by code for the server's metrics."""
        failures = self.failures
        for failure in (error, *getattr(error, "later", ())):
            failures[failure.code] = failures.get(failure.code, 0) + 1
            self.failed += 1
        return Reply(seq, error)

    # -- memory ----------------------------------------------------------------
    def _alloc(self, seq: int, client_id: int, nbytes: int) -> None:
        buf = self._async(seq, "alloc", self.device.alloc, nbytes)
        if buf is not None:
            self._bind(seq, "alloc", client_id, buf)

    def _bind(self, seq: int, name: str, client_id: int, obj: Any) -> None:
        try:
            self.handles.add(client_id, obj)
        except HarpError as exc:
            self.errors.add(exc, name, seq)

    def _free(self, seq: int, client_id: int) -> None:
        try:
            buf = self.handles.pop(Buffer, client_id)
        except HarpError as exc:
            self.errors.add(exc, "free", seq)
            return
        self._known_args.clear()
        self._last_args.clear()
        self._async(seq, "free", self.device.free, buf)

    def _lookup(self, seq: int, name: str, *wanted: tuple[type, int]) -> list | None:
        try:
            return [self.handles.get(kind, cid) for kind, cid in wanted]
        except HarpError as exc:
            self.errors.add(exc, name, seq)
            return None

    def _write(self, seq: int, buf: int, offset: int, stream: int, data: bytes) -> None:
        self.write_bytes += len(data)
        found = self._lookup(seq, "write", (Buffer, buf), (Stream, stream))
        if found:
            self._async(seq, "write", self.device.write, found[0], offset, data, found[1])

    def _write_chunked(self, seq: int, buf: int, offset: int, stream: int,
                       nbytes: int) -> ChunkSink:
        found = self._lookup(seq, "write", (Buffer, buf), (Stream, stream))
        if found:
            target = found[0]
            if offset < 0 or offset + nbytes > target.nbytes:
                self.errors.add(ArgumentError(f"write [{offset}, {offset + nbytes}) is outside "
                                              f"the buffer of {target.nbytes} bytes"), "write", seq)
                found = None
            else:
                self.write_bytes += nbytes
        return ChunkSink(self, seq, found[0] if found else None, offset,
                         found[1] if found else None)

    def _alive(self) -> bool:
        return not self.closed

    def _window(self, what: str) -> SharedWindow:
        if self.window is None:
            raise ProtocolError(f"a shared-memory {what} in a session without a window")
        return self.window

    def _write_shm(self, seq: int, buf: int, offset: int, stream: int, nbytes: int) -> None:
        """A write whose bytes come through the window, chunk by chunk, each handed to the
        backend and its slot given back at once; a refused write still drains its chunks."""
        window = self._window("write")
        found = self._lookup(seq, "write", (Buffer, buf), (Stream, stream))
        if found and (offset < 0 or offset + nbytes > found[0].nbytes):
            self.errors.add(ArgumentError(f"write [{offset}, {offset + nbytes}) is outside "
                                          f"the buffer of {found[0].nbytes} bytes"), "write", seq)
            found = None
        if found:
            self.write_bytes += nbytes
        pos = 0
        while pos < nbytes:
            chunk = window.receive(nbytes - pos, self._alive)
            try:
                if found:
                    self._async(seq, "write", self.device.write, found[0], offset + pos, chunk,
                                found[1])
            finally:
                window.done()
            pos += len(chunk)

    def _read_shm(self, seq: int, buf: int, offset: int, nbytes: int, stream: int) -> Reply:
        """A read whose data goes through the window before its reply; a read that fails
        marks its next slot `FAILED`, and the reply says why."""
        window = self._window("read")

        def run() -> list:
            sent = 0
            try:
                try:
                    target, queue = self.handles.get(Buffer, buf), self.handles.get(Stream, stream)
                    if offset < 0 or nbytes <= 0 or offset + nbytes > target.nbytes:
                        raise ArgumentError(f"read [{offset}, {offset + nbytes}) is outside the "
                                            f"buffer of {target.nbytes} bytes")
                except HarpError as exc:
                    raise self._refused(seq, exc)
                self.read_bytes += nbytes
                if self.errors:                  # an earlier failure is this call's reply
                    return [nbytes]
                while sent < nbytes:
                    start = sent

                    def fill(out: memoryview) -> int:
                        n = min(len(out), nbytes - start)
                        self._backend_call(seq)
                        self.device.read(target, offset + start, n, out[:n], queue)
                        return n
                    sent += window.produce(fill, self._alive)
                return [nbytes]
            finally:
                if sent < nbytes:
                    window.fail(self._alive)
        return self._sync(seq, "read", run)

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
        def run() -> Any:
            try:
                target, queue = self.handles.get(Buffer, buf), self.handles.get(Stream, stream)
                if offset < 0 or nbytes < 0 or offset + nbytes > target.nbytes:
                    raise ArgumentError(f"read [{offset}, {offset + nbytes}) is outside the "
                                        f"buffer of {target.nbytes} bytes")
            except HarpError as exc:
                raise self._refused(seq, exc)
            self.read_bytes += nbytes
            if nbytes <= wire.INLINE_LIMIT:  # small reads ride in the reply record itself
                return [nbytes, self._read_chunk(seq, target, offset, nbytes, queue)
                        if nbytes else b""]
            # the first chunk now, so that its failure is this call's reply
            first = self._read_chunk(seq, target, offset, nbytes, queue)
            return Reply(seq, None, [nbytes],
                         ReadPlan(self, seq, target, queue, offset, nbytes, first))
        return self._sync(seq, "read", run)

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
            self._bind(seq, "load_module", client_id, module)

    def _function(self, seq: int, client_id: int, module: int, name: str) -> None:
        found = self._lookup(seq, "function", (Module, module))
        fn = self._async(seq, "function", self.device.function, found[0], name) if found else None
        if fn is not None:
            self._bind(seq, "function", client_id, fn)

    def _launch(self, seq: int, fn: int, grid: list, block: list, shared: int, stream: int,
                args: list) -> None:
        try:
            function = self.handles.get(Function, fn)
            target = self.handles.get(Stream, stream)
            if args:
                last = self._last_args.get(fn)
                if last is not None and last[0] == args:    # a launch loop: the same again
                    kernel_args = last[1]
                else:
                    kernel_args = self._kernel_args(args)
                    if _same_means_equal(kernel_args):
                        self._last_args[fn] = (args, kernel_args)
                    else:
                        self._last_args.pop(fn, None)
            else:
                kernel_args = []
        except HarpError as exc:
            self.errors.add(exc, "launch", seq)
            self._settle()         # a refused launch runs nothing: it ends the run
            return
        self.backend_calls += 1                     # `_async`, inline: launches are hot
        self.seqmap.note(self.backend_calls, seq)
        try:
            self.device.launch(function, tuple(grid), tuple(block), kernel_args, shared,
                               target)
        except (HarpError, TypeError, ValueError, OverflowError) as exc:
            self.errors.add(_as_harp(exc), "launch", seq)

    def _kernel_args(self, args: list) -> list:
        """A launch's kernel arguments from their checked wire form, those made before
        taken from `_known_args`."""
        known = self._known_args
        kernel_args = []
        for a in args:
            value = a[1]
            if a[0] == wire.ARG_ARRAY or (value == 0 and type(value) is float):
                kernel_args.append(self._arg(a))        # -0.0 == 0.0: not a key
                continue
            key = (type(value), value, a[2], a[0])
            arg = known.get(key)
            if arg is None:
                arg = self._arg(a)
                if len(known) >= _KNOWN_ARGS:
                    known.clear()
                known[key] = arg
            kernel_args.append(arg)
        return kernel_args

    def _arg(self, a: list) -> Any:
        """A kernel argument whose shape `wire.check_record` has checked."""
        tag = a[0]
        if tag == wire.ARG_BUFFER:
            return BufferArg(self.handles.get(Buffer, a[1]), a[2])
        try:
            if tag == wire.ARG_SCALAR:
                return Scalar(a[1], a[2])
            return ArrayArg(self.handles.get(Buffer, a[1]), a[2], tuple(a[3]), a[4],
                            tuple(a[5]) if a[5] is not None else None)
        except HarpError:
            raise
        except (TypeError, ValueError) as exc:
            raise ArgumentError(f"kernel argument: {exc}") from None

    # -- order -----------------------------------------------------------------
    def _stream(self, seq: int, client_id: int) -> None:
        stream = self._async(seq, "stream", self.device.stream)
        if stream is not None:
            self._bind(seq, "stream", client_id, stream)

    def _event(self, seq: int, client_id: int) -> None:
        event = self._async(seq, "event", self.device.event)
        if event is not None:
            self._bind(seq, "event", client_id, event)

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
            target = None
            if stream is not None:
                try:
                    target = self.handles.get(Stream, stream)
                except HarpError as exc:
                    raise self._refused(seq, exc)
            self._backend_call(seq)
            self.device.synchronize(target)
        reply = self._sync(seq, "synchronize", run)
        if stream is None and reply.error is None:
            self.drained_seq = seq
        return reply

    def drained(self) -> bool:
        """Nothing is queued, running or failed since the last call, which drained the
        device: until the next call, another whole-device synchronize could only succeed."""
        return self.drained_seq == self.last_seq and self._sink is None and not self.closed

    def synchronized_elsewhere(self, seq: int) -> None:
        """A whole-device synchronize `seq` was answered for this session without it (the
        pool server's relay, while the session stayed drained): number it as if run here."""
        if seq > self.last_seq:                 # counted by the relay that answered it
            self.last_seq = self.drained_seq = seq

    def _elapsed(self, seq: int, start: int, end: int) -> Reply:
        def run() -> float:
            try:
                a, b = self.handles.get(Event, start), self.handles.get(Event, end)
            except HarpError as exc:
                raise self._refused(seq, exc)
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
            if self.window is not None:
                self.window.closed = True        # a wait on the window ends; unmapped later


def _same_means_equal(kernel_args: list) -> bool:
    """Whether wire arguments equal to those these were made of must make the same kernel
    arguments. Equal wire values of other types (1, 1.0, True) make the same scalar of a
    dtype; a zero does not where the dtype is floating (0 == -0.0, whose sign a kernel
    sees)."""
    for arg in kernel_args:
        if type(arg) is Scalar and arg.value == 0 and arg.dtype.startswith("float"):
            return False
    return True


def _named(error: HarpError, call: str, seq: int) -> HarpError:
    if error.call is None:
        error.call, error.seq = call, seq
    return error


def _as_harp(exc: BaseException) -> HarpError:
    if isinstance(exc, HarpError):
        return exc
    if isinstance(exc, (TypeError, ValueError, OverflowError)):
        return ArgumentError(f"{type(exc).__name__}: {exc}")
    return InternalError(f"{type(exc).__name__}: {exc}")


_LAUNCH = wire.LAUNCH


def _nothing() -> None:
    """`settle` for a device that has none (a wrapper of its own): nothing is held."""
