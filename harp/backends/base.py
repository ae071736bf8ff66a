"""`BackendDevice`: the one in-process device session that every backend builds on.

A backend's session class derives from `BackendDevice` and writes only its
hooks: how to allocate and release device memory, store and fetch bytes, copy
and fill, load an image, find a kernel, check and issue a launch, make streams
and events, wait for them, and shut down. Everything that must be the same on
every device lives here, once:

- **Numbering.** Every call, sync or async, takes the next sequence number
  (`_next`), after the closed check; a deferred error names its call and number.
- **Checks.** Argument shapes are checked at once with `harp.frontend`'s
  checks (the same as the remote client's), before any device state is read.
- **Handles.** Buffers, modules, functions, streams and events live in this
  session's own tables, keyed by ids with a per-session random prefix, so a
  forged handle or another session's is unknown here. Table sizes are capped
  (`harp.limits`).
- **Deferred errors.** An async call that fails while it is issued (unknown
  handle, a range past the real allocation, a driver refusal) keeps its error;
  the next sync call (`read`, `synchronize`, `elapsed`, `mem_info`) raises the
  earliest one with the later ones attached. A hook may raise anything: a
  non-HARP exception becomes the `HarpError` that `_failure` makes of it.
- **Memory.** Bytes are reserved from the session's `MemoryBroker` before a
  hook allocates them (the quota, the card's capacity), and so are the bytes of
  module images the device keeps.
- **Trust.** Formats that compile or run client code on the server
  (`CLIENT_CODE`) are refused unless the session trusts client code.
- **Close, the one rule for every device.** `close` does not wait for queued
  work: it stops issuing, drops what the backend can still drop (`_shutdown`),
  and gives every reserved byte back at once; a backend whose device already
  holds work keeps that memory away from other sessions until the work is done.

A backend's memory objects must have a `size` attribute (bytes); stream and
event states are whatever the backend's hooks make of them.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np

from .. import catalog
from ..device import Device, Dims
from ..errors import (ArgumentError, DeviceError, HarpError, InvalidHandleError,
                      PermissionDeniedError, QuotaError, UnsupportedError)
from ..frontend import (DeferredErrors, HandleIds, as_bytes_view, check_buffer, check_copy,
                        check_count, check_dims, check_event, check_fill, check_format,
                        check_function, check_image, check_kernel_name, check_module,
                        check_range, check_stream, normalize_args, out_view)
from ..limits import MAX_BUFFERS, MAX_EVENTS, MAX_FUNCTIONS, MAX_MODULES, MAX_STREAMS
from ..tenancy import ComputeGate, MemoryBroker
from ..types import (DEFAULT_STREAM, Buffer, BufferArg, DeviceInfo, Event, Function, MemInfo,
                     Module, Stream)

__all__ = ["BackendDevice", "Loaded", "CatalogSpan"]


class Loaded:
    """A loaded module: its format, what the backend made of its image, and the bytes of
    it that count against the session's memory."""

    __slots__ = ("format", "payload", "kept")

    def __init__(self, format: str, payload: Any, kept: int) -> None:
        self.format, self.payload, self.kept = format, payload, kept


class CatalogSpan:
    """A catalog kernel's buffer argument, checked: the memory, the byte offset, and the
    bytes the kernel touches from there."""

    __slots__ = ("mem", "offset", "nbytes")

    def __init__(self, mem: Any, offset: int, nbytes: int) -> None:
        self.mem, self.offset, self.nbytes = mem, offset, nbytes


class BackendDevice(Device):
    """A session on one device of an in-process backend (see the module docstring)."""

    #: Image formats whose code runs on the server, each with the refusal a session that
    #: does not trust client code gives (a backend sets its own).
    CLIENT_CODE: dict[str, str] = {}
    #: Whether catalog buffers must be aligned to their element size (a GPU faults on
    #: misaligned element access; host memory does not care).
    ALIGNED_CATALOG = False

    def __init__(self, info: DeviceInfo, memory: MemoryBroker, *, card: Any = None,
                 compute: ComputeGate | None = None, trust_client_code: bool = False) -> None:
        self._card = card
        self._info = info
        self._memory = memory
        self._gate = compute
        self._trusted = trust_client_code
        self._ids = HandleIds()
        self._errors = DeferredErrors()
        self._seq = 0
        self._used = 0
        self._closed = False
        self._buffers: dict[int, Any] = {}
        self._modules: dict[int, Loaded] = {}
        self._functions: dict[int, Any] = {}
        self._events: dict[int, Any] = {}
        #: stream id -> the backend's stream state; `_open` puts the default stream at 0.
        self._streams: dict[int, Any] = {}
        self._open()

    # -- the hooks a backend writes ------------------------------------------------------
    def _open(self) -> None:
        """Start the session on `self._card`: the default stream at id 0, and whatever
        else the backend keeps per session (raise `DeviceError` when it cannot)."""

    @abc.abstractmethod
    def _allocate(self, nbytes: int) -> Any:
        """Device memory of `nbytes` (zeroed: no tenant sees another's bytes)."""

    def _release(self, mem: Any, seq: int) -> None:
        """Give `mem` back (after the work that may still touch it, where the device has
        work in hand)."""

    @abc.abstractmethod
    def _store(self, stream: Any, mem: Any, offset: int, view: memoryview, seq: int) -> None:
        """Queue a write of `view` at `offset` of `mem` on `stream`. The caller may reuse its
        buffer as soon as this returns."""

    @abc.abstractmethod
    def _fetch(self, stream: Any, mem: Any, offset: int, nbytes: int,
               dst: np.ndarray | None) -> bytes | None:
        """Read `nbytes` at `offset` of `mem` after the work queued on `stream`: into `dst`
        (uint8) when given, else as the bytes returned."""

    @abc.abstractmethod
    def _copy(self, stream: Any, dst: Any, dst_offset: int, src: Any, src_offset: int,
              nbytes: int, seq: int) -> None:
        """Queue a copy (memmove semantics within one buffer)."""

    @abc.abstractmethod
    def _fill(self, stream: Any, mem: Any, offset: int, nbytes: int, value: int,
              seq: int) -> None:
        """Queue setting `nbytes` at `offset` to the byte `value`."""

    def _load_catalog(self) -> Any:
        """What the catalog module is on this device (compile it once, say)."""
        return None

    def _load(self, image: bytes | str, format: str) -> Any:
        """What a module image of an accepted, allowed `format` is on this device."""
        raise UnsupportedError(self._unsupported(format))

    @abc.abstractmethod
    def _catalog_target(self, kernel: catalog.Kernel) -> Any:
        """The function-table entry of a catalog kernel."""

    def _installed_target(self, name: str) -> Any:
        """The function-table entry of a kernel the operator installed on this device
        (found in the catalog module beside the catalog's own), or None."""
        return None

    def _lookup(self, loaded: Loaded, name: str) -> Any:
        """The function-table entry of kernel `name` of a loaded (non-catalog) module."""
        raise ArgumentError(f"module has no kernel {name!r}")

    @abc.abstractmethod
    def _prepare(self, target: Any, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: list) -> Any:
        """Check a launch against the real device state (raise `HarpError` to defer it) and
        return what `_launch` needs."""

    @abc.abstractmethod
    def _launch(self, stream: Any, target: Any, prepared: Any, grid: tuple[int, int, int],
                block: tuple[int, int, int], shared_mem: int, seq: int) -> None:
        """Queue the launch on `stream`."""

    @abc.abstractmethod
    def _new_stream(self) -> Any:
        """A new stream's state (an in-order queue of this device)."""

    @abc.abstractmethod
    def _new_event(self) -> Any:
        """A new event's state, never recorded yet."""

    @abc.abstractmethod
    def _record(self, event: Any, stream: Any, seq: int) -> None:
        """Queue a recording of `event` on `stream` (it replaces the latest one)."""

    @abc.abstractmethod
    def _recorded(self, event: Any) -> bool:
        """Whether `event` has been recorded (an event never recorded is complete)."""

    @abc.abstractmethod
    def _wait_event(self, stream: Any, event: Any, seq: int) -> None:
        """Make later work on `stream` wait for the latest recording of `event`."""

    @abc.abstractmethod
    def _sync_stream(self, stream: Any) -> None:
        """Block until the work queued on `stream` is done; raise what failed on it."""

    def _sync_all(self) -> None:
        """Block until every stream is done (raise the first failure after trying them all)."""
        failure: BaseException | None = None
        for state in list(self._streams.values()):
            try:
                self._sync_stream(state)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    @abc.abstractmethod
    def _elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two recorded events, once both are done."""

    def _shutdown(self) -> None:
        """Stop issuing work, drop what is still droppable, and release device resources
        (called once, by `close`, before the tables are cleared)."""

    def _check_usable(self) -> None:
        """Raise when the device can no longer run anything (a lost GPU context)."""

    def _failure(self, exc: BaseException, call: str, seq: int) -> HarpError:
        """What `exc`, raised by a hook of `call`, is reported as."""
        err = exc if isinstance(exc, HarpError) else DeviceError(f"{type(exc).__name__}: {exc}")
        if err.call is None:
            err.call, err.seq = call, seq
        return err

    def _unsupported(self, format: str) -> str:
        return (f"this {self._info.backend} device does not accept {format!r} images; "
                f"it accepts {', '.join(self._info.formats)}")

    def _module_bytes(self, image: bytes | str, format: str) -> int:
        """Bytes of a module image the device keeps (counted against the session's memory)."""
        return 0 if format == "catalog" else len(image)

    # -- the shared prologue ---------------------------------------------------------------
    def _next(self) -> int:
        if self._closed:
            raise HarpError("the device session is closed")
        self._check_usable()
        self._seq += 1
        return self._seq

    def _defer(self, exc: BaseException, call: str, seq: int) -> None:
        """Keep the failure of an async call for the next sync call."""
        err = self._failure(exc, call, seq)
        self._errors.add(err, err.call or call, err.seq if err.seq is not None else seq)

    def _raise_sync(self, exc: BaseException, call: str, seq: int) -> None:
        """A sync call failed: raise the earliest failure pending, this one included."""
        self._defer(exc, call, seq)
        self._errors.raise_pending()

    def _raise_now(self, exc: HarpError, call: str, seq: int) -> None:
        """A sync call's own handle is bad: earlier failures first, then this one."""
        self._errors.raise_pending()
        exc.call, exc.seq = call, seq
        raise exc

    def _mem(self, buf: Buffer) -> Any:
        mem = self._buffers.get(buf.id)
        if mem is None:
            raise InvalidHandleError(f"buffer handle {buf.id:#x} is not allocated in this session "
                                     "(freed, failed to allocate, or another session's)")
        return mem

    def _span(self, buf: Buffer, offset: int, nbytes: int, what: str) -> Any:
        """The memory of a live buffer with [offset, offset+nbytes) checked against its real
        size (a forged handle may claim more bytes than were allocated)."""
        mem = self._mem(buf)
        if offset + nbytes > mem.size:
            raise ArgumentError(f"{what} [{offset}, {offset + nbytes}) is outside the buffer of "
                                f"{mem.size} bytes")
        return mem

    def _stream(self, stream: Stream) -> Any:
        state = self._streams.get(stream.id)
        if state is None:
            raise InvalidHandleError(f"stream handle {stream.id:#x} is not this session's")
        return state

    def _event(self, event: Event) -> Any:
        if event.id not in self._events:
            raise InvalidHandleError(f"event handle {event.id:#x} is not this session's")
        return self._events[event.id]

    def _arg_memory(self, arg: BufferArg) -> tuple[Any, int]:
        """A buffer argument's memory and offset, the offset checked against its real size."""
        mem = self._mem(arg.buffer)
        offset = check_count(arg.offset, "argument offset")
        if offset > mem.size:
            raise ArgumentError(f"argument offset {offset} is past the end of a buffer of "
                                f"{mem.size} bytes")
        return mem, offset

    def _catalog_spans(self, kernel: catalog.Kernel, args: list) -> tuple[list, dict[str, Any]]:
        """A catalog launch checked in full against the real buffers: each argument as a
        `CatalogSpan` (buffers) or a NumPy scalar of its dtype, and the scalars by name."""
        catalog.check_args(kernel, args)
        params = kernel.op.params
        values = {p.name: catalog.scalar_value(a.value, kernel.param_dtype(p))
                  for p, a in zip(params, args) if p.kind == "scalar"}
        need = catalog.elements_needed(kernel, {k: int(values[k]) for k in ("n", "m", "k")
                                                if k in values})
        itemsize = np.dtype(kernel.dtype).itemsize if kernel.dtype else 1
        out: list = []
        for p, arg in zip(params, args):
            if p.kind == "scalar":
                out.append(values[p.name])
                continue
            mem, offset = self._arg_memory(arg)
            nbytes = need[p.name] * itemsize
            if offset + nbytes > mem.size:
                raise ArgumentError(f"{kernel.name}: {p.name} needs {nbytes} bytes at offset "
                                    f"{offset}, but its buffer has {mem.size}")
            if self.ALIGNED_CATALOG and nbytes and offset % itemsize:
                raise ArgumentError(f"{kernel.name}: {p.name} at byte offset {offset} is not "
                                    f"aligned to its {itemsize}-byte elements (this device "
                                    "needs it)")
            out.append(CatalogSpan(mem, offset, nbytes))
        return out, values

    # -- facts -----------------------------------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        return self._info

    def mem_info(self) -> MemInfo:
        self._next()
        self._errors.raise_pending()
        return self._memory.mem_info()

    @property
    def used_bytes(self) -> int:
        """Bytes of buffers this session holds (for the server's accounting and tests)."""
        return self._used

    # -- memory ----------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> Buffer:
        seq = self._next()
        nbytes = check_count(nbytes, "nbytes")
        buf = Buffer(self._ids.new(), nbytes)
        try:
            if len(self._buffers) >= MAX_BUFFERS:
                raise QuotaError(f"a session may hold at most {MAX_BUFFERS} buffers")
            self._memory.reserve(nbytes)
            try:
                self._buffers[buf.id] = self._allocate(nbytes)
            except BaseException:
                self._memory.release(nbytes)
                raise
            self._used += nbytes
        except Exception as exc:
            self._defer(exc, "alloc", seq)
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
        try:
            self._release(mem, seq)
        except Exception as exc:
            self._defer(exc, "free", seq)

    def write(self, buf: Buffer, offset: int, data: Any, stream: Stream | None = None) -> None:
        seq = self._next()
        view = as_bytes_view(data)
        offset, nbytes = check_range(buf, offset, view.nbytes, "write")
        stream = check_stream(stream)
        try:
            mem, state = self._span(buf, offset, nbytes, "write"), self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "write", seq)
            return
        if nbytes == 0:
            return
        try:
            self._store(state, mem, offset, view, seq)
        except Exception as exc:
            self._defer(exc, "write", seq)

    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        seq = self._next()
        offset, nbytes = check_range(buf, offset, nbytes, "read")
        stream = check_stream(stream)
        dst = None if out is None else np.frombuffer(out_view(out, nbytes), np.uint8)
        try:
            mem, state = self._span(buf, offset, nbytes, "read"), self._stream(stream)
        except HarpError as exc:
            self._raise_now(exc, "read", seq)
        got = None
        try:
            got = self._fetch(state, mem, offset, nbytes, dst)
        except Exception as exc:
            self._raise_sync(exc, "read", seq)
        self._errors.raise_pending()
        return out if out is not None else got

    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int,
             stream: Stream | None = None) -> None:
        seq = self._next()
        dst_offset, src_offset, nbytes = check_copy(dst, dst_offset, src, src_offset, nbytes)
        stream = check_stream(stream)
        try:
            to = self._span(dst, dst_offset, nbytes, "copy destination")
            frm = self._span(src, src_offset, nbytes, "copy source")
            state = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "copy", seq)
            return
        if nbytes == 0 or (to is frm and dst_offset == src_offset):
            return
        try:
            self._copy(state, to, dst_offset, frm, src_offset, nbytes, seq)
        except Exception as exc:
            self._defer(exc, "copy", seq)

    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        seq = self._next()
        value, offset, nbytes = check_fill(buf, value, offset, nbytes)
        stream = check_stream(stream)
        try:
            mem, state = self._span(buf, offset, nbytes, "fill"), self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "fill", seq)
            return
        if nbytes == 0:
            return
        try:
            self._fill(state, mem, offset, nbytes, value, seq)
        except Exception as exc:
            self._defer(exc, "fill", seq)

    # -- code ------------------------------------------------------------------------------
    def load_module(self, image: bytes | str, format: str) -> Module:
        seq = self._next()
        raw = check_image(image)
        module = Module(self._ids.new(), check_format(format))
        try:
            if len(self._modules) >= MAX_MODULES:
                raise QuotaError(f"a session may hold at most {MAX_MODULES} modules")
            kept = self._module_bytes(raw, module.format)
            self._memory.reserve(kept)            # what the device keeps counts as memory
            try:
                payload = self._load_checked(raw, module.format)
            except BaseException:
                self._memory.release(kept)
                raise
            self._modules[module.id] = Loaded(module.format, payload, kept)
        except Exception as exc:
            self._defer(exc, "load_module", seq)
        return module

    def _load_checked(self, image: bytes | str, format: str) -> Any:
        if format == "catalog":
            raw = image.encode() if isinstance(image, str) else image
            if raw != catalog.CATALOG_IMAGE:
                raise ArgumentError(f"unknown catalog image {raw[:40]!r}; this device has "
                                    f"{catalog.CATALOG_IMAGE!r}")
            return self._load_catalog()
        if format in self.CLIENT_CODE and not self._trusted:
            raise PermissionDeniedError(self.CLIENT_CODE[format])
        if format not in self._info.formats:
            raise UnsupportedError(self._unsupported(format))
        return self._load(image, format)

    def function(self, module: Module, name: str) -> Function:
        seq = self._next()
        check_module(module)
        fn = Function(self._ids.new(), check_kernel_name(name))
        try:
            if len(self._functions) >= MAX_FUNCTIONS:
                raise QuotaError(f"a session may hold at most {MAX_FUNCTIONS} functions")
            loaded = self._modules.get(module.id)
            if loaded is None:
                raise InvalidHandleError(f"module handle {module.id:#x} is not loaded in this "
                                         "session")
            if loaded.format == "catalog":
                kernel = catalog.KERNELS.get(fn.name)
                target = self._catalog_target(kernel) if kernel is not None else \
                    self._installed_target(fn.name)
                if target is None:
                    raise ArgumentError(f"the catalog has no kernel {fn.name!r}")
                self._functions[fn.id] = target
            else:
                self._functions[fn.id] = self._lookup(loaded, fn.name)
        except Exception as exc:
            self._defer(exc, "function", seq)
        return fn

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        seq = self._next()
        if type(fn) is not Function:          # the plain kinds pass with one test each
            check_function(fn)
        grid3, block3 = check_dims(grid, "grid"), check_dims(block, "block")
        if type(shared_mem) is not int or shared_mem < 0:
            shared_mem = check_count(shared_mem, "shared_mem")
        args = normalize_args(args)
        stream = DEFAULT_STREAM if stream is None else check_stream(stream)
        try:
            target = self._functions.get(fn.id)
            if target is None:
                raise InvalidHandleError(f"function handle {fn.id:#x} is not this session's")
            state = self._stream(stream)
            prepared = self._prepare(target, grid3, block3, args)
        except HarpError as exc:
            self._errors.add(exc, "launch", seq)
            self._launch_refused()
            return
        try:
            self._launch(state, target, prepared, grid3, block3, shared_mem, seq)
        except Exception as exc:
            self._defer(exc, "launch", seq)

    # -- order -----------------------------------------------------------------------------
    def stream(self) -> Stream:
        seq = self._next()
        stream = Stream(self._ids.new())
        try:
            if len(self._streams) > MAX_STREAMS:          # the default stream is not counted
                raise QuotaError(f"a session may have at most {MAX_STREAMS} streams")
            self._streams[stream.id] = self._new_stream()
        except Exception as exc:
            self._defer(exc, "stream", seq)
        return stream

    def event(self) -> Event:
        seq = self._next()
        event = Event(self._ids.new())
        try:
            if len(self._events) >= MAX_EVENTS:
                raise QuotaError(f"a session may have at most {MAX_EVENTS} events")
            self._events[event.id] = self._new_event()
        except Exception as exc:
            self._defer(exc, "event", seq)
        return event

    def record(self, event: Event, stream: Stream | None = None) -> None:
        seq = self._next()
        check_event(event)
        stream = check_stream(stream)
        try:
            state = self._event(event)
            target = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "record", seq)
            return
        try:
            self._record(state, target, seq)
        except Exception as exc:
            self._defer(exc, "record", seq)

    def wait(self, stream: Stream, event: Event) -> None:
        seq = self._next()
        stream = check_stream(stream)
        check_event(event)
        try:
            state = self._event(event)
            target = self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "wait", seq)
            return
        if not self._recorded(state):     # an event never recorded is complete, as in CUDA
            return
        try:
            self._wait_event(target, state, seq)
        except Exception as exc:
            self._defer(exc, "wait", seq)

    def synchronize(self, stream: Stream | None = None) -> None:
        seq = self._next()
        if stream is None:
            try:
                self._sync_all()
            except Exception as exc:
                self._raise_sync(exc, "synchronize", seq)
        else:
            try:
                state = self._stream(check_stream(stream))
            except HarpError as exc:
                self._raise_now(exc, "synchronize", seq)
            try:
                self._sync_stream(state)
            except Exception as exc:
                self._raise_sync(exc, "synchronize", seq)
        self._errors.raise_pending()

    def elapsed(self, start: Event, end: Event) -> float:
        seq = self._next()
        check_event(start)
        check_event(end)
        try:
            states = [self._event(start), self._event(end)]
            if not all(self._recorded(s) for s in states):
                raise ArgumentError("elapsed needs two events that have been recorded")
        except HarpError as exc:
            self._raise_now(exc, "elapsed", seq)
        ms = 0.0
        try:
            ms = self._elapsed_ms(states[0], states[1])
        except Exception as exc:
            self._raise_sync(exc, "elapsed", seq)
        self._errors.raise_pending()
        return float(ms)

    def _launch_refused(self) -> None:
        """A launch failed its checks: no kernel of it runs (a backend that holds its
        compute gate between inline kernels lets go here, so a batch of refused launches
        cannot keep the gate from a session that waits)."""

    # -- lifetime --------------------------------------------------------------------------
    def settle(self) -> None:
        """The caller has issued all it has for now (the server's session calls this after
        each batch of calls, and before every call that is not a launch: one that may
        wait). Not part of `Device`: a backend whose launches may run in the issuing
        thread gives back there what such a run holds (a host device's compute gate);
        the others have nothing to do."""

    def close(self) -> None:
        """End the session without waiting for its work (the one close rule of every device;
        see the module docstring). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._shutdown()
        finally:
            self._used = 0
            self._memory.close()
            if self._gate is not None:
                self._gate.close()
            for table in (self._buffers, self._functions, self._modules, self._events,
                          self._streams):
                table.clear()
