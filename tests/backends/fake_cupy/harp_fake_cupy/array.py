"""`cupy.ndarray` of the host-memory stand-in (see the package docstring). NOT CuPy.

Only what the cuda backend's `aten` path uses: an array over a range of a device
allocation (`ndarray(shape, dtype, memptr=..., strides=...)`, strides in bytes),
and DLPack. The range must lie inside a live allocation (an emulation check,
behind HARP's own); the memory is host memory, so DLPack says so (kDLCPU) and
hands over NumPy's view of it: torch gets a CPU tensor sharing the bytes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .cuda import CUDARuntimeError, MemoryPointer, _device

#: DLPack's device type of host memory.
KDLCPU = 1


class ndarray:  # noqa: N801  (CuPy's name)
    def __init__(self, shape: Any, dtype: Any = float, memptr: MemoryPointer | None = None,
                 strides: Any = None, order: str = "C") -> None:
        if memptr is None:
            raise TypeError("the emulation makes arrays over a given memptr only")
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        if strides is None:
            strides, step = [], dtype.itemsize
            for d in reversed(shape):
                strides.insert(0, step)
                step *= max(d, 1)
        strides = tuple(int(s) for s in strides)
        if 0 in shape:
            lo = hi = 0
        else:
            lo = sum(min(0, (d - 1) * s) for d, s in zip(shape, strides))
            hi = sum(max(0, (d - 1) * s) for d, s in zip(shape, strides)) + dtype.itemsize
        if hi > lo:
            _device.check(memptr.ptr + lo, hi - lo)
        raw = memptr.mem
        if raw is None:
            raise CUDARuntimeError(1, "an array over no memory (emulation check)")
        self._view = np.ndarray(shape, dtype, buffer=raw, offset=memptr.ptr - raw.ctypes.data,
                                strides=strides)
        self.shape, self.dtype, self.strides, self.data = shape, dtype, strides, memptr

    def __dlpack_device__(self) -> tuple[int, int]:
        return (KDLCPU, 0)

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._view.__dlpack__(**kwargs)
