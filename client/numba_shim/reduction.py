"""`cuda.Reduce` / `cuda.reduce`: a reduction of a 1-D array by a binary function, on the device.

numba builds a tree reduction in shared memory; HARP runs the reduction as one
kernel in which one thread folds the elements in order (`functools.reduce` order,
as Numba's simulator does), calling the program's function as a device function.
The result is the same for an associative function; on a GPU it is slower than
numba's tree for large arrays.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .devicearray import DeviceNDArray, new_array, to_device
from .dispatcher import Dispatcher
from .functions import DeviceFunction


def _fold_kernel(functor: Callable) -> Dispatcher:
    """A kernel that folds `arr[:size]` with `functor` from `init` into `out[0]`."""
    op = DeviceFunction(functor, (), {"device": True})

    def harp_reduce(arr, size, out, init):  # noqa: ANN001, ANN202 - a numba kernel
        acc = init
        for i in range(size):
            acc = op(acc, arr[i])
        out[0] = acc

    return Dispatcher(harp_reduce, (), {"device": False})


class Reduce:
    """numba's `cuda.Reduce(binop)`: call it with an array to reduce it on the device."""

    def __init__(self, functor: Callable) -> None:
        if not callable(functor) or not hasattr(functor, "__code__"):
            raise TypeError(f"cuda.Reduce takes a Python function, got {type(functor).__name__}")
        self._functor = functor
        self._kernel: Dispatcher | None = None

    def __call__(self, arr: Any, size: int | None = None, res: DeviceNDArray | None = None,
                 init: Any = 0, stream: Any = 0) -> Any:
        """The reduction of `arr[:size]` from `init`; written to `res[0]` (and None returned)
        if `res`, a device array, is given."""
        if self._kernel is None:
            self._kernel = _fold_kernel(self._functor)
        if not isinstance(arr, DeviceNDArray):
            arr = np.asarray(arr)
        if arr.ndim != 1:
            raise TypeError(f"cuda.Reduce takes a 1-D array, got {arr.ndim} dimensions")
        size = arr.shape[0] if size is None else int(size)
        if not 0 <= size <= arr.shape[0]:
            raise ValueError(f"size {size} is outside the array's {arr.shape[0]} elements")
        darr = arr if isinstance(arr, DeviceNDArray) else to_device(arr, stream=stream)
        out = res if res is not None else new_array((1,), darr.dtype, stream=stream)
        self._kernel[1, 1, stream](darr, size, out, init)
        if res is not None:
            return None
        return out.copy_to_host(stream=stream)[0]
