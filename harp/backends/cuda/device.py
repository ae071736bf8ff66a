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
`ptx`, `cubin`, `fatbin`, `cuda-source`, `catalog` and `aten` (PyTorch operators run
by torch over the session's buffers, on its stream: `aten.py`; where torch can run
on the driver's memory), never `numba-python` (numba kernels reach a GPU as PTX
compiled on the client).
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ... import catalog
from ...errors import ArgumentError, DeviceError, HarpError, OutOfMemoryError
from ...frontend import check_count
from ...types import ArrayArg, BufferArg, MemInfo, Scalar
from ..base import BackendDevice, Loaded
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

#: The image formats this backend accepts ("aten" only where torch can run on the driver's
#: memory, `aten.unavailable`; "cuda-source" only where NVRTC loads, and only on a device
#: that trusts client code).
FORMATS = ("catalog", "ptx", "cubin", "fatbin", "aten", "cuda-source")


class _Image:
    """A loaded module image: the CUDA module, and its PTX entries when known."""

    __slots__ = ("module", "entries")

    def __init__(self, module: Any, entries: dict[str, list[int] | None] | None) -> None:
        self.module, self.entries = module, entries


class _Kernel:
    """A function handle's target: the CuPy Function, and how to check its arguments."""

    __slots__ = ("name", "fn", "catalog", "params", "format")

    def __init__(self, name: str, fn: Any, catalog_kernel: catalog.Kernel | None,
                 params: list[int] | None, format: str) -> None:
        self.name, self.fn, self.catalog = name, fn, catalog_kernel
        self.params, self.format = params, format


class CudaDevice(BackendDevice):
    """A session on a `CudaCard`: the hooks of `BackendDevice` on CuPy."""

    CLIENT_CODE = {"cuda-source": (
        "this GPU does not compile CUDA C sent to it (the pool server runs without "
        "--trust-client-code): compile on the client to PTX (harp.RawKernel and "
        "harp.RawModule do so for such devices) and load that")}
    ALIGNED_CATALOG = True

    _card: CudaCard

    def _open(self) -> None:
        card = self._card
        self._cp = card.cp
        self._rt = card.rt
        self._d2d = getattr(card.rt, "memcpyDeviceToDevice", 3)
        self._timed: list[tuple[Any, Any]] = []     # (start, end) events of gated launches
        self._spare_timers: list[Any] = []
        card.check_usable()
        try:
            with card.use():
                self._streams[0] = StreamState(self._cp.cuda.Stream(non_blocking=True))
        except Exception as exc:
            raise DeviceError(f"cannot open a session on GPU {card.index}: "
                              f"{type(exc).__name__}: {exc}") from exc
        self._staging = Staging(card)
        card.session_opened()

    # -- failures --------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._card.broken is not None:
            # The GPU's context is lost: every call fails at once, first with what this
            # session learnt about the failure (the launch it names), then as unusable.
            self._errors.raise_pending()
            self._card.check_usable()

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

    def _fences(self) -> list[Any]:
        """One fence on every stream with work in flight (call with the device current)."""
        return [self._card.fence(s.stream) for s in self._streams.values() if s.dirty]

    def card_mem_info(self) -> MemInfo:
        """The driver's view of the whole GPU (cudaMemGetInfo), every process included.
        Not part of the Device interface; not numbered."""
        free, total = self._card.mem_get_info()
        return MemInfo(free=free, total=total)

    # -- memory ----------------------------------------------------------------
    def _allocate(self, nbytes: int) -> DeviceMemory:
        return self._card.allocate(nbytes)

    def _release(self, mem: DeviceMemory, seq: int) -> None:
        try:
            with self._card.use():
                fences = self._fences() if mem.owner is not None else []
        except Exception as exc:
            fences = []
            self._defer(exc, "free", seq)
        self._card.retire(mem.owner, mem.size, fences)

    def _store(self, state: StreamState, mem: DeviceMemory, offset: int, view: memoryview,
               seq: int) -> None:
        with self._card.use():
            self._staging.upload(state, mem.ptr + offset, view)

    def _fetch(self, state: StreamState, mem: DeviceMemory, offset: int, nbytes: int,
               dst: np.ndarray | None) -> bytes | None:
        if nbytes == 0:
            self._sync_stream(state)
            return b""
        with self._card.use():
            return self._staging.download(state, mem.ptr + offset, nbytes, dst)

    def _copy(self, state: StreamState, dst: DeviceMemory, dst_offset: int, src: DeviceMemory,
              src_offset: int, nbytes: int, seq: int) -> None:
        """Device-to-device copy with memmove semantics (cudaMemcpy's are undefined on overlap)."""
        to, frm = dst.ptr + dst_offset, src.ptr + src_offset
        if to == frm:
            return
        with self._card.use():
            s = state.stream.ptr
            gap = abs(to - frm)
            if gap >= nbytes:                         # disjoint
                self._rt.memcpyAsync(to, frm, nbytes, self._d2d, s)
            elif gap * 64 >= nbytes:                  # overlapping, far apart: in ordered pieces
                # Pieces of `gap` bytes never overlap, and copying away from the overlap first
                # (forwards when moving down, backwards when moving up) reads every source
                # byte before a piece overwrites it; a stream runs its copies one by one.
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

    def _fill(self, state: StreamState, mem: DeviceMemory, offset: int, nbytes: int, value: int,
              seq: int) -> None:
        with self._card.use():
            self._rt.memsetAsync(mem.ptr + offset, value, nbytes, state.stream.ptr)
        state.issued()

    # -- code ------------------------------------------------------------------
    def _unsupported(self, format: str) -> str:
        if format == "numba-python":
            return ("the cuda backend runs compiled GPU code only and never client Python: numba "
                    "kernels reach it as PTX (HARP's numba.cuda shim compiles @cuda.jit kernels "
                    f"on the client); it accepts {', '.join(self._info.formats)}")
        if format == "aten":
            from .aten import unavailable
            why = unavailable(self._cp)
            if why:
                return f"this GPU's server does not run PyTorch operators (aten): {why}"
        return super()._unsupported(format)

    def _load_catalog(self) -> None:
        with self._card.use():
            self._card.catalog_module()       # compiled and loaded once per GPU
        return None

    def _load(self, image: bytes | str, format: str) -> Any:
        if format == "aten":        # PyTorch operators by name (backends/cuda/aten.py)
            from ..aten import AtenModule
            from .aten import place_for
            with self._card.use():
                return AtenModule(place_for(self._card, self._info.memory))
        if format == "ptx":
            text = kernels.ptx_text(image)
            return _Image(self._load_image(text.encode() + b"\0", "ptx"), kernels.ptx_entries(text))
        if format in ("cubin", "fatbin"):
            if isinstance(image, str):
                raise ArgumentError(f"a {format} image is bytes, got str")
            return _Image(self._load_image(image, format), None)
        # cuda-source: compiled here, for this GPU (a CUBIN when this NVRTC knows the GPU),
        # only for a device that trusts client code (the base checked), with CUDA's own
        # headers only.
        compiled = nvrtc.compile_client_source(image, arch=self._card.arch)
        entries = kernels.ptx_entries(compiled.ptx) if compiled.ptx else None
        if compiled.kind == "ptx":
            return _Image(self._load_image(compiled.image + b"\0", "ptx"), entries)
        return _Image(self._load_image(compiled.image, "cubin"), entries)

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

    def _catalog_target(self, kernel: catalog.Kernel) -> _Kernel:
        with self._card.use():
            fn = self._card.catalog_function(kernel.name)
        return _Kernel(kernel.name, fn, kernel, None, "catalog")

    def _lookup(self, loaded: Loaded, name: str) -> _Kernel:
        if loaded.format == "aten":
            from .aten import AtenKernel
            call = loaded.payload.call(name)
            return _Kernel(call.name, AtenKernel(call, loaded.payload.place, self._cp), None,
                           None, "aten")
        image: _Image = loaded.payload
        real, params = name, None
        if image.entries is not None:
            real = kernels.resolve_entry(list(image.entries), name)
            params = image.entries[real]
        try:
            with self._card.use():
                fn = image.module.get_function(real)
                if params is None:
                    params = self._card.param_sizes(fn)
        except Exception as exc:
            if getattr(exc, "status", None) in STICKY_ERRORS:
                raise
            raise ArgumentError(f"module has no kernel {name!r}: {type(exc).__name__}: {exc}") \
                from None
        return _Kernel(real, fn, None, params, loaded.format)

    def _prepare(self, target: _Kernel, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: list) -> tuple[list, Any]:
        zero = None
        if target.format == "aten":     # grid and block mean nothing to an operator
            with self._card.use():
                return target.fn.prepare(args, self._mem), None
        if target.catalog is not None:
            kargs, zero = self._catalog_args(target.catalog, args)
        else:
            kargs = self._compiled_args(target, args)
        why = self._card.check_dims(grid, block)
        if why:
            raise ArgumentError(f"cannot launch {target.name}: {why}")
        return kargs, zero

    def _launch(self, state: StreamState, target: _Kernel, prepared: tuple[list, Any],
                grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int,
                seq: int) -> None:
        kargs, zero = prepared
        gate = self._gate
        if gate is not None:
            gate.enter()
        try:
            with self._card.use():
                if zero is not None:     # reduce_sum: out[0] = 0, in stream order, then add
                    self._rt.memsetAsync(zero[0], 0, zero[1], state.stream.ptr)
                timer = self._start_timer(state) if gate is not None else None
                if target.format == "aten":
                    target.fn.run(state, kargs)
                else:
                    target.fn(grid, block, kargs, shared_mem, state.stream)
                if timer is not None:
                    self._stop_timer(timer, state)
            state.launched(seq, target.name)
        finally:
            if gate is not None:
                gate.exit(self._harvest_timers())
                # The kernel is queued on the GPU: on the host the session holds nothing
                # until its next launch, so a session waiting for the device gets it now
                # (a holder that went quiet would otherwise keep it from every other
                # tenant; its device time is still charged, from CUDA events).
                gate.idle()

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
        """Launch arguments of a catalog kernel, each buffer checked against its real
        allocation, and (address, bytes) to zero first."""
        spans, _ = self._catalog_spans(kernel, args)
        out, zero = [], None
        for p, value in zip(kernel.op.params, spans):
            if p.kind == "scalar":
                out.append(value)
                continue
            address = value.mem.ptr + value.offset
            out.append(np.uint64(address))
            if kernel.op.name == "reduce_sum" and p.name == "out":
                zero = (address, value.nbytes)
        return out, zero

    def _compiled_args(self, target: _Kernel, args: list) -> list:
        """Launch arguments of a compiled kernel, laid out as its parameters want them."""
        plain: list[np.generic] = []      # an array as its data pointer
        numba: list[np.generic] = []      # an array in numba's CUDA array layout
        arrays = False
        for arg in args:
            if isinstance(arg, BufferArg):
                mem, offset = self._arg_memory(arg)
                value = np.uint64(mem.ptr + offset)
                plain.append(value)
                numba.append(value)
            elif isinstance(arg, Scalar):
                value = catalog.scalar_value(arg.value, arg.dtype)
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
    def _new_stream(self) -> StreamState:
        with self._card.use():
            return StreamState(self._cp.cuda.Stream(non_blocking=True))

    def _new_event(self) -> EventState:
        with self._card.use():
            return EventState(self._cp.cuda.Event())

    def _record(self, state: EventState, target: StreamState, seq: int) -> None:
        with self._card.use():
            state.event.record(target.stream)
        state.recorded = True

    def _recorded(self, state: EventState) -> bool:
        return state.recorded

    def _wait_event(self, target: StreamState, state: EventState, seq: int) -> None:
        with self._card.use():
            target.stream.wait_event(state.event)

    def _sync_stream(self, state: StreamState) -> None:
        with self._card.use():
            state.stream.synchronize()
        state.idle()

    def _sync_all(self) -> None:
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
            raise failure

    def _elapsed_ms(self, start: EventState, end: EventState) -> float:
        with self._card.use():
            start.event.synchronize()
            end.event.synchronize()
            return float(self._cp.cuda.get_elapsed_time(start.event, end.event))

    # -- lifetime --------------------------------------------------------------
    def _shutdown(self) -> None:
        """Nothing more of the session is issued, and its memory is given back at once
        (the base's close); what the GPU already has in hand may still run, so each block,
        pinned buffer and module is released to the card's pools only once a fence
        recorded now has passed (no other session is handed memory that work of this one
        still touches)."""
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
                               + [x.payload.module for x in self._modules.values()
                                  if type(x.payload) is _Image])
                card.retire(owners or None, sum(m.size for m in self._buffers.values()),
                            fences)
            finally:
                self._timed.clear()
                self._spare_timers.clear()
                # CuPy destroys streams and events when their last reference goes (a stream
                # with work queued is destroyed once the work is done): drop them here, with
                # this GPU current.
                for table in (self._buffers, self._functions, self._modules, self._events,
                              self._streams):
                    table.clear()
                card.session_closed()
