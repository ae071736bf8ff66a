"""Kernels compiled to PTX on the client with numba's CUDA target (no GPU needed).

The kernel's function is rebuilt with the globals numba expects: the shim
module becomes numba's real `numba.cuda`, shim device functions become real
numba device functions (compiled with the kernel), and kernel intrinsics
imported by name become numba's own. Then `numba.cuda.compile_ptx` compiles it
for the device's compute capability, and the kernel's name on the device is the
`.entry` numba gives it in the PTX.
"""
from __future__ import annotations

import contextlib
import re
import sys
import types
from typing import Any, Iterator

import numpy as np

from harp.errors import UnsupportedError

from .errors import HINT, unsupported
from .functions import DeviceFunction
from .functions import KernelFunction as Dispatcher
from .intrinsics import KernelOnly, check_kernel_code, global_names
from .realcuda import real_numba_cuda

_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([A-Za-z_$.][\w$.]*)\s*\(",
                    re.MULTILINE)
#: compile_ptx options taken from `cuda.jit` options.
_PTX_OPTIONS = ("debug", "lineinfo", "fastmath", "opt", "forceinline", "launch_bounds")


def entry_name(ptx: str) -> str:
    """The (first) kernel entry name in PTX text."""
    match = _ENTRY.search(ptx)
    if match is None:
        raise UnsupportedError("numba produced PTX without a kernel .entry")
    return match.group(1)


def numba_type(key: tuple) -> Any:
    """numba's type for an argument-type key of the dispatcher."""
    from numba.core import types as nbtypes
    from numba.np.numpy_support import from_dtype
    if key[0] == "array":
        return nbtypes.Array(from_dtype(np.dtype(key[1])), key[2], key[3])
    return from_dtype(np.dtype(key[1]))


def signature_keys(sig: Any) -> tuple:
    """Argument-type keys of an explicit `cuda.jit` signature ("void(float32[:], int32)")."""
    from numba.core import sigutils
    from numba.core import types as nbtypes
    from numba.np.numpy_support import as_dtype
    args, _ = sigutils.normalize_signature(sig)
    keys = []
    for t in args:
        if isinstance(t, nbtypes.Array):
            keys.append(("array", np.dtype(as_dtype(t.dtype)).str, t.ndim, t.layout))
        elif isinstance(t, (nbtypes.Integer, nbtypes.Float, nbtypes.Boolean)):
            keys.append(("scalar", np.dtype(as_dtype(t)).name))
        else:
            unsupported(f"a kernel signature with argument type {t}",
                        "kernel arguments are arrays and numeric scalars")
    return tuple(keys)


class _CompileTarget:
    """What numba asks the driver for when it compiles a device function: the cc."""

    def __init__(self, cc: tuple[int, int]) -> None:
        self.compute_capability = cc


@contextlib.contextmanager
def _pinned_cc(cc: tuple[int, int]) -> Iterator[None]:
    """numba compiles device functions for the *current device's* compute capability,
    asking the CUDA driver, which a client without a GPU does not have; during our
    compile it is the target device's."""
    dispatcher_mod = sys.modules.get("numba.cuda.dispatcher")
    original = getattr(dispatcher_mod, "get_current_device", None)
    if original is None:
        yield
        return
    dispatcher_mod.get_current_device = lambda: _CompileTarget(cc)  # type: ignore[union-attr]
    try:
        yield
    finally:
        dispatcher_mod.get_current_device = original  # type: ignore[union-attr]


def compile_kernel(kernel: Any, key: tuple, cc: tuple[int, int]) -> tuple[str, str]:
    """(PTX, entry name) of a shim `Dispatcher` for argument-type `key` at `cc`."""
    with real_numba_cuda() as real:
        if "simulator" in getattr(real.compile_ptx, "__module__", ""):
            raise UnsupportedError("NUMBA_ENABLE_CUDASIM=1 is set, so numba has no CUDA compiler "
                                   "in this process; unset it to run kernels on a CUDA device "
                                   "through HARP")
        with _pinned_cc(cc):
            fn = _rebuild(kernel.py_func, real, cc, {}, device=False)
            argtypes = tuple(numba_type(k) for k in key)
            options = {k: kernel.targetoptions[k] for k in _PTX_OPTIONS
                       if k in kernel.targetoptions}
            ptx, _ = real.compile_ptx(fn, argtypes, cc=cc, **options)
    return ptx, entry_name(ptx)


def _rebuild(fn: types.FunctionType, real: types.ModuleType, cc: tuple[int, int],
             memo: dict[int, Any], device: bool) -> types.FunctionType:
    """`fn` with its globals and closure cells mapped from the shim to numba's real objects."""
    what = f"{'device function' if device else 'kernel'} {fn.__qualname__}"

    def real_value(name: str, value: Any) -> Any:
        if getattr(value, "__harp_shim__", False):
            return real
        if isinstance(value, KernelOnly):
            return value.resolve(real)
        if isinstance(value, DeviceFunction):
            cache = value.__dict__.setdefault("_real_device", {})
            hit = cache.get(cc)
            if hit is None:
                inner = _rebuild(value.py_func, real, cc, memo, device=True)
                opts = {k: v for k, v in value.targetoptions.items()
                        if k in ("inline", "forceinline", "debug", "opt", "lineinfo", "fastmath")}
                hit = cache[cc] = (real.jit(value.sigs, device=True, **opts)(inner) if value.sigs
                                   else real.jit(device=True, **opts)(inner))
            return hit
        if isinstance(value, Dispatcher):
            raise UnsupportedError(f"{what} refers to the kernel {value.py_func.__qualname__} "
                                   f"({name}); kernels cannot call kernels ({HINT})")
        return value

    namespace: dict[str, Any] = {}
    if fn.__closure__:
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__):
            namespace[name] = cell.cell_contents
    for name in global_names(fn.__code__):
        if name in fn.__globals__:
            namespace.setdefault(name, fn.__globals__[name])
    check_kernel_code(fn, namespace, "ptx", what)
    globals_ = dict(fn.__globals__)
    for name in global_names(fn.__code__):
        if name in globals_:
            globals_[name] = real_value(name, globals_[name])
    closure = None
    if fn.__closure__:
        closure = tuple(types.CellType(real_value(n, c.cell_contents))
                        for n, c in zip(fn.__code__.co_freevars, fn.__closure__))
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__kwdefaults__ = fn.__kwdefaults__
    return new
