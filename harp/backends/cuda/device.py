"""`CudaDevice`: one session on a GPU, through CuPy.

**Not yet run on GPU hardware.** This module was written against CuPy 14's documented
API (`cupy.cuda.Stream`, `Event`, `get_elapsed_time`, `MemoryPool`, `PinnedMemoryPool`,
`function.Module`/`Function`, `runtime.memcpyAsync`/`memsetAsync`/`memGetInfo`/
`getDeviceProperties`) on a machine without a GPU; the parts that need no GPU (the
catalog's CUDA C, NVRTC, PTX parsing, numba's array ABI) are tested there, and the
whole conformance suite passes against this class on a host-memory stand-in for
CuPy (tests/backends/fake_cupy), which checks the bookkeeping, not CuPy or a GPU.
The conformance suite runs on the real thing wherever a GPU is present.

Semantics match the cpu backend, which the conformance suite checks:

- Every call, sync or async, takes the next sequence number. Async calls return
  at once; what fails while issuing one (a bad handle, an argument the real
  allocation cannot take, a driver refusal) is kept and raised at the next sync
  call (`read`, `synchronize`, `elapsed`, `mem_info`), naming the call and number.
- Shape errors that need no device state raise at once (`harp.frontend` checks).
- A kernel fault (illegal address, misaligned access, trap) is only reported by
  CUDA at a later synchronisation, and it is *sticky*: the GPU's CUDA context is
  lost for every session in this process. It is raised as a `DeviceError` naming
  the first kernel this session launched on that stream since it was last idle
  (the kernel that faulted, or one before it), and from then on every call on
  that GPU raises `DeviceError` at once: the pool server must be restarted. The
  backend therefore checks what it can before a launch: catalog kernels get
  every buffer range checked against the real allocation (a deferred
  `ArgumentError`, as on the cpu backend), and every compiled kernel gets its
  argument count and sizes checked against the kernel's parameters (from the
  PTX, NVRTC's PTX for cuda-source, or the driver's cuFuncGetParamInfo on CUDA
  12.4+; where none of these is available, a launch carries zero-filled padding
  parameters, so a kernel given too few reads zeros, never host memory), and
  every array argument's extent checked against its buffer. What a compiled
  kernel does with its pointers cannot be checked: compiled kernels run in the
  server's CUDA context, like any CUDA program's, and are not isolated from
  other sessions' memory on the same GPU (use MIG or separate servers for that).
- Memory: allocations come from a private CuPy memory pool, are zeroed before
  use, and are reserved in requested bytes from the session's `MemoryBroker`
  first (`harp.tenancy`: the session's or its lease's quota, `QuotaError`, and
  the card's capacity, `OutOfMemoryError`), so `mem_info` reports exactly what
  sessions hold: the quota when one applies, else the card's capacity (its
  total memory, or the backend's `memory` option) minus what the sessions on it
  hold. `card_mem_info()` gives the driver's own view (cudaMemGetInfo, every
  process included).
- On a pool server every session runs in a worker process of its own, with a
  CUDA context of its own: a kernel of one tenant cannot address another's
  memory, and a sticky fault ends only the session whose worker it hit.
- `cuda-source` is compiled only on a device opened with
  `trust_client_code=True`, and then only with CUDA's own headers
  (`nvrtc.compile_client_source`); other devices refuse it, and clients compile
  CUDA C to PTX themselves (`harp.RawKernel`). Launches hold the session's
  `ComputeGate` while they are issued, and are charged their device time as
  measured by CUDA events.
- Copies between overlapping ranges of one buffer behave like memmove.
- Kernel arguments: a `BufferArg` is its device address (buffer + offset, as a
  64-bit value), a `Scalar` a value of its dtype, an `ArrayArg` either numba's
  CUDA array layout (meminfo, parent, nitems, itemsize, data, shape..., strides...
  in bytes) when that is what the kernel's parameters are (numba's PTX), or its
  data address.

Differences from the cpu backend: catalog buffer offsets must be aligned to the
element size (a GPU faults on misaligned element access); image formats are
`ptx`, `cubin`, `fatbin`, `cuda-source` and `catalog` (never `numba-python`:
numba kernels reach a GPU as PTX compiled on the client).
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np

from ... import catalog
from ...device import Device, Dims
from ...errors import (ArgumentError, DeviceError, HarpError, InvalidHandleError,
                       OutOfMemoryError, PermissionDeniedError, QuotaError, UnsupportedError)
from ...frontend import (DeferredErrors, HandleIds, bound_message, as_bytes_view, check_buffer, check_copy,
                         check_count, check_dims, check_event, check_fill, check_format,
                         check_function, check_image, check_kernel_name, check_module,
                         check_range, check_stream, normalize_args, out_view)
from ...limits import MAX_BUFFERS, MAX_EVENTS, MAX_FUNCTIONS, MAX_MODULES, MAX_STREAMS
from ...tenancy import ComputeGate, MemoryBroker
from ...types import (ArrayArg, Buffer, BufferArg, DeviceInfo, Event, Function, MemInfo, Module,
                      Scalar, Stream)
from ..cpu.kernels import check_catalog_args
from . import kernels, nvrtc
from .card import CudaCard, DeviceMemory
from .streams import EventState, Staging, StreamState

#: CUDA error codes after which the context is lost (the same numbers in the runtime and
#: driver APIs): ECC uncorrectable, illegal address, launch timeout, device assert,
#: hardware stack error, illegal instruction, misaligned address, invalid address space,
#: invalid PC, launch failure.
STICKY_ERRORS = frozenset({214, 700, 702, 710, 714, 715, 716, 717, 718, 719})

#: Launches of kernels whose parameters are unknown get this many zero-filled extra
#: parameters (each a pointer to 32 KiB of zeros, the most parameter space a kernel has):
#: cuLaunchKernel reads as many parameters as the kernel declares, whatever it is given.
PAD_PARAMS = 64
_PAD = np.zeros(1, dtype="V32768")

#: The image formats this backend accepts ("cuda-source" only where NVRTC loads, and only
#: on a device that trusts client code).
FORMATS = ("catalog", "ptx", "cubin", "fatbin", "cuda-source")


class _Errors(DeferredErrors):
    """Deferred errors kept in call order: a kernel fault is learnt late, at a sync call,
    but it belongs to its launch, before failures recorded since."""

    def add(self, error: HarpError, call: str, seq: int) -> None:
        if error.call is None:
            error.call, error.seq = call, seq
        bound_message(error)
        with self._lock:
            if len(self._errors) >= self.MAX_KEPT:
                self._dropped += 1
                return
            i = len(self._errors)
            while i and (self._errors[i - 1].seq or 0) > (error.seq or 0):
                i -= 1
            self._errors.insert(i, error)


class _Loaded:
    """A loaded module: its format, the CUDA module, and its PTX entries when known."""

    __slots__ = ("format", "module", "entries")

    def __init__(self, format: str, module: Any, entries: dict[str, list[int] | None] | None):
        self.format, self.module, self.entries = format, module, entries


class _Kernel:
    """A function handle's target: the CuPy Function, and how to check its arguments."""

    __slots__ = ("name", "fn", "catalog", "params", "format")

    def __init__(self, name: str, fn: Any, catalog_kernel: catalog.Kernel | None,
                 params: list[int] | None, format: str) -> None:
        self.name, self.fn, self.catalog = name, fn, catalog_kernel
        self.params, self.format = params, format


class CudaDevice(Device):
    """A session on a `CudaCard`: its own handles, streams, quota and deferred errors."""

    def __init__(self, card: CudaCard, info: DeviceInfo, memory: MemoryBroker, *,
                 compute: ComputeGate | None = None, trust_client_code: bool = False) -> None:
        self._card = card
        self._cp = card.cp
        self._rt = card.rt
        self._d2d = getattr(card.rt, "memcpyDeviceToDevice", 3)
        self._memory = memory
        self._gate = compute
        self._trusted = trust_client_code
        self._timed: list[tuple[Any, Any]] = []     # (start, end) events of gated launches
        self._spare_timers: list[Any] = []
        self._info = info
        self._ids = HandleIds()
        self._errors = _Errors()
        self._seq = 0
        self._used = 0
        self._closed = False
        self._buffers: dict[int, DeviceMemory] = {}
        self._modules: dict[int, _Loaded] = {}
        self._functions: dict[int, _Kernel] = {}
        self._events: dict[int, EventState] = {}
        card.check_usable()
        try:
            with card.use():
                self._streams: dict[int, StreamState] = {
                    0: StreamState(self._cp.cuda.Stream(non_blocking=True))}
        except Exception as exc:
            raise DeviceError(f"cannot open a session on GPU {card.index}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self._staging = Staging(card)
        card.session_opened()

    # -- internals -------------------------------------------------------------
    def _next(self) -> int:
        if self._closed:
            raise HarpError("the device session is closed")
        if self._card.broken is not None:
            # The GPU's context is lost: every call fails at once, first with what this
            # session learnt about the failure (the launch it names), then as unusable.
            self._errors.raise_pending()
            self._card.check_usable()
        self._seq += 1
        return self._seq

    def _mem(self, buf: Buffer) -> DeviceMemory:
        mem = self._buffers.get(buf.id)
        if mem is None:
            raise InvalidHandleError(f"buffer handle {buf.id:#x} is not allocated in this session "
                                     "(freed, failed to allocate, or another session's)")
        return mem

    def _span(self, buf: Buffer, offset: int, nbytes: int, what: str) -> int:
        """The device address of [offset, offset+nbytes) of a live buffer, checked against
        its real size (a forged handle may claim more bytes than were allocated)."""
        mem = self._mem(buf)
        if offset + nbytes > mem.size:
            raise ArgumentError(f"{what} [{offset}, {offset + nbytes}) is outside the buffer of "
                                f"{mem.size} bytes")
        return mem.ptr + offset

    def _stream(self, stream: Stream) -> StreamState:
        state = self._streams.get(stream.id)
        if state is None:
            raise InvalidHandleError(f"stream handle {stream.id:#x} is not this session's")
        return state

    def _event(self, event: Event) -> EventState:
        state = self._events.get(event.id)
        if state is None:
            raise InvalidHandleError(f"event handle {event.id:#x} is not this session's")
        return state

    def _first_pending_launch(self) -> tuple[int, str] | None:
        launches = [s.first_launch for s in self._streams.values() if s.first_launch]
        return min(launches) if launches else None

    def _failure(self, exc: BaseException, call: str, seq: int) -> HarpError:
        """A CuPy/CUDA exception as the HarpError to report, with the call it belongs to."""
        if isinstance(exc, HarpError):
            err = exc
        elif isinstance(exc, self._cp.cuda.memory.OutOfMemoryError):
            err = OutOfMemoryError(f"the GPU has not enough free memory: {exc}")
        else:
            text = f"{type(exc).__name__}: {exc}"
            if getattr(exc, "status", None) in STICKY_ERRORS:
                note = self._card.mark_broken(text)
                launch = self._first_pending_launch()
                if launch is not None:
                    call, seq = "launch", launch[0]
                    err = DeviceError(f"kernel {launch[1]} (or a kernel launched after it on the "
                                      f"same stream) failed on the GPU: {text}. {note}")
                else:
                    err = DeviceError(f"the GPU failed: {text}. {note}")
            else:
                err = DeviceError(text)
        if err.call is None:
            err.call, err.seq = call, seq
        return err

    def _defer(self, exc: BaseException, call: str, seq: int) -> None:
        err = self._failure(exc, call, seq)
        self._errors.add(err, err.call or call, err.seq if err.seq is not None else seq)

    def _raise_sync(self, exc: BaseException, call: str, seq: int) -> None:
        """A sync call failed on the device: raise the earliest failure pending, this included."""
        self._defer(exc, call, seq)
        self._errors.raise_pending()

    def _wait(self, state: StreamState, call: str, seq: int) -> None:
        """Wait for one stream; a CUDA failure is raised (after earlier pending ones)."""
        try:
            with self._card.use():
                state.stream.synchronize()
        except Exception as exc:
            self._raise_sync(exc, call, seq)
        state.idle()

    def _fences(self) -> list[Any]:
        """One fence on every stream with work in flight (call with the device current)."""
        return [self._card.fence(s.stream) for s in self._streams.values() if s.dirty]

    # -- facts -----------------------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        return self._info

    def mem_info(self) -> MemInfo:
        self._next()
        self._errors.raise_pending()
        return self._memory.mem_info()

    def card_mem_info(self) -> MemInfo:
        """The driver's view of the whole GPU (cudaMemGetInfo), every process included.
        Not part of the Device interface; not numbered."""
        free, total = self._card.mem_get_info()
        return MemInfo(free=free, total=total)

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
            with self._card.use():
                fences = self._fences() if mem.owner is not None else []
        except Exception as exc:
            fences = []
            self._defer(exc, "free", seq)
        self._card.retire(mem.owner, mem.size, fences)

    def write(self, buf: Buffer, offset: int, data: Any, stream: Stream | None = None) -> None:
        seq = self._next()
        view = as_bytes_view(data)
        offset, nbytes = check_range(buf, offset, view.nbytes, "write")
        stream = check_stream(stream)
        try:
            dst, state = self._span(buf, offset, nbytes, "write"), self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "write", seq)
            return
        if nbytes == 0:
            return
        try:
            with self._card.use():
                self._staging.upload(state, dst, view)
        except Exception as exc:
            self._defer(exc, "write", seq)

    def read(self, buf: Buffer, offset: int, nbytes: int, out: Any = None,
             stream: Stream | None = None) -> Any:
        seq = self._next()
        offset, nbytes = check_range(buf, offset, nbytes, "read")
        stream = check_stream(stream)
        dst = None if out is None else np.frombuffer(out_view(out, nbytes), np.uint8)
        try:
            src, state = self._span(buf, offset, nbytes, "read"), self._stream(stream)
        except HarpError as exc:
            self._errors.raise_pending()
            exc.call, exc.seq = "read", seq
            raise
        if nbytes == 0:
            self._wait(state, "read", seq)
            self._errors.raise_pending()
            return out if out is not None else b""
        try:
            with self._card.use():
                got = self._staging.download(state, src, nbytes, dst)
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
        if nbytes == 0 or to == frm:
            return
        try:
            with self._card.use():
                self._copy(state, to, frm, nbytes)
        except Exception as exc:
            self._defer(exc, "copy", seq)

    def _copy(self, state: StreamState, to: int, frm: int, nbytes: int) -> None:
        """Device-to-device copy with memmove semantics (cudaMemcpy's are undefined on overlap)."""
        s = state.stream.ptr
        gap = abs(to - frm)
        if gap >= nbytes:                         # disjoint
            self._rt.memcpyAsync(to, frm, nbytes, self._d2d, s)
        elif gap * 64 >= nbytes:                  # overlapping, far apart: in ordered pieces
            # Pieces of `gap` bytes never overlap, and copying away from the overlap first
            # (forwards when moving down, backwards when moving up) reads every source byte
            # before a piece overwrites it; a stream runs its copies one after another.
            starts = range(0, nbytes, gap)
            for at in (starts if to < frm else reversed(starts)):
                size = min(gap, nbytes - at)
                self._rt.memcpyAsync(to + at, frm + at, size, self._d2d, s)
        else:                                     # overlapping, close: through a bounce buffer
            bounce = self._card.scratch(nbytes)
            self._rt.memcpyAsync(bounce.ptr, frm, nbytes, self._d2d, s)
            self._rt.memcpyAsync(to, bounce.ptr, nbytes, self._d2d, s)
            self._card.retire(bounce, 0, [self._card.fence(state.stream)])
        state.issued()

    def fill(self, buf: Buffer, value: int, offset: int = 0, nbytes: int | None = None,
             stream: Stream | None = None) -> None:
        seq = self._next()
        value, offset, nbytes = check_fill(buf, value, offset, nbytes)
        stream = check_stream(stream)
        try:
            ptr, state = self._span(buf, offset, nbytes, "fill"), self._stream(stream)
        except HarpError as exc:
            self._errors.add(exc, "fill", seq)
            return
        if nbytes == 0:
            return
        try:
            with self._card.use():
                self._rt.memsetAsync(ptr, value, nbytes, state.stream.ptr)
            state.issued()
        except Exception as exc:
            self._defer(exc, "fill", seq)

    # -- code ------------------------------------------------------------------
    def load_module(self, image: bytes | str, format: str) -> Module:
        seq = self._next()
        raw = check_image(image)
        module = Module(self._ids.new(), check_format(format))
        try:
            if len(self._modules) >= MAX_MODULES:
                raise QuotaError(f"a session may hold at most {MAX_MODULES} modules")
            kept = 0 if module.format == "catalog" else len(raw)
            self._memory.reserve(kept)                # the image, counted against the quota
            try:
                self._modules[module.id] = self._load(raw, module.format)
            except BaseException:
                self._memory.release(kept)
                raise
        except Exception as exc:
            self._defer(exc, "load_module", seq)
        return module

    def _load(self, image: bytes | str, format: str) -> _Loaded:
        if format == "catalog":
            raw = image.encode() if isinstance(image, str) else image
            if raw != catalog.CATALOG_IMAGE:
                raise ArgumentError(f"unknown catalog image {raw[:40]!r}; this device has "
                                    f"{catalog.CATALOG_IMAGE!r}")
            with self._card.use():
                self._card.catalog_module()       # compiled and loaded once per GPU
            return _Loaded("catalog", None, None)
        if format == "numba-python":
            raise UnsupportedError(
                "the cuda backend runs compiled GPU code only and never client Python: numba "
                "kernels reach it as PTX (HARP's numba.cuda shim compiles @cuda.jit kernels on "
                f"the client); it accepts {', '.join(self._info.formats)}")
        if format == "cuda-source" and not self._trusted:
            raise PermissionDeniedError(
                "this GPU does not compile CUDA C sent to it (the pool server runs without "
                "--trust-client-code): compile on the client to PTX (harp.RawKernel and "
                "harp.RawModule do so for such devices) and load that")
        if format not in self._info.formats:
            raise UnsupportedError(f"this cuda device does not accept {format!r} images; "
                                   f"it accepts {', '.join(self._info.formats)}")
        if format == "ptx":
            text = kernels.ptx_text(image)
            return _Loaded("ptx", self._load_image(text.encode() + b"\0", "ptx"),
                           kernels.ptx_entries(text))
        if format in ("cubin", "fatbin"):
            if isinstance(image, str):
                raise ArgumentError(f"a {format} image is bytes, got str")
            return _Loaded(format, self._load_image(image, format), None)
        # cuda-source: compiled here, for this GPU (a CUBIN when this NVRTC knows the GPU),
        # only for a device that trusts client code (above), with CUDA's own headers only.
        compiled = nvrtc.compile_client_source(image, arch=self._card.arch)
        entries = kernels.ptx_entries(compiled.ptx) if compiled.ptx else None
        if compiled.kind == "ptx":
            return _Loaded("cuda-source", self._load_image(compiled.image + b"\0", "ptx"), entries)
        return _Loaded("cuda-source", self._load_image(compiled.image, "cubin"), entries)

    def _load_image(self, image: bytes, format: str) -> Any:
        try:
            with self._card.use():
                module = self._cp.cuda.function.Module()
                module.load(image)
            return module
        except Exception as exc:
            if getattr(exc, "status", None) in STICKY_ERRORS:
                raise
            raise ArgumentError(f"the CUDA driver refused the {format} image: "
                                f"{type(exc).__name__}: {exc}") from None

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
            self._functions[fn.id] = self._lookup(loaded, fn.name)
        except Exception as exc:
            self._defer(exc, "function", seq)
        return fn

    def _lookup(self, loaded: _Loaded, name: str) -> _Kernel:
        if loaded.format == "catalog":
            kernel = catalog.KERNELS.get(name)
            if kernel is None:
                raise ArgumentError(f"the catalog has no kernel {name!r}")
            with self._card.use():
                fn = self._card.catalog_function(name)
            return _Kernel(name, fn, kernel, None, "catalog")
        real, params = name, None
        if loaded.entries is not None:
            real = kernels.resolve_entry(list(loaded.entries), name)
            params = loaded.entries[real]
        try:
            with self._card.use():
                fn = loaded.module.get_function(real)
                if params is None:
                    params = self._card.param_sizes(fn)
        except Exception as exc:
            if getattr(exc, "status", None) in STICKY_ERRORS:
                raise
            raise ArgumentError(f"module has no kernel {name!r}: {type(exc).__name__}: {exc}") \
                from None
        return _Kernel(real, fn, None, params, loaded.format)

    def launch(self, fn: Function, grid: Dims, block: Dims, args: Sequence[Any],
               shared_mem: int = 0, stream: Stream | None = None) -> None:
        seq = self._next()
        check_function(fn)
        grid3, block3 = check_dims(grid, "grid"), check_dims(block, "block")
        shared_mem = check_count(shared_mem, "shared_mem")
        args = normalize_args(args)
        stream = check_stream(stream)
        try:
            target = self._functions.get(fn.id)
            if target is None:
                raise InvalidHandleError(f"function handle {fn.id:#x} is not this session's")
            state = self._stream(stream)
            zero = None
            if target.catalog is not None:
                kargs, zero = self._catalog_args(target.catalog, args)
            else:
                kargs = self._compiled_args(target, args)
            why = self._card.check_dims(grid3, block3)
            if why:
                raise ArgumentError(f"cannot launch {target.name}: {why}")
        except HarpError as exc:
            self._errors.add(exc, "launch", seq)
            return
        gate = self._gate
        if gate is not None:
            gate.enter()
        try:
            with self._card.use():
                if zero is not None:     # reduce_sum: out[0] = 0, in stream order, then add
                    self._rt.memsetAsync(zero[0], 0, zero[1], state.stream.ptr)
                timer = self._start_timer(state) if gate is not None else None
                target.fn(grid3, block3, kargs, shared_mem, state.stream)
                if timer is not None:
                    self._stop_timer(timer, state)
            state.launched(seq, target.name)
        except Exception as exc:
            self._defer(exc, "launch", seq)
        finally:
            if gate is not None:
                gate.exit(self._harvest_timers())

    # -- device time of gated launches (CUDA events) --------------------------
    def _start_timer(self, state: StreamState) -> Any:
        start = self._spare_timers.pop() if self._spare_timers else self._cp.cuda.Event()
        start.record(state.stream)
        return start

    def _stop_timer(self, start: Any, state: StreamState) -> None:
        end = self._spare_timers.pop() if self._spare_timers else self._cp.cuda.Event()
        end.record(state.stream)
        self._timed.append((start, end))

    def _harvest_timers(self) -> int:
        """Device time (ns) of the gated launches that have finished since the last harvest."""
        total, keep = 0, []
        try:
            with self._card.use():
                for start, end in self._timed:
                    if not self._card.event_done(end):
                        keep.append((start, end))
                        continue
                    total += int(self._cp.cuda.get_elapsed_time(start, end) * 1e6)
                    self._spare_timers += (start, end)
        except Exception:       # a lost context: no more time to count
            keep = []
        self._timed = keep
        return total

    def _catalog_args(self, kernel: catalog.Kernel, args: list) -> tuple[list, Any]:
        """Checked launch arguments of a catalog kernel, and (address, bytes) to zero first."""
        check_catalog_args(kernel, args)
        params = kernel.op.params
        values = {p.name: kernels.scalar_value(a.value, kernel.param_dtype(p))
                  for p, a in zip(params, args) if p.kind == "scalar"}
        sizes = {k: int(values[k]) for k in ("n", "m", "k") if k in values}
        for name, size in sizes.items():
            if size < 0:
                raise ArgumentError(f"{kernel.name}: {name} must be >= 0, got {size}")
        need = kernels.elements_needed(kernel, sizes)
        itemsize = np.dtype(kernel.dtype).itemsize if kernel.dtype else 1
        out, zero = [], None
        for p, arg in zip(params, args):
            if p.kind == "scalar":
                out.append(values[p.name])
                continue
            mem = self._mem(arg.buffer)
            offset = check_count(arg.offset, "argument offset")
            if offset > mem.size:
                raise ArgumentError(f"argument offset {offset} is past the end of a buffer of "
                                    f"{mem.size} bytes")
            nbytes = need[p.name] * itemsize
            if offset + nbytes > mem.size:
                raise ArgumentError(f"{kernel.name}: {p.name} needs {nbytes} bytes at offset "
                                    f"{offset}, but its buffer has {mem.size}")
            if nbytes and offset % itemsize:
                raise ArgumentError(f"{kernel.name}: {p.name} at byte offset {offset} is not "
                                    f"aligned to its {itemsize}-byte elements (a GPU needs it)")
            out.append(np.uint64(mem.ptr + offset))
            if kernel.op.name == "reduce_sum" and p.name == "out":
                zero = (mem.ptr + offset, itemsize)
        return out, zero

    def _compiled_args(self, target: _Kernel, args: list) -> list:
        """Launch arguments of a compiled kernel, laid out as its parameters want them."""
        plain: list[np.generic] = []      # an array as its data pointer
        numba: list[np.generic] = []      # an array in numba's CUDA array layout
        arrays = False
        for arg in args:
            if isinstance(arg, BufferArg):
                mem = self._mem(arg.buffer)
                offset = check_count(arg.offset, "argument offset")
                if offset > mem.size:
                    raise ArgumentError(f"argument offset {offset} is past the end of a buffer "
                                        f"of {mem.size} bytes")
                value = np.uint64(mem.ptr + offset)
                plain.append(value)
                numba.append(value)
            elif isinstance(arg, Scalar):
                value = kernels.scalar_value(arg.value, arg.dtype)
                plain.append(value)
                numba.append(value)
            elif isinstance(arg, ArrayArg):
                mem = self._mem(arg.buffer)
                dtype = np.dtype(arg.dtype)
                offset = check_count(arg.offset, "array offset")
                strides = kernels.check_array(mem.size, offset, dtype, arg.shape, arg.strides)
                data = mem.ptr + offset
                plain.append(np.uint64(data))
                numba.extend(kernels.numba_array_params(data, dtype, arg.shape, strides))
                arrays = True
            else:
                raise ArgumentError(f"unknown kernel argument {arg!r}")
        if target.params is None:
            # Parameters unknown (a cubin or fatbin on a driver older than CUDA 12.4): numba's
            # layout for PTX, pointers otherwise; and zero padding behind the arguments, so that
            # a kernel that takes more than it was given reads zeros, never host memory.
            return (numba if target.format == "ptx" else plain) + [_PAD] * PAD_PARAMS
        for candidate in (numba, plain):
            if kernels.param_sizes(candidate) == target.params:
                return candidate
        layouts = f"{kernels.param_sizes(plain)}"
        if arrays:
            layouts += f", or {kernels.param_sizes(numba)} with numba's array layout"
        raise ArgumentError(f"kernel {target.name} takes {len(target.params)} parameters of "
                            f"{target.params} bytes; the {len(args)} arguments give {layouts}")

    # -- order -----------------------------------------------------------------
    def stream(self) -> Stream:
        seq = self._next()
        stream = Stream(self._ids.new())
        if len(self._streams) > MAX_STREAMS:          # the default stream is not counted
            self._errors.add(QuotaError(f"a session may have at most {MAX_STREAMS} streams"),
                             "stream", seq)
            return stream
        try:
            with self._card.use():
                self._streams[stream.id] = StreamState(self._cp.cuda.Stream(non_blocking=True))
        except Exception as exc:
            self._defer(exc, "stream", seq)
        return stream

    def event(self) -> Event:
        seq = self._next()
        event = Event(self._ids.new())
        if len(self._events) >= MAX_EVENTS:
            self._errors.add(QuotaError(f"a session may have at most {MAX_EVENTS} events"),
                             "event", seq)
            return event
        try:
            with self._card.use():
                self._events[event.id] = EventState(self._cp.cuda.Event())
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
            with self._card.use():
                state.event.record(target.stream)
            state.recorded = True
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
        if not state.recorded:     # an event never recorded is complete, as in CUDA
            return
        try:
            with self._card.use():
                target.stream.wait_event(state.event)
        except Exception as exc:
            self._defer(exc, "wait", seq)

    def synchronize(self, stream: Stream | None = None) -> None:
        seq = self._next()
        if stream is None:
            failure = None
            with self._card.use():
                for state in list(self._streams.values()):
                    try:
                        state.stream.synchronize()
                        state.idle()
                    except Exception as exc:
                        failure = failure or exc
                if failure is None:
                    self._staging.forget()
                    self._card.reap()
            if failure is not None:
                self._raise_sync(failure, "synchronize", seq)
        else:
            try:
                state = self._stream(check_stream(stream))
            except HarpError as exc:
                self._errors.raise_pending()
                exc.call, exc.seq = "synchronize", seq
                raise
            self._wait(state, "synchronize", seq)
        self._errors.raise_pending()

    def elapsed(self, start: Event, end: Event) -> float:
        seq = self._next()
        check_event(start)
        check_event(end)
        try:
            states = [self._event(start), self._event(end)]
            if not all(s.recorded for s in states):
                raise ArgumentError("elapsed needs two events that have been recorded")
        except HarpError as exc:
            self._errors.raise_pending()
            exc.call, exc.seq = "elapsed", seq
            raise
        ms = 0.0
        try:
            with self._card.use():
                for s in states:
                    s.event.synchronize()
                ms = self._cp.cuda.get_elapsed_time(states[0].event, states[1].event)
        except Exception as exc:
            self._raise_sync(exc, "elapsed", seq)
        self._errors.raise_pending()
        return float(ms)

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:
        """End the session without waiting for its work (the one close rule of every
        device): nothing more of it is issued, and its memory is given back at once; what
        the GPU already has in hand may still run, so each block, pinned buffer and module
        is released to the card's pools only once a fence recorded now has passed (no other
        session is handed memory that work of this one still touches)."""
        if self._closed:
            return
        self._closed = True
        card = self._card
        with contextlib.ExitStack() as current:
            fences: list[Any] = []
            try:
                current.enter_context(card.use())
                if card.broken is None:
                    fences = self._fences()
            except Exception:       # a lost context: nothing more runs on the GPU anyway
                fences = []
            try:
                if fences:
                    self._staging.retire_all()
                else:
                    self._staging.forget()
                # one retirement for all (each fence is recycled once, when it has passed)
                owners = tuple([m.owner for m in self._buffers.values() if m.owner is not None]
                               + [x.module for x in self._modules.values()
                                  if x.module is not None])
                card.retire(owners or None, sum(m.size for m in self._buffers.values()),
                            fences)
            finally:
                self._buffers.clear()
                self._used = 0
                self._memory.close()
                if self._gate is not None:
                    self._gate.close()
                self._timed.clear()
                self._spare_timers.clear()
                # CuPy destroys streams and events when their last reference goes (a stream
                # with work queued is destroyed once the work is done): drop them here, with
                # this GPU current.
                self._functions.clear()
                self._modules.clear()
                self._events.clear()
                self._streams.clear()
                card.session_closed()

    @property
    def used_bytes(self) -> int:
        """Bytes this session holds (for the server's accounting and tests)."""
        return self._used
