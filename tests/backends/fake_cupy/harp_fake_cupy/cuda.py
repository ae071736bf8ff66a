"""`cupy.cuda` of the host-memory stand-in (see the package docstring). NOT CuPy."""
from __future__ import annotations

import bisect
import ctypes
import importlib.util
import itertools
import os
import sys
import threading
import time
import types
import weakref
from typing import Any

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


def _emulation() -> types.ModuleType:
    mod = sys.modules.get("harp_cuda_emulation")
    if mod is None:
        path = os.path.join(os.path.dirname(_HERE), "harp_cuda_emulation.py")
        spec = importlib.util.spec_from_file_location("harp_cuda_emulation", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["harp_cuda_emulation"] = mod
    return mod


GIB = 1 << 30
TOTAL_MEMORY = int(os.environ.get("HARP_FAKE_CUPY_MEMORY", 8 * GIB))
_ids = itertools.count(0x10000)
_lock = threading.RLock()

#: Every launch, as (kernel name, grid, block, args, shared_mem, stream ptr), for tests to inspect.
launches: list[tuple] = []


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"cudaError {status}: {message}")
        self.status = status


class CUDADriverError(RuntimeError):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"CUDA_ERROR {status}: {message}")
        self.status = status


class OutOfMemoryError(MemoryError):
    pass


# -- what is alive: device allocations, pinned blocks, streams ----------------------------

class _Ranges:
    """Live [start, end) address ranges."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.starts: list[int] = []
        self.ends: dict[int, int] = {}

    def add(self, start: int, size: int) -> None:
        with _lock:
            bisect.insort(self.starts, start)
            self.ends[start] = start + size

    def remove(self, start: int) -> None:
        with _lock:
            i = bisect.bisect_left(self.starts, start)
            if i < len(self.starts) and self.starts[i] == start:
                del self.starts[i]
                del self.ends[start]

    def check(self, ptr: int, size: int, inclusive: bool = False) -> None:
        """[ptr, ptr+size) lies in one live range (with `inclusive`, ptr may be its end)."""
        if size == 0 and not inclusive:
            return
        with _lock:
            i = bisect.bisect_right(self.starts, ptr) - 1
            if i < 0 and inclusive:
                i = bisect.bisect_left(self.starts, ptr) - 1
            if i >= 0 and ptr + size <= self.ends[self.starts[i]]:
                return
        raise CUDARuntimeError(1, f"[{ptr:#x}, {ptr + size:#x}) is not inside a live "
                                  f"{self.what} (emulation check)")


_device = _Ranges("device allocation")
_pinned = _Ranges("pinned host block")
_streams: set[int] = set()
_pool_bytes = [0]


def _stream_ptr(stream: Any) -> int:
    ptr = stream if isinstance(stream, int) else stream.ptr
    if ptr not in _streams:
        raise CUDARuntimeError(400, f"stream {ptr:#x} is not a live stream (emulation check)")
    return ptr


# -- memory -----------------------------------------------------------------------------------

class MemoryPointer:
    def __init__(self, size: int) -> None:
        self.size = size
        if size == 0:
            self.mem, self.ptr = None, 0
            return
        raw = np.full(size + 512, 0xCD, np.uint8)          # garbage: zeroing must be done
        start = (-raw.ctypes.data) % 512
        self.mem = raw
        self.ptr = int(raw.ctypes.data + start)
        _device.add(self.ptr, size)
        weakref.finalize(self, _free_device, self.ptr, size)


    def __add__(self, offset: int) -> "MemoryPointer":
        """A pointer `offset` bytes further into the same allocation (as CuPy's)."""
        view = object.__new__(MemoryPointer)
        view.size, view.mem, view.ptr = self.size - offset, self.mem, self.ptr + offset
        view.base = self            # the allocation stays alive while a view of it does
        return view


def _free_device(ptr: int, size: int) -> None:
    _device.remove(ptr)
    with _lock:
        _pool_bytes[0] -= size


class MemoryPool:
    def __init__(self, allocator: Any = None) -> None:
        pass

    def malloc(self, size: int) -> MemoryPointer:
        with _lock:
            if _pool_bytes[0] + size > TOTAL_MEMORY:
                raise OutOfMemoryError(f"out of memory to allocate {size} bytes (emulation)")
            _pool_bytes[0] += size
        try:
            return MemoryPointer(size)
        except BaseException:
            with _lock:
                _pool_bytes[0] -= size
            raise

    def free_all_blocks(self, stream: Any = None) -> None:
        pass

    def used_bytes(self) -> int:
        return _pool_bytes[0]


class _PinnedBlock(np.ndarray):
    @property
    def ptr(self) -> int:
        return int(self.ctypes.data)


class PinnedMemoryPool:
    def __init__(self, allocator: Any = None) -> None:
        pass

    def malloc(self, size: int) -> _PinnedBlock:
        block = np.full(max(size, 1), 0xAB, np.uint8).view(_PinnedBlock)
        _pinned.add(block.ptr, size)
        weakref.finalize(block, _pinned.remove, block.ptr)
        return block

    def free_all_blocks(self) -> None:
        pass


memory = types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError, MemoryPool=MemoryPool,
                               MemoryPointer=MemoryPointer)


# -- runtime ------------------------------------------------------------------------------------

class _Runtime:
    memcpyHostToHost, memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 0, 1, 2, 3
    CUDARuntimeError = CUDARuntimeError

    def getDeviceCount(self) -> int:
        return int(os.environ.get("HARP_FAKE_CUPY_DEVICES", 1))

    def getDeviceProperties(self, device: int) -> dict:
        if not 0 <= device < self.getDeviceCount():
            raise CUDARuntimeError(101, "invalid device ordinal")
        return {"name": b"HARP emulated GPU (host memory)", "totalGlobalMem": TOTAL_MEMORY,
                "major": 9, "minor": 0, "multiProcessorCount": 1, "maxThreadsPerBlock": 1024,
                "maxThreadsDim": (1024, 1024, 64), "maxGridSize": (2**31 - 1, 65535, 65535),
                "pciBusID": 0, "pciDeviceID": 0, "pciDomainID": 0}

    def driverGetVersion(self) -> int:
        return 12090

    def runtimeGetVersion(self) -> int:
        return 12090

    def memGetInfo(self) -> tuple[int, int]:
        return TOTAL_MEMORY - _pool_bytes[0], TOTAL_MEMORY

    def memcpyAsync(self, dst: int, src: int, size: int, kind: int, stream: int) -> None:
        _stream_ptr(stream)
        (_pinned if kind == 1 else _device).check(src, size)
        (_pinned if kind == 2 else _device).check(dst, size)
        ctypes.memmove(dst, src, size)

    def memsetAsync(self, ptr: int, value: int, size: int, stream: int) -> None:
        _stream_ptr(stream)
        _device.check(ptr, size)
        ctypes.memset(ptr, value, size)

    def eventQuery(self, event: int) -> int:
        return 0


runtime = _Runtime()
driver = types.SimpleNamespace(CUDADriverError=CUDADriverError)


class Device:
    def __init__(self, device: int = 0) -> None:
        self.id = device

    def __enter__(self) -> "Device":
        if not 0 <= self.id < runtime.getDeviceCount():
            raise CUDARuntimeError(101, "invalid device ordinal")
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    @property
    def compute_capability(self) -> str:
        return "90"


class Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr = next(_ids)
        _streams.add(self.ptr)
        weakref.finalize(self, _streams.discard, self.ptr)

    def synchronize(self) -> None:
        _stream_ptr(self)

    def wait_event(self, event: "Event") -> None:
        _stream_ptr(self)
        if not isinstance(event, Event):
            raise TypeError("wait_event takes an Event")

    @property
    def done(self) -> bool:
        return True


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self.ptr = next(_ids)
        self.timing = not disable_timing
        self.time_ns: int | None = None

    def record(self, stream: Stream | None = None) -> None:
        if stream is not None:
            _stream_ptr(stream)
        self.time_ns = time.perf_counter_ns()

    def synchronize(self) -> None:
        pass

    @property
    def done(self) -> bool:
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    if not (start.timing and end.timing):
        raise CUDARuntimeError(400, "event created with timing disabled")
    if start.time_ns is None or end.time_ns is None:
        raise CUDARuntimeError(400, "event not recorded")
    return (end.time_ns - start.time_ns) / 1e6


# -- modules ------------------------------------------------------------------------------------

class Function:
    def __init__(self, module: "Module", name: str) -> None:
        self.module, self.name, self.ptr = module, name, next(_ids)

    def __call__(self, grid: tuple, block: tuple, args: Any, shared_mem: int = 0,
                 stream: Any = None) -> None:
        if not isinstance(grid, tuple) or not isinstance(block, tuple):
            raise TypeError("grid and block must be tuples (as CuPy's Function requires)")
        stream_ptr = _stream_ptr(stream) if stream is not None else 0
        for a in args:
            if isinstance(a, np.ndarray) and a.size == 1:    # passed by value, as CuPy does
                continue
            if not isinstance(a, np.generic):
                raise TypeError(f"the emulation takes NumPy scalars and size-1 arrays, got "
                                f"{type(a).__name__}")
        threads = block[0] * block[1] * block[2]
        if threads > 1024 or block[2] > 64 or grid[1] > 65535 or grid[2] > 65535:
            raise CUDADriverError(1, "CUDA_ERROR_INVALID_VALUE: launch shape (emulation)")
        launches.append((self.name, grid, block, list(args), shared_mem, stream_ptr))
        emu = _emulation()
        if self.module.catalog and emu.has_kernel(self.name):
            for a in args:
                if isinstance(a, np.generic) and a.dtype == np.uint64 and int(a):
                    _device.check(int(a), 0, inclusive=True)   # inside a live allocation
            emu.launch(self.name, grid, block, args)


class Module:
    def __init__(self) -> None:
        self.ptr = 0
        self.image = b""
        self.catalog = False

    def load(self, image: bytes) -> None:
        if not isinstance(image, bytes):
            raise TypeError("Module.load takes bytes (as CuPy's Module requires)")
        if not image.strip(b"\0"):
            raise CUDADriverError(200, "CUDA_ERROR_INVALID_IMAGE (emulation)")
        self.image, self.ptr = image, next(_ids)
        self.catalog = b"reduce_sum_f32" in image and b"gemm_f64" in image

    def get_function(self, name: str) -> Function:
        if name.encode() not in self.image:
            raise CUDADriverError(500, f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return Function(self, name)


function = types.SimpleNamespace(Module=Module, Function=Function)
