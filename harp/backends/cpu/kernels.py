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
from ...errors import ArgumentError, DeviceError, UnsupportedError
from ...types import BufferArg, Scalar

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


def _run_catalog(kernel: catalog.Kernel, a: list) -> None:
    op, name = kernel.op.name, kernel.name
    if op == "noop":
        return
    t = np.dtype(kernel.dtype)
    s = dict(zip((p.name for p in kernel.op.params), a))
    if op == "gemm":
        m, n, k = int(s["m"]), int(s["n"]), int(s["k"])
        c = _elements(s["c"], t, m * n, name, "c").reshape(m, n)
        am = _elements(s["a"], t, m * k, name, "a").reshape(m, k)
        bm = _elements(s["b"], t, k * n, name, "b").reshape(k, n)
        c[...] = s["alpha"] * (am @ bm) + s["beta"] * c
        return
    n = int(s["n"])
    el = lambda p: _elements(s[p], t, n, name, p)  # noqa: E731
    with np.errstate(all="ignore"):
        if op == "fill":
            el("out")[...] = s["value"]
        elif op == "scale":
            np.multiply(el("x"), s["alpha"], out=el("out"))
        elif op == "axpy":
            y = el("y")
            y[...] = s["alpha"] * el("x") + y
        elif op in ("add", "sub", "mul", "div"):
            ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op]
            ufunc(el("a"), el("b"), out=el("out"))
        elif op == "reduce_sum":
            out = _elements(s["out"], t, 1, name, "out")
            out[0] = el("x").sum(dtype=t)
        else:  # pragma: no cover - the catalog and this table are kept in step by tests
            raise DeviceError(f"catalog kernel {name} has no cpu implementation")


#: Catalog parameters that count elements (never negative).
SIZE_PARAMS = frozenset(("n", "m", "k"))


def check_catalog_args(kernel: catalog.Kernel, args: Sequence[Any]) -> None:
    """Check the argument kinds and scalar dtypes against the catalog signature."""
    params = kernel.op.params
    if len(args) != len(params):
        raise ArgumentError(f"{kernel.name} takes {len(params)} arguments "
                            f"({', '.join(p.name for p in params)}), got {len(args)}")
    for p, arg in zip(params, args):
        if p.kind == "buffer" and not isinstance(arg, BufferArg):
            raise ArgumentError(f"{kernel.name}: {p.name} must be a buffer, "
                                f"got {type(arg).__name__}")
        if p.kind == "scalar":
            want = kernel.param_dtype(p)
            if not isinstance(arg, Scalar) or arg.dtype != want:
                got = arg.dtype if isinstance(arg, Scalar) else type(arg).__name__
                raise ArgumentError(f"{kernel.name}: {p.name} must be a {want} scalar, got {got}")
            if p.name in SIZE_PARAMS and arg.value < 0:
                raise ArgumentError(f"{kernel.name}: {p.name} must be >= 0, got {arg.value}")


def catalog_function(name: str) -> tuple[catalog.Kernel, Runner]:
    """The catalog kernel `name` and the runner that executes it."""
    kernel = catalog.KERNELS.get(name)
    if kernel is None:
        raise ArgumentError(f"the catalog has no kernel {name!r}")
    return kernel, lambda grid, block, shared, a: _run_catalog(kernel, a)


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
    return {name: obj for name, obj in namespace.items()
            if isinstance(obj, FakeCUDAKernel) and not obj._device}


def numba_runner(kernel: Any) -> Runner:
    """A runner that launches a simulator kernel on resolved arguments."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    def as_sim_arg(arg: Any) -> Any:
        if isinstance(arg, tuple):        # a BufferArg: the bytes from its offset
            mem, offset = arg
            return FakeCUDAArray(mem[offset:])
        if isinstance(arg, np.ndarray):   # an ArrayArg view
            return FakeCUDAArray(arg)
        return arg

    def run(grid: tuple, block: tuple, shared: int, args: list) -> None:
        sim_args = [as_sim_arg(a) for a in args]
        with _SIMULATOR_LOCK:
            try:
                kernel[grid, block, 0, shared](*sim_args)
            except Exception as exc:
                raise DeviceError(f"kernel {kernel.fn.__name__} raised "
                                  f"{type(exc).__name__}: {exc}") from exc
    return run
