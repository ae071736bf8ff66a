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

from dataclasses import dataclass

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
