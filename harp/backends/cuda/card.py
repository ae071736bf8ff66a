"""The cuda backend's physical device: one GPU shared by the sessions of this process.

A `CudaCard` owns what sessions share on one GPU: memory accounting against a
capacity, a private CuPy memory pool, a pool of pinned host buffers for staging,
a service stream that zeroes new allocations, recycled fence events, the catalog
compiled and loaded once, and whether the GPU's CUDA context has been lost to a
sticky error.

Sessions reserve the bytes they allocate from their `MemoryBroker` first
(`harp.tenancy`: quotas and the card's `capacity`, the card's total memory or
the backend's `memory` option), so an allocation fails closed before CUDA is
asked; the card counts what this process holds (`used`). A freed block goes back to the pool only
once every stream that had work in flight when it was freed has passed a fence
recorded at the free, so no later allocation, on any stream of any session,
can be handed memory that earlier work still reads or writes.

Not run on a GPU yet: written against CuPy's documented API (see device.py).
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any

from ...errors import DeviceError, OutOfMemoryError
from . import kernels, nvrtc

#: cudaErrorNotReady: an event or stream query of work still running.
NOT_READY = 600

#: Compiled catalog images, by compute capability: one NVRTC compile per process and arch.
_catalog_images: dict[tuple[int, int], nvrtc.Compiled] = {}
_catalog_lock = threading.Lock()


def catalog_image(arch: tuple[int, int]) -> nvrtc.Compiled:
    """The catalog compiled for compute capability `arch` (cached)."""
    with _catalog_lock:
        compiled = _catalog_images.get(arch)
        if compiled is None:
            compiled = nvrtc.compile_cuda(kernels.CATALOG_SOURCE, arch=arch,
                                          name="harp_catalog.cu")
            _catalog_images[arch] = compiled
        return compiled


class DeviceMemory:
    """One allocation: its device pointer, its real size, and the CuPy pointer that owns it."""

    __slots__ = ("ptr", "size", "owner")

    def __init__(self, ptr: int, size: int, owner: Any) -> None:
        self.ptr, self.size, self.owner = ptr, size, owner


class CudaCard:
    """One GPU as the sessions of this process share it."""

    def __init__(self, cp: Any, index: int, capacity: int, props: dict[str, Any]) -> None:
        self.cp = cp
        self.rt = cp.cuda.runtime
        self.index = index
        self.capacity = capacity
        self.props = props
        self.arch = (int(props["major"]), int(props["minor"]))
        self.max_threads = int(props.get("maxThreadsPerBlock", kernels.MAX_BLOCK_THREADS))
        self.max_block = tuple(int(v) for v in props.get("maxThreadsDim", (1024, 1024, 64)))
        self.max_grid = tuple(int(v) for v in props.get("maxGridSize",
                                                         (2**31 - 1, 65535, 65535)))
        self.broken: str | None = None
        self._used = 0
        self._sessions = 0
        self._lock = threading.Lock()
        self._pool = cp.cuda.MemoryPool()
        self._pinned = cp.cuda.PinnedMemoryPool()
        self._service: Any = None
        self._pending: list[tuple[Any, list[Any]]] = []   # (owner, fences) awaiting release
        self._spare_events: list[Any] = []
        self._catalog: Any = None
        self._catalog_functions: dict[str, Any] = {}
        self._param_info: Any = _param_info_function()

    # -- context ---------------------------------------------------------------------
    def use(self) -> Any:
        """A context manager that makes this GPU current in the calling thread
        (the server calls a session from different threads)."""
        return self.cp.cuda.Device(self.index)

    def mark_broken(self, text: str) -> str:
        note = ("CUDA errors of this kind are sticky: this GPU's CUDA context is lost for every "
                "session in this process, and every later call on it fails; restart the process "
                "(the pool server) to use the GPU again")
        with self._lock:
            if self.broken is None:
                self.broken = f"{text}. {note}"
        return note

    def check_usable(self) -> None:
        if self.broken is not None:
            raise DeviceError(f"GPU {self.index} is unusable after an earlier failure: "
                              f"{self.broken}")

    @property
    def used(self) -> int:
        return self._used

    def session_opened(self) -> None:
        with self._lock:
            self._sessions += 1

    def session_closed(self) -> None:
        """The last session gone: give cached device and pinned memory back to the system."""
        with self._lock:
            self._sessions -= 1
            last = self._sessions == 0
        if last and self.broken is None:
            try:
                with self.use():
                    self.reap(wait=True)
                    self._pool.free_all_blocks()
                self._pinned.free_all_blocks()
            except Exception:   # best effort: the memory is reused by the next session anyway
                pass

    def service_stream(self) -> Any:
        """A non-blocking stream of the card's own (call with the device current)."""
        if self._service is None:
            self._service = self.cp.cuda.Stream(non_blocking=True)
        return self._service

    # -- memory ----------------------------------------------------------------------
    def allocate(self, nbytes: int) -> DeviceMemory:
        """`nbytes` of zeroed device memory (the session has reserved them already)."""
        with self._lock:
            self._used += nbytes
        try:
            if nbytes == 0:
                return DeviceMemory(0, 0, None)
            with self.use():
                self.reap()
                owner = self._malloc(nbytes)
                # Zero it before anyone can see it (no tenant sees another's bytes); on the
                # card's stream, waited for here, so every stream of every session sees zeros.
                service = self.service_stream()
                self.rt.memsetAsync(owner.ptr, 0, nbytes, service.ptr)
                service.synchronize()
            return DeviceMemory(int(owner.ptr), nbytes, owner)
        except BaseException:
            self._unaccount(nbytes)
            raise

    def _malloc(self, nbytes: int) -> Any:
        oom = self.cp.cuda.memory.OutOfMemoryError
        try:
            return self._pool.malloc(nbytes)
        except oom:
            # Blocks freed but still fenced may be what is missing: wait for them, give
            # every cached block back to the driver, and try once more.
            self.reap(wait=True)
            self._pool.free_all_blocks()
            try:
                return self._pool.malloc(nbytes)
            except oom as exc:
                raise OutOfMemoryError(f"the GPU has not {nbytes} bytes free: {exc}") from None

    def scratch(self, nbytes: int) -> Any:
        """Unaccounted device memory for a moment (an overlapping copy's bounce buffer);
        hand it back with `retire(owner, 0, fences)`."""
        with self.use():
            self.reap()
            return self._malloc(nbytes)

    def _unaccount(self, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def retire(self, owner: Any, nbytes: int, fences: list[Any]) -> None:
        """Stop accounting `nbytes` now; release `owner` once every fence has passed."""
        self._unaccount(nbytes)
        if owner is None:
            return
        if not fences:
            del owner        # back to the pool at once: nothing can still be using it
            return
        with self._lock:
            self._pending.append((owner, fences))

    def event_done(self, event: Any) -> bool:
        """Whether a fence has passed (a failed query counts as passed: the failure itself
        surfaces at the session's next sync call, and a lost context runs nothing more)."""
        return self.rt.eventQuery(event.ptr) != NOT_READY

    def reap(self, wait: bool = False) -> None:
        """Release retired memory whose fences have all passed (all of it, with `wait`)."""
        with self._lock:
            pending, self._pending = self._pending, []
        keep, spare = [], []
        for owner, fences in pending:
            if wait:
                for ev in fences:
                    try:
                        ev.synchronize()
                    except Exception:
                        pass
            if all(self.event_done(ev) for ev in fences):
                spare.extend(fences)
            else:
                keep.append((owner, fences))
        del pending
        with self._lock:
            self._pending.extend(keep)
        self.recycle(spare)

    # -- fences ----------------------------------------------------------------------
    def fence(self, stream: Any) -> Any:
        """An event recorded on `stream` now: it passes once the work issued so far has."""
        with self._lock:
            ev = self._spare_events.pop() if self._spare_events else None
        if ev is None:
            ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(stream)
        return ev

    def recycle(self, events: list[Any]) -> None:
        """Fences that have passed, for reuse (a recorded event may be recorded again)."""
        if events:
            with self._lock:
                room = 4096 - len(self._spare_events)
                self._spare_events.extend(events[:max(room, 0)])

    # -- pinned staging --------------------------------------------------------------
    def pinned(self, nbytes: int) -> Any:
        """A pinned host block of at least `nbytes` (a power of two of 4 KiB or more, so the
        pool's exact-size free lists are reused), as a CuPy PinnedMemoryPointer."""
        size = max(4096, 1 << max(nbytes - 1, 0).bit_length())
        return self._pinned.malloc(size)

    # -- code ------------------------------------------------------------------------
    def catalog_module(self) -> Any:
        """The catalog, compiled for this GPU and loaded once per card (call with it current)."""
        with self._lock:
            if self._catalog is not None:
                return self._catalog
        compiled = catalog_image(self.arch)
        image = compiled.image if compiled.kind == "cubin" else compiled.image + b"\0"
        module = self.cp.cuda.function.Module()
        module.load(image)
        with self._lock:
            if self._catalog is None:
                self._catalog = module
            return self._catalog

    def catalog_function(self, name: str) -> Any:
        with self._lock:
            fn = self._catalog_functions.get(name)
        if fn is None:
            fn = self.catalog_module().get_function(name)
            with self._lock:
                self._catalog_functions.setdefault(name, fn)
        return fn

    def param_sizes(self, function: Any) -> list[int] | None:
        """Byte sizes of a loaded kernel's parameters, from the driver (CUDA 12.4+), or None."""
        query = self._param_info
        if query is None:
            return None
        sizes: list[int] = []
        offset, size = ctypes.c_size_t(), ctypes.c_size_t()
        for i in range(4096):
            status = query(ctypes.c_void_p(int(function.ptr)), ctypes.c_size_t(i),
                           ctypes.byref(offset), ctypes.byref(size))
            if status != 0:
                # CUDA_ERROR_INVALID_VALUE past the last parameter; anything else: unknown
                return sizes if status == 1 else None
            sizes.append(int(size.value))
        return None

    def check_dims(self, grid: tuple[int, int, int], block: tuple[int, int, int]) -> str | None:
        """Why CUDA would refuse this launch shape, or None."""
        threads = block[0] * block[1] * block[2]
        if threads > self.max_threads:
            return f"block {block} has {threads} threads; this GPU allows {self.max_threads}"
        for axis, (got, most) in enumerate(zip(block, self.max_block)):
            if got > most:
                return f"block dimension {'xyz'[axis]} is {got}; this GPU allows {most}"
        for axis, (got, most) in enumerate(zip(grid, self.max_grid)):
            if got > most:
                return f"grid dimension {'xyz'[axis]} is {got}; this GPU allows {most}"
        return None

    def mem_get_info(self) -> tuple[int, int]:
        """The card's own free and total bytes (cudaMemGetInfo), all processes included."""
        with self.use():
            free, total = self.rt.memGetInfo()
        return int(free), int(total)


def _param_info_function() -> Any:
    """`cuFuncGetParamInfo` from the driver library (CUDA 12.4+), or None."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            fn = getattr(ctypes.CDLL(lib), "cuFuncGetParamInfo")
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                       ctypes.POINTER(ctypes.c_size_t)]
        return fn
    return None
