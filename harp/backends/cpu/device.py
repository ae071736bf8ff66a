"""`CpuDevice`: one session on a cpu card, a real host-memory device.

Buffers are host memory, reserved from the session's `MemoryBroker` before
they are allocated; streams are in-order queues run by a few pool threads per
session (`streams.Executor`); events carry real timestamps; kernels are the
NumPy catalog or numba source in the CUDA simulator, each run holding the
session's `ComputeGate` and charged its run time. Handles are checked against
this session's own tables, so another session's handles are unknown here.
"""
from __future__ import annotations

import math

from typing import Any, Sequence

import numpy as np

from ... import catalog
from ...device import Device, Dims
from ...errors import (ArgumentError, DeviceError, HarpError, InvalidHandleError,
                       PermissionDeniedError, QuotaError, UnsupportedError)
from ...frontend import (DeferredErrors, HandleIds, as_bytes_view, check_buffer, check_copy,
                         check_count, check_dims, check_event, check_fill, check_format,
                         check_function, check_image, check_kernel_name, check_module,
                         check_range, check_stream, normalize_args, out_view)
from ...limits import MAX_BUFFERS, MAX_EVENTS, MAX_FUNCTIONS, MAX_MODULES, MAX_STREAMS
from ...tenancy import ComputeGate, MemoryBroker
from ...types import (ArrayArg, Buffer, BufferArg, DeviceInfo, Event, Function, MemInfo, Module,
                      Scalar, Stream)
from .card import CpuCard
from .kernels import catalog_function, check_catalog_args, load_numba_source, numba_runner
from .streams import Executor, Recording, StreamQueue


class CpuDevice(Device):
    """A session on a `CpuCard`: its own handles, streams, quota and deferred errors."""

    def __init__(self, card: CpuCard, info: DeviceInfo, memory: MemoryBroker, *,
                 compute: ComputeGate | None = None, trust_client_code: bool = False) -> None:
        self._card = card
        self._memory = memory
        self._gate = compute
        self._trusted = trust_client_code
        self._info = info
        self._ids = HandleIds()
        self._errors = DeferredErrors()
        self._seq = 0
        self._used = 0
        self._closed = False
        self._buffers: dict[int, np.ndarray] = {}
        self._modules: dict[int, tuple[str, Any, int]] = {}  # id -> (format, payload, bytes)
        self._functions: dict[int, tuple[Any, Any]] = {}   # id -> (catalog kernel | None, runner)
        self._events: dict[int, Recording | None] = {}
        self._executor = Executor(f"harp-cpu{card.index}", self._on_async_error, gate=compute)
        self._streams: dict[int, StreamQueue] = {0: self._executor.stream("default")}

    # -- internals -------------------------------------------------------------
    def _on_async_error(self, exc: BaseException, call: str, seq: int) -> None:
        if not isinstance(exc, HarpError):
            exc = DeviceError(f"{type(exc).__name__}: {exc}")
        self._errors.add(exc, call, seq)

    def _next(self) -> int:
        if self._closed:
            raise HarpError("the device session is closed")
        self._seq += 1
        return self._seq

    def _mem(self, buf: Buffer) -> np.ndarray:
        mem = self._buffers.get(buf.id)
        if mem is None:
            raise InvalidHandleError(f"buffer handle {buf.id:#x} is not allocated in this session "
                                     "(freed, failed to allocate, or another session's)")
        return mem

    def _span(self, buf: Buffer, offset: int, nbytes: int, what: str) -> np.ndarray:
        """The bytes [offset, offset+nbytes) of a live buffer, checked against its real size
        (a forged handle may claim more bytes than were allocated)."""
        mem = self._mem(buf)
        if offset + nbytes > mem.size:
            raise ArgumentError(f"{what} [{offset}, {offset + nbytes}) is outside the buffer of "
                                f"{mem.size} bytes")
        return mem[offset:offset + nbytes]

    def _stream(self, stream: Stream) -> StreamQueue:
        worker = self._streams.get(stream.id)
        if worker is None:
            raise InvalidHandleError(f"stream handle {stream.id:#x} is not this session's")
        return worker

    def _recording(self, event: Event) -> Recording | None:
        if event.id not in self._events:
            raise InvalidHandleError(f"event handle {event.id:#x} is not this session's")
        return self._events[event.id]

    def _sync_wait(self, worker: StreamQueue, call: str, seq: int, op: Any, *args: Any) -> None:
        """Run `op` in order on `worker`, wait for it, and raise what failed.

        On an idle stream `op` runs here at once: nothing is ahead of it, and
        the round trip through the worker thread is the cost of a sync call.
        """
        failure: list[BaseException] = []

        def run() -> None:
            try:
                op(*args)
            except BaseException as exc:  # raised in the caller below
                failure.append(exc)
        if worker.idle:
            run()
        else:
            from threading import Event as Flag
            done = Flag()
            worker.submit(call, seq, lambda: (run(), done.set()))
            while not done.wait(0.5):
                if self._executor.cancelled:
                    raise HarpError("the device session is closed")
        self._errors.raise_pending()
        if failure:
            exc = failure[0]
            if not isinstance(exc, HarpError):
                exc = DeviceError(f"{type(exc).__name__}: {exc}")
            exc.call, exc.seq = call, seq
            raise exc

    # -- facts -----------------------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        return self._info

    def mem_info(self) -> MemInfo:
        self._next()
        self._errors.raise_pending()
        return self._memory.mem_info()

    # -- memory ----------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        seq = self._next()
        nbytes = check_count(nbytes, "nbytes")
        buf = Buffer(self._ids.new(), nbytes)
        try:
            if len(self._buffers) >= MAX_BUFFERS:
                raise QuotaError(f"a session may hold at most {MAX_BUFFERS} buffers")
            self._memory.reserve(nbytes)
            try:
                self._buffers[buf.id] = self._card.allocate(nbytes)
            except BaseException:
                self._memory.release(nbytes)
                raise
            self._used += nbytes
        except HarpError as exc:
            self._errors.add(exc, "alloc", seq)
        return buf

    def free(self, buf: Buffer) -> None:
        seq = self._next()
        check_buffer(buf)
        mem = self._buffers.pop(buf.id, None)
        if mem is None:
            self._errors.add(InvalidHandleError(
                f"buffer handle {buf.id:#x} is not allocated in this session (double free, "
                "or another session's)"), "free", seq)
            return
        self._used -= mem.size
        self._memory.release(mem.size)

    def write(self, buf: Buffer, offset: int, data: Any, stream: Stream | None = None) -> None:
        seq = self._next()
        view = as_bytes_view(data)
        offset, nbytes = check_range(buf, offset, view.nbytes, "write")
        stream = check_stream(stream)
        try:
            span, worker = self._span(buf, offset, nbytes, "write"), self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "write", seq)
            return
        if worker.idle:
            # Nothing is ahead of it on the stream: store now, in the caller's thread
            # (one copy, no hand-off to the worker).
            span[:] = np.frombuffer(view, np.uint8)
            return
        # bytes are immutable: keep a reference; anything else is copied now,
        # because the caller may reuse its buffer as soon as we return.
        src = np.frombuffer(view, np.uint8) if isinstance(view.obj, bytes) else \
            np.frombuffer(view, np.uint8).copy()
        worker.submit("write", seq, span.__setitem__, slice(None), src, nbytes=nbytes)

    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        seq = self._next()
        offset, nbytes = check_range(buf, offset, nbytes, "read")
        stream = check_stream(stream)
        dst = None if out is None else np.frombuffer(out_view(out, nbytes), np.uint8)
        try:
            span, worker = self._span(buf, offset, nbytes, "read"), self._stream(stream)
        except HarpError as exc:
            self._errors.raise_pending()
            exc.call, exc.seq = "read", seq
            raise
        if dst is not None:
            self._sync_wait(worker, "read", seq, np.copyto, dst, span)
            return out
        got: list[bytes] = []
        self._sync_wait(worker, "read", seq, lambda: got.append(span.tobytes()))
        return got[0]

    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int,
             stream: Stream | None = None) -> None:
        seq = self._next()
        dst_offset, src_offset, nbytes = check_copy(dst, dst_offset, src, src_offset, nbytes)
        stream = check_stream(stream)
        try:
            dspan = self._span(dst, dst_offset, nbytes, "copy destination")
            sspan = self._span(src, src_offset, nbytes, "copy source")
            worker = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "copy", seq)
            return
        worker.submit("copy", seq, np.copyto, dspan, sspan)

    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        seq = self._next()
        value, offset, nbytes = check_fill(buf, value, offset, nbytes)
        stream = check_stream(stream)
        try:
            span, worker = self._span(buf, offset, nbytes, "fill"), self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "fill", seq)
            return
        worker.submit("fill", seq, span.fill, value)

    # -- code ------------------------------------------------------------------
    def load_module(self, image: bytes | str, format: str) -> Module:
        seq = self._next()
        image = check_image(image)
        module = Module(self._ids.new(), check_format(format))
        try:
            if len(self._modules) >= MAX_MODULES:
                raise QuotaError(f"a session may hold at most {MAX_MODULES} modules")
            # What the device keeps of a module counts against the session's memory.
            kept = 0 if format == "catalog" else len(image)
            self._memory.reserve(kept)
            try:
                self._modules[module.id] = (module.format, self._load(image, module.format), kept)
            except BaseException:
                self._memory.release(kept)
                raise
        except HarpError as exc:
            self._errors.add(exc, "load_module", seq)
        return module

    def _load(self, image: bytes | str, format: str) -> Any:
        if format == "catalog":
            raw = image.encode() if isinstance(image, str) else image
            if raw != catalog.CATALOG_IMAGE:
                raise ArgumentError(f"unknown catalog image {raw[:40]!r}; this device has "
                                    f"{catalog.CATALOG_IMAGE!r}")
            return None
        if format == "numba-python":
            if not self._trusted:
                raise PermissionDeniedError(
                    "numba-python modules run client Python code on this host; the device refuses "
                    "them unless opened with trust_client_code=True (a pool server: --trust-client-code)"
                    " — for development and tests only")
            source = image.decode("utf-8", "replace") if isinstance(image, bytes) else image
            return load_numba_source(source)
        raise UnsupportedError(f"this cpu device does not accept {format!r} images; "
                               f"it accepts {', '.join(self._info.formats)}")

    def function(self, module: Module, name: str) -> Function:
        seq = self._next()
        check_module(module)
        fn = Function(self._ids.new(), check_kernel_name(name))
        try:
            if len(self._functions) >= MAX_FUNCTIONS:
                raise QuotaError(f"a session may hold at most {MAX_FUNCTIONS} functions")
            entry = self._modules.get(module.id)
            if entry is None:
                raise InvalidHandleError(f"module handle {module.id:#x} is not loaded in this "
                                         "session")
            format, payload, _ = entry
            if format == "catalog":
                self._functions[fn.id] = catalog_function(fn.name)
            else:
                kernel = payload.get(fn.name)
                if kernel is None:
                    raise ArgumentError(f"module has no kernel {fn.name!r}; it has "
                                        f"{', '.join(sorted(payload)) or 'none'}")
                self._functions[fn.id] = (None, numba_runner(kernel))
        except HarpError as exc:
            self._errors.add(exc, "function", seq)
        return fn

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        seq = self._next()
        check_function(fn)
        grid3, block3 = check_dims(grid, "grid"), check_dims(block, "block")
        shared_mem = check_count(shared_mem, "shared_mem")
        args = normalize_args(args)
        stream = check_stream(stream)
        try:
            entry = self._functions.get(fn.id)
            if entry is None:
                raise InvalidHandleError(f"function handle {fn.id:#x} is not this session's")
            kernel, runner = entry
            if kernel is not None:
                check_catalog_args(kernel, args)
            resolved = [self._resolve(a) for a in args]
            worker = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "launch", seq)
            return
        worker.submit("launch", seq, runner, grid3, block3, shared_mem, resolved, kernel=True)

    def _resolve(self, arg: Any) -> Any:
        """A kernel argument as the cpu kernels take it: (memory, offset), an array view,
        or a NumPy scalar of its dtype (a value that does not fit is an ArgumentError)."""
        t = type(arg)
        if t is BufferArg:                      # the common kinds first, without the slow
            mem = self._buffers.get(arg.buffer.id)   # paths' checks (launches are hot)
            offset = arg.offset
            if mem is not None and type(offset) is int and 0 <= offset <= mem.size:
                return (mem, offset)
        elif t is Scalar:
            value = _fast_scalar(arg.value, arg.dtype)
            if value is not None:
                return value
        if isinstance(arg, BufferArg):
            mem = self._mem(arg.buffer)
            offset = check_count(arg.offset, "argument offset")
            if offset > mem.size:
                raise ArgumentError(f"argument offset {offset} is past the end of a buffer of "
                                    f"{mem.size} bytes")
            return (mem, offset)
        if isinstance(arg, ArrayArg):
            mem = self._mem(arg.buffer)
            dtype = np.dtype(arg.dtype)
            try:
                return np.ndarray(arg.shape, dtype, buffer=mem, offset=arg.offset,
                                  strides=arg.strides)
            except (TypeError, ValueError) as exc:
                raise ArgumentError(f"array argument {arg.dtype}{list(arg.shape)} at offset "
                                    f"{arg.offset} does not fit its buffer of {mem.size} bytes: "
                                    f"{exc}") from None
        if isinstance(arg, Scalar):
            try:
                with np.errstate(over="raise"):
                    return np.dtype(arg.dtype).type(arg.value)
            except (OverflowError, FloatingPointError, ValueError, TypeError) as exc:
                raise ArgumentError(f"scalar {arg.value!r} does not fit {arg.dtype}: {exc}") \
                    from None
        raise ArgumentError(f"unknown kernel argument {arg!r}")

    # -- order -----------------------------------------------------------------
    def stream(self) -> Stream:
        seq = self._next()
        stream = Stream(self._ids.new())
        if len(self._streams) > MAX_STREAMS:          # the default stream is not counted
            self._errors.add(QuotaError(f"a session may have at most {MAX_STREAMS} streams"),
                             "stream", seq)
        else:
            self._streams[stream.id] = self._executor.stream(f"s{len(self._streams)}")
        return stream

    def event(self) -> Event:
        seq = self._next()
        event = Event(self._ids.new())
        if len(self._events) >= MAX_EVENTS:
            self._errors.add(QuotaError(f"a session may have at most {MAX_EVENTS} events"),
                             "event", seq)
        else:
            self._events[event.id] = None
        return event

    def record(self, event: Event, stream: Stream | None = None) -> None:
        seq = self._next()
        check_event(event)
        stream = check_stream(stream)
        try:
            self._recording(event)
            worker = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "record", seq)
            return
        recording = Recording()
        self._events[event.id] = recording
        worker.submit("record", seq, recording.complete)

    def wait(self, stream: Stream, event: Event) -> None:
        seq = self._next()
        stream = check_stream(stream)
        check_event(event)
        try:
            recording = self._recording(event)
            worker = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "wait", seq)
            return
        if recording is not None:   # an event never recorded is complete, as in CUDA
            worker.wait_for("wait", seq, recording)

    def synchronize(self, stream: Stream | None = None) -> None:
        seq = self._next()
        if stream is None:
            for worker in list(self._streams.values()):
                worker.drain()
        else:
            try:
                worker = self._stream(check_stream(stream))
            except HarpError as exc:
                self._errors.raise_pending()
                exc.call, exc.seq = "synchronize", seq
                raise
            worker.drain()
        self._errors.raise_pending()

    def elapsed(self, start: Event, end: Event) -> float:
        seq = self._next()
        check_event(start)
        check_event(end)
        try:
            recordings = [self._recording(start), self._recording(end)]
            if any(r is None for r in recordings):
                raise ArgumentError("elapsed needs two events that have been recorded")
        except HarpError as exc:
            self._errors.raise_pending()
            exc.call, exc.seq = "elapsed", seq
            raise
        for r in recordings:
            while not r.done.wait(0.5):
                if self._executor.cancelled:
                    raise HarpError("the device session is closed")
        self._errors.raise_pending()
        return (recordings[1].time_ns - recordings[0].time_ns) / 1e6

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """Drop queued work (an operation already running finishes on its own thread; its
        host memory stays referenced until then, so nothing is reused under it), and give
        back every byte the session reserved."""
        if self._closed:
            return
        self._closed = True
        self._executor.cancel()
        self._buffers.clear()
        self._modules.clear()
        self._functions.clear()
        self._used = 0
        self._memory.close()
        if self._gate is not None:
            self._gate.close()

    @property
    def used_bytes(self) -> int:
        """Bytes this session holds (for the server's accounting and tests)."""
        return self._used


#: dtype name -> (NumPy type, lowest, highest) for integer dtypes, (type, None, None) for
#: floating ones: scalars of these convert without NumPy's error-state machinery.
_SCALAR_KINDS: dict[str, tuple[Any, Any, Any]] = {}
for _name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
    _info = np.iinfo(_name)
    _SCALAR_KINDS[_name] = (np.dtype(_name).type, int(_info.min), int(_info.max))
for _name in ("float16", "float32", "float64"):
    _SCALAR_KINDS[_name] = (np.dtype(_name).type, None, None)


def _fast_scalar(value: Any, dtype: str) -> Any:
    """`value` as a NumPy scalar of `dtype` when that is plain (an int in range, a finite
    float well inside the dtype's range); None to take the checked slow path."""
    kind = _SCALAR_KINDS.get(dtype)
    if kind is None:
        return None
    make, lo, hi = kind
    t = type(value)
    if lo is not None:
        return make(value) if t is int and lo <= value <= hi else None
    if t is int:
        if -_EXACT <= value <= _EXACT and (dtype != "float16" or -65504 < value < 65504):
            return make(value)
    elif t is float and math.isfinite(value):
        a = abs(value)
        if dtype == "float64" or a < _FLOAT_BELOW.get(dtype, 0.0):
            return make(value)
    return None


_EXACT = 1 << 53
_FLOAT_BELOW = {"float32": 3.4e38, "float16": 65504.0}
