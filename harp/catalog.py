"""The kernel catalog: named kernels that every backend implements.

Defined once here (names, parameters, semantics), so the cpu backend, the CUDA
backend and fixed-function devices (FPGA bitstreams, NPU operator sets) offer
the same list, and a client can use any of them without compiling anything.

A catalog kernel is named `OP_T`, e.g. `axpy_f32`. Buffer parameters are
`BufferArg`s holding elements of type T from their byte offset; `n`, `m`, `k`
are `int64` scalars; `alpha`, `beta`, `value` are scalars of type T. Grid and
block sizes do not change the result (every implementation loops over `n`).
Load the catalog with `device.load_module(CATALOG_IMAGE, "catalog")`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from .errors import ArgumentError
from .types import BufferArg, Scalar

CATALOG_IMAGE = b"harp.catalog/1"
CATALOG_VERSION = 1

DTYPES = {"f32": "float32", "f64": "float64", "i32": "int32", "i64": "int64"}
FLOATS = ("f32", "f64")
ALL = tuple(DTYPES)


@dataclass(frozen=True)
class Param:
    """One kernel parameter: `kind` is "buffer" or "scalar"; `dtype` is "T" or a NumPy name."""
    name: str
    kind: str
    dtype: str = "T"


@dataclass(frozen=True)
class Op:
    """One catalog operation, instantiated for each of its element types."""
    name: str
    params: tuple[Param, ...]
    types: tuple[str, ...]
    doc: str


def _b(name: str) -> Param:
    return Param(name, "buffer")


def _s(name: str, dtype: str = "T") -> Param:
    return Param(name, "scalar", dtype)


N = _s("n", "int64")

OPS: dict[str, Op] = {op.name: op for op in (
    Op("noop", (), ("",), "Does nothing; measures launch overhead."),
    Op("fill", (_b("out"), _s("value"), N), ALL, "out[i] = value for i < n"),
    Op("scale", (_b("out"), _b("x"), _s("alpha"), N), ALL, "out[i] = alpha * x[i]"),
    Op("axpy", (_b("y"), _b("x"), _s("alpha"), N), ALL, "y[i] = alpha * x[i] + y[i]"),
    Op("add", (_b("out"), _b("a"), _b("b"), N), ALL, "out[i] = a[i] + b[i]"),
    Op("sub", (_b("out"), _b("a"), _b("b"), N), ALL, "out[i] = a[i] - b[i]"),
    Op("mul", (_b("out"), _b("a"), _b("b"), N), ALL, "out[i] = a[i] * b[i]"),
    Op("div", (_b("out"), _b("a"), _b("b"), N), FLOATS, "out[i] = a[i] / b[i] (IEEE)"),
    Op("reduce_sum", (_b("out"), _b("x"), N), ALL,
       "out[0] = sum(x[i] for i < n), accumulated in T (integers wrap)"),
    Op("gemm", (_b("c"), _b("a"), _b("b"), _s("m", "int64"), _s("n", "int64"), _s("k", "int64"),
                _s("alpha"), _s("beta")), FLOATS,
       "C = alpha * A @ B + beta * C; row-major A[m,k], B[k,n], C[m,n]"),
)}


@dataclass(frozen=True)
class Kernel:
    """A catalog operation at one element type: what `device.function(module, name)` finds."""
    name: str
    op: Op
    dtype: str | None           # NumPy dtype name of T; None for noop

    def param_dtype(self, p: Param) -> str | None:
        return self.dtype if p.dtype == "T" else p.dtype

    @cached_property
    def plan(self) -> tuple[tuple[str | None, bool], ...]:
        """Per parameter: the scalar dtype (None for a buffer) and whether it counts
        elements, worked out once so that a launch's fast path checks no `Param`s."""
        return tuple((None, False) if p.kind == "buffer" else
                     (self.param_dtype(p), p.name in SIZE_PARAMS) for p in self.op.params)


def _instantiate() -> dict[str, Kernel]:
    kernels: dict[str, Kernel] = {}
    for op in OPS.values():
        for t in op.types:
            name = f"{op.name}_{t}" if t else op.name
            kernels[name] = Kernel(name, op, DTYPES.get(t))
    return kernels


KERNELS: dict[str, Kernel] = _instantiate()


def kernel_name(op: str, dtype: str) -> str:
    """The catalog name of `op` at NumPy dtype `dtype`, e.g. ("axpy", "float32") -> "axpy_f32"."""
    short = {v: k for k, v in DTYPES.items()}.get(str(dtype))
    name = f"{op}_{short}" if short else op
    if name not in KERNELS:
        raise KeyError(f"the catalog has no {op!r} for dtype {dtype}")
    return name


#: Catalog parameters that count elements (never negative).
SIZE_PARAMS = frozenset(("n", "m", "k"))


def check_args(kernel: Kernel, args: Sequence[Any]) -> None:
    """Check the argument kinds and scalar dtypes of a launch against the kernel's
    parameters (an `ArgumentError` saying which is wrong)."""
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


def scalar_value(value: Any, dtype: str) -> np.generic:
    """A NumPy scalar of `dtype` holding `value`, or an ArgumentError if it does not fit."""
    fast = fast_scalar(value, dtype)
    if fast is not None:
        return fast
    try:
        with np.errstate(over="raise"):
            return np.dtype(dtype).type(value)
    except (OverflowError, FloatingPointError, ValueError, TypeError) as exc:
        raise ArgumentError(f"scalar {value!r} does not fit {dtype}: {exc}") from None


def elements_needed(kernel: Kernel, sizes: dict[str, int]) -> dict[str, int]:
    """How many elements of T each buffer parameter of a catalog kernel touches, given its
    size scalars (`n`, and `m`, `k` for gemm)."""
    op = kernel.op.name
    need: dict[str, int] = {}
    for p in kernel.op.params:
        if p.kind != "buffer":
            continue
        if op == "gemm":
            m, n, k = sizes["m"], sizes["n"], sizes["k"]
            need[p.name] = {"a": m * k, "b": k * n, "c": m * n}[p.name]
        elif op == "reduce_sum" and p.name == "out":
            need[p.name] = 1
        else:
            need[p.name] = sizes["n"]
    return need


#: dtype name -> (NumPy type, lowest, highest) for integer dtypes, (type, None, None) for
#: floating ones: scalars of these convert without NumPy's error-state machinery.
_SCALAR_KINDS: dict[str, tuple[Any, Any, Any]] = {}
for _name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
    _limits = np.iinfo(_name)
    _SCALAR_KINDS[_name] = (np.dtype(_name).type, int(_limits.min), int(_limits.max))
for _name in ("float16", "float32", "float64"):
    _SCALAR_KINDS[_name] = (np.dtype(_name).type, None, None)


def fast_scalar(value: Any, dtype: str) -> Any:
    """`value` as a NumPy scalar of `dtype` when that is plain (an int in range, a finite
    float well inside the dtype's range); None to take the checked slow path."""
    kind = _SCALAR_KINDS.get(dtype)
    if kind is None:
        return None
    make, lo, hi = kind
    t = type(value)
    if lo is not None:
        return make(value) if t is int and lo <= value <= hi else None
    if t is int:
        if -_EXACT <= value <= _EXACT and (dtype != "float16" or -65504 < value < 65504):
            return make(value)
    elif t is float and math.isfinite(value):
        a = abs(value)
        if dtype == "float64" or a < _FLOAT_BELOW.get(dtype, 0.0):
            return make(value)
    return None


_EXACT = 1 << 53
_FLOAT_BELOW = {"float32": 3.4e38, "float16": 65504.0}
