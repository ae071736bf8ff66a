"""Kernels of the cpu backend: the catalog in NumPy, and numba `@cuda.jit`
source run in Numba's CUDA simulator.

Launch arguments arrive resolved: a `BufferArg` as (byte array, offset), an
`ArrayArg` as a NumPy view, a `Scalar` as a NumPy scalar.
"""
from __future__ import annotations

import builtins
import threading
import types
from typing import Any, Callable, Sequence

import numpy as np

from ... import catalog
from ...errors import ArgumentError, DeviceError, UnsupportedError, kernel_raised

Runner = Callable[[tuple[int, int, int], tuple[int, int, int], int, list], None]


# -- the catalog -------------------------------------------------------------

def _elements(arg: Any, dtype: np.dtype, count: int, kernel: str, param: str) -> np.ndarray:
    """`count` elements of `dtype` at a (byte array, offset) argument, bounds-checked."""
    mem, offset = arg
    need = count * dtype.itemsize
    if offset + need > mem.size:
        raise ArgumentError(f"{kernel}: {param} needs {need} bytes at offset {offset}, "
                            f"but its buffer has {mem.size}")
    return mem[offset:offset + need].view(dtype)


_UFUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


def catalog_runner(kernel: catalog.Kernel) -> Runner:
    """The runner of one catalog kernel, with what does not change between launches
    (its dtype, its parameters' places) worked out once, not per launch."""
    op, name = kernel.op.name, kernel.name
    if op == "noop":
        return lambda grid, block, shared, a: None
    t = np.dtype(kernel.dtype)
    at = {p.name: i for i, p in enumerate(kernel.op.params)}

    def el(a: list, param: str, n: int) -> np.ndarray:
        return _elements(a[at[param]], t, n, name, param)

    if op == "gemm":
        def gemm(grid: Any, block: Any, shared: int, a: list) -> None:
            m, n, k = int(a[at["m"]]), int(a[at["n"]]), int(a[at["k"]])
            c = el(a, "c", m * n).reshape(m, n)
            am = el(a, "a", m * k).reshape(m, k)
            bm = el(a, "b", k * n).reshape(k, n)
            with np.errstate(all="ignore"):
                c[...] = a[at["alpha"]] * (am @ bm) + a[at["beta"]] * c
        return gemm
    i_n = at.get("n")

    def elementwise(grid: Any, block: Any, shared: int, a: list) -> None:
        n = int(a[i_n])
        if n == 0 and op != "reduce_sum":            # the sum of nothing is still written
            return
        with np.errstate(all="ignore"):
            if op == "fill":
                el(a, "out", n)[...] = a[at["value"]]
            elif op == "scale":
                np.multiply(el(a, "x", n), a[at["alpha"]], out=el(a, "out", n))
            elif op == "axpy":
                y = el(a, "y", n)
                y[...] = a[at["alpha"]] * el(a, "x", n) + y
            elif op in _UFUNCS:
                _UFUNCS[op](el(a, "a", n), el(a, "b", n), out=el(a, "out", n))
            elif op == "reduce_sum":
                el(a, "out", 1)[0] = el(a, "x", n).sum(dtype=t)
            else:  # pragma: no cover - the catalog and this table are kept in step by tests
                raise DeviceError(f"catalog kernel {name} has no cpu implementation")
    return elementwise


# -- numba kernels in the CUDA simulator ---------------------------------------

# The simulator swaps module globals during a launch and keeps a global kernel
# context, so launches must not overlap.
_SIMULATOR_LOCK = threading.Lock()


def _simulator() -> types.ModuleType:
    try:
        import numba.cuda.simulator as sim
    except ImportError as exc:
        raise UnsupportedError("numba-python kernels need numba and numba-cuda "
                               "(pip install 'harp[numba]')") from exc
    return sim


class _NumbaWithSimulator(types.ModuleType):
    """`numba` as kernel source sees it: the real package, with `cuda` the simulator."""

    def __init__(self, sim: types.ModuleType) -> None:
        super().__init__("numba")
        self.cuda = sim

    def __getattr__(self, name: str) -> Any:
        import numba
        return getattr(numba, name)


def load_numba_source(source: str) -> dict[str, Any]:
    """Execute kernel source with `from numba import cuda` bound to the simulator.

    Returns the kernels it defines, by name. Runs client code: callers admit it
    only on a device opened with `trust_client_code=True`.
    """
    sim = _simulator()
    proxy = _NumbaWithSimulator(sim)

    def kernel_import(name: str, globals_: Any = None, locals_: Any = None,
                      fromlist: Sequence[str] = (), level: int = 0) -> Any:
        if level == 0 and name == "numba":
            return proxy
        if level == 0 and name == "numba.cuda":
            return sim if fromlist else proxy
        return builtins.__import__(name, globals_, locals_, fromlist, level)

    kernel_builtins = dict(vars(builtins), __import__=kernel_import)
    namespace: dict[str, Any] = {"__builtins__": kernel_builtins, "__name__": "harp_kernel"}
    try:
        exec(compile(source, "<numba-python module>", "exec"), namespace)
    except Exception as exc:
        raise ArgumentError(f"numba-python module failed to load: "
                            f"{type(exc).__name__}: {exc}") from exc
    # The simulator, at launch, swaps the kernel's globals that are the real
    # `numba.cuda` for its per-launch fake module; point them there.
    import numba.cuda as real_cuda
    for name, obj in list(namespace.items()):
        if obj is sim:
            namespace[name] = real_cuda
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    module = NumbaModule({name: obj for name, obj in namespace.items()
                          if isinstance(obj, FakeCUDAKernel) and not obj._device})
    unpack = namespace.get(UNPACK)
    module.unpack = unpack if callable(unpack) else None
    return module


#: The function a numba-python module may define to rebuild its kernels' arguments (complex
#: values, tuples, records, arrays of record/string/datetime dtypes) from the launch's.
UNPACK = "__harp_args__"


class NumbaModule(dict):
    """A loaded numba-python module: its kernels by name, and its `__harp_args__` if any."""

    unpack: Callable[[list], list] | None = None


#: NumPy scalar types that are numba's types of Python's bool, int, float and complex: a
#: kernel sees these as the Python values (as in the simulator, where `flag is True` holds
#: and `math.ldexp` takes the int), a narrower dtype as the NumPy scalar it is.
_PYTHON_SCALARS = frozenset({np.bool_, np.int64, np.float64, np.complex128})


def numba_runner(kernel: Any, unpack: Callable[[list], list] | None = None) -> Runner:
    """A runner that launches a simulator kernel on resolved arguments (rebuilt by the
    module's `unpack` first, if it has one)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    def as_sim_arg(arg: Any) -> Any:
        if isinstance(arg, tuple):        # a BufferArg: the bytes from its offset
            mem, offset = arg
            return FakeCUDAArray(mem[offset:])
        if isinstance(arg, np.ndarray):   # an ArrayArg view
            return FakeCUDAArray(arg)
        if type(arg) in _PYTHON_SCALARS:  # the types numba gives Python values
            return arg.item()
        return arg

    def run(grid: tuple, block: tuple, shared: int, args: list) -> None:
        if unpack is None:
            sim_args = [as_sim_arg(a) for a in args]
        else:
            try:
                built = unpack(list(args))
                if not isinstance(built, (list, tuple)):
                    raise TypeError(f"{UNPACK} returned a {type(built).__name__}, not a list")
            except Exception as exc:
                raise ArgumentError(f"kernel {kernel.fn.__name__}: its module could not "
                                    f"rebuild the launch's arguments: {type(exc).__name__}: "
                                    f"{exc}") from exc
            sim_args = [FakeCUDAArray(a) if isinstance(a, np.ndarray) else
                        a.item() if type(a) in _PYTHON_SCALARS else a for a in built]
        with _SIMULATOR_LOCK:
            try:
                kernel[grid, block, 0, shared](*sim_args)
            except Exception as exc:
                raise kernel_raised(kernel.fn.__name__, exc) from exc
    return run
