"""The shim's compiled-function types, apart from their launch machinery (`dispatcher.py`),
so the compilers (`ptx.py`, `source.py`) can tell kernels and device functions apart
without importing the dispatcher that imports them."""
from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

from .errors import UnsupportedAttributeError


class ShimFunction:
    """What kernels and device functions share: the Python function and its options."""

    device = False

    def __init__(self, py_func: Callable, sigs: Sequence[Any], options: dict[str, Any]) -> None:
        if not callable(py_func) or not hasattr(py_func, "__code__"):
            raise TypeError(f"cuda.jit takes a Python function, got {type(py_func).__name__}")
        self.py_func = py_func
        self.sigs = list(sigs)
        self.targetoptions = options
        self._lock = threading.RLock()
        functools.update_wrapper(self, py_func)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise UnsupportedAttributeError(
            f"{type(self).__name__}.{name} of numba's dispatcher is not supported under HARP: "
            "HARP compiles a kernel for the device it launches on (PTX for a CUDA device, "
            "its source for a cpu device), so numba's compiled overloads and the rest of "
            "its dispatcher's internals do not exist here")


class DeviceFunction(ShimFunction):
    """A `@cuda.jit(device=True)` function: callable from kernels, compiled with them."""

    device = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"device function {self.py_func.__name__} can be called only from a "
                        "kernel or another device function")

    def __repr__(self) -> str:
        return f"<HARP cuda device function {self.py_func.__qualname__}>"


class KernelFunction(ShimFunction):
    """A `@cuda.jit` kernel (the launchable kind: `dispatcher.Dispatcher`)."""
