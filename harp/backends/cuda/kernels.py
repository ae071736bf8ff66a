"""Kernels of the cuda backend: the catalog in CUDA C, and what a launch needs to
marshal typed arguments for compiled kernels (PTX entry parsing, numba's array ABI).

Everything here is plain Python (no CuPy, no GPU), so it is tested on any machine:
the catalog source is compiled with NVRTC and assembled with ptxas, and run in a
host emulation of CUDA's thread model (tests/backends/test_cuda_cpu_only.py).

The catalog source is generated from `harp.catalog`, so every catalog kernel has
an `extern "C"` entry of exactly its catalog name, with the catalog's parameters
in order: buffers as `T*`, `n`/`m`/`k` as `long long`, `alpha`/`beta`/`value` as T.
Every kernel loops over its elements with a grid-stride loop over the flattened
3-D grid and block, so any grid and block give the same result. Floating-point
element-wise operations use the round-to-nearest intrinsics (`__fadd_rn`, ...),
which the compiler never contracts into FMAs, so their results are bit-identical
to NumPy's; integer arithmetic is done in the unsigned type of the same width,
which wraps exactly as NumPy's does (signed overflow is undefined in C++).
`reduce_sum` reduces each block in shared memory and adds the block's sum into
`out[0]` with one atomic; the backend zeroes `out[0]` on the same stream just
before the launch, so the kernel computes `out[0] = sum(x)` in one launch.
Integer sums wrap (addition modulo 2**bits is exact in any order); float sums
are accumulated in T in an order that depends on the launch shape.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np

from ... import catalog
from ...errors import ArgumentError

#: Most threads a CUDA block may have; the reduction's shared array is this long.
MAX_BLOCK_THREADS = 1024

# catalog type suffix -> (C type of T, C type the arithmetic is done in)
_CTYPES = {
    "f32": ("float", "float"),
    "f64": ("double", "double"),
    "i32": ("int", "unsigned int"),
    "i64": ("long long", "unsigned long long"),
}

_PRELUDE = r"""// The HARP kernel catalog in CUDA C, generated from harp.catalog by
// harp/backends/cuda/kernels.py. Do not edit: change the generator.
typedef long long harp_i64;

__device__ __forceinline__ unsigned int harp_block_threads() {
    return blockDim.x * blockDim.y * blockDim.z;
}
__device__ __forceinline__ unsigned int harp_thread_in_block() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ harp_i64 harp_thread_index() {
    const harp_i64 block = (harp_i64)blockIdx.x + (harp_i64)gridDim.x
        * ((harp_i64)blockIdx.y + (harp_i64)gridDim.y * (harp_i64)blockIdx.z);
    return block * (harp_i64)harp_block_threads() + (harp_i64)harp_thread_in_block();
}
__device__ __forceinline__ harp_i64 harp_grid_threads() {
    return (harp_i64)gridDim.x * (harp_i64)gridDim.y * (harp_i64)gridDim.z
        * (harp_i64)harp_block_threads();
}

// IEEE round-to-nearest arithmetic, never contracted into FMAs (bit-identical to NumPy).
#define HARP_OP(T, name, expr) \
    __device__ __forceinline__ T name(T a, T b) { return expr; }
HARP_OP(float, harp_add, __fadd_rn(a, b))
HARP_OP(double, harp_add, __dadd_rn(a, b))
HARP_OP(float, harp_sub, __fsub_rn(a, b))
HARP_OP(double, harp_sub, __dsub_rn(a, b))
HARP_OP(float, harp_mul, __fmul_rn(a, b))
HARP_OP(double, harp_mul, __dmul_rn(a, b))
HARP_OP(float, harp_div, __fdiv_rn(a, b))
HARP_OP(double, harp_div, __ddiv_rn(a, b))
// Integers: unsigned arithmetic wraps modulo 2**bits, as NumPy's integers do.
HARP_OP(unsigned int, harp_add, a + b)
HARP_OP(unsigned long long, harp_add, a + b)
HARP_OP(unsigned int, harp_sub, a - b)
HARP_OP(unsigned long long, harp_sub, a - b)
HARP_OP(unsigned int, harp_mul, a * b)
HARP_OP(unsigned long long, harp_mul, a * b)
__device__ __forceinline__ float harp_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double harp_fma(double a, double b, double c) {
    return __fma_rn(a, b, c);
}

__device__ __forceinline__ void harp_atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void harp_atomic_add(double* p, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
    unsigned long long* q = (unsigned long long*)p;
    unsigned long long old = *q, assumed;
    do {
        assumed = old;
        old = atomicCAS(q, assumed, (unsigned long long)__double_as_longlong(
            __longlong_as_double((long long)assumed) + v));
    } while (assumed != old);
#else
    atomicAdd(p, v);
#endif
}
__device__ __forceinline__ void harp_atomic_add(unsigned int* p, unsigned int v) {
    atomicAdd(p, v);
}
__device__ __forceinline__ void harp_atomic_add(unsigned long long* p, unsigned long long v) {
    atomicAdd(p, v);
}

#define HARP_FOR_EACH(i, n) \
    for (harp_i64 i = harp_thread_index(), harp_step_ = harp_grid_threads(); i < (n); \
         i += harp_step_)
"""

_BINARY = {"add": "harp_add", "sub": "harp_sub", "mul": "harp_mul"}


def _kernel_source(kernel: catalog.Kernel) -> str:
    op, name = kernel.op.name, kernel.name
    if op == "noop":
        return 'extern "C" __global__ void noop() {}\n'
    suffix = name.rsplit("_", 1)[1]
    T, U = _CTYPES[suffix]
    head = f'extern "C" __global__ void {name}('
    if op == "fill":
        return (f"{head}{T}* out, {T} value, harp_i64 n) {{\n"
                f"    HARP_FOR_EACH(i, n) out[i] = value;\n}}\n")
    if op == "scale":
        return (f"{head}{T}* out, const {T}* x, {T} alpha, harp_i64 n) {{\n"
                f"    HARP_FOR_EACH(i, n) out[i] = ({T})harp_mul(({U})alpha, ({U})x[i]);\n}}\n")
    if op == "axpy":
        return (f"{head}{T}* y, const {T}* x, {T} alpha, harp_i64 n) {{\n"
                f"    HARP_FOR_EACH(i, n) y[i] = ({T})harp_add(harp_mul(({U})alpha, ({U})x[i]), "
                f"({U})y[i]);\n}}\n")
    if op in _BINARY:
        return (f"{head}{T}* out, const {T}* a, const {T}* b, harp_i64 n) {{\n"
                f"    HARP_FOR_EACH(i, n) out[i] = ({T}){_BINARY[op]}(({U})a[i], ({U})b[i]);\n}}\n")
    if op == "div":
        return (f"{head}{T}* out, const {T}* a, const {T}* b, harp_i64 n) {{\n"
                f"    HARP_FOR_EACH(i, n) out[i] = harp_div(a[i], b[i]);\n}}\n")
    if op == "reduce_sum":
        return (f"{head}{T}* out, const {T}* x, harp_i64 n) {{\n"
                f"    __shared__ {U} partial[{MAX_BLOCK_THREADS}];\n"
                f"    {U} acc = ({U})0;\n"
                f"    HARP_FOR_EACH(i, n) acc = harp_add(acc, ({U})x[i]);\n"
                f"    const unsigned int t = harp_thread_in_block(), nt = harp_block_threads();\n"
                f"    partial[t] = acc;\n"
                f"    __syncthreads();\n"
                f"    unsigned int half = 1;\n"
                f"    while (half < nt) half <<= 1;\n"
                f"    for (half >>= 1; half > 0; half >>= 1) {{\n"
                f"        if (t < half && t + half < nt) partial[t] = harp_add(partial[t], "
                f"partial[t + half]);\n"
                f"        __syncthreads();\n"
                f"    }}\n"
                f"    if (t == 0) harp_atomic_add(({U}*)out, partial[0]);\n}}\n")
    if op == "gemm":
        return (f"{head}{T}* c, const {T}* a, const {T}* b, harp_i64 m, harp_i64 n, harp_i64 k, "
                f"{T} alpha, {T} beta) {{\n"
                f"    const harp_i64 total = m * n;\n"
                f"    HARP_FOR_EACH(idx, total) {{\n"
                f"        const harp_i64 row = idx / n, col = idx - row * n;\n"
                f"        {T} acc = ({T})0;\n"
                f"        for (harp_i64 p = 0; p < k; ++p) acc = harp_fma(a[row * k + p], "
                f"b[p * n + col], acc);\n"
                f"        c[idx] = harp_add(harp_mul(alpha, acc), harp_mul(beta, c[idx]));\n"
                f"    }}\n}}\n")
    raise KeyError(f"catalog operation {op!r} has no CUDA C implementation in "
                   "harp/backends/cuda/kernels.py")


def catalog_source() -> str:
    """The whole catalog as one CUDA C translation unit."""
    return _PRELUDE + "\n" + "\n".join(_kernel_source(k) for k in catalog.KERNELS.values())


#: Built at import, so a catalog operation without a CUDA C template fails loudly and early.
CATALOG_SOURCE = catalog_source()


# -- catalog arguments ----------------------------------------------------------------

# -- numba's CUDA array ABI -------------------------------------------------------------

def c_contiguous_strides(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= max(int(dim), 1)
    return tuple(reversed(strides))


def array_extent(offset: int, shape: Sequence[int], strides: Sequence[int],
                 itemsize: int) -> tuple[int, int]:
    """The byte range [lo, hi) that an array view touches (empty when it has no elements)."""
    if any(int(d) == 0 for d in shape):
        return offset, offset
    lo = hi = offset
    for dim, stride in zip(shape, strides):
        span = (int(dim) - 1) * int(stride)
        if span < 0:
            lo += span
        else:
            hi += span
    return lo, hi + itemsize


def check_array(buffer_size: int, offset: int, dtype: np.dtype, shape: Sequence[int],
                strides: Sequence[int] | None) -> tuple[int, ...]:
    """Check an array view against a real allocation; return its strides in bytes."""
    where = f"array argument {dtype.name}{list(shape)} at offset {offset}"
    if any(int(d) < 0 for d in shape):
        raise ArgumentError(f"{where}: negative dimension")
    if strides is None:
        strides = c_contiguous_strides(shape, dtype.itemsize)
    elif len(strides) != len(shape):
        raise ArgumentError(f"{where}: {len(strides)} strides for {len(shape)} dimensions")
    if offset % dtype.itemsize or any(int(s) % dtype.itemsize for s in strides):
        raise ArgumentError(f"{where}: offset and strides must be multiples of the item size "
                            f"({dtype.itemsize}); a GPU faults on misaligned element access")
    lo, hi = array_extent(offset, shape, strides, dtype.itemsize)
    if lo < 0 or hi > buffer_size:
        raise ArgumentError(f"{where} with strides {list(strides)} touches bytes [{lo}, {hi}), "
                            f"outside its buffer of {buffer_size} bytes")
    return tuple(int(s) for s in strides)


def numba_array_params(data_ptr: int, dtype: np.dtype, shape: Sequence[int],
                       strides: Sequence[int]) -> list[np.generic]:
    """The kernel parameters numba passes for one array (numba.cuda's dispatcher order):
    meminfo, parent, nitems, itemsize, data, shape[ndim], strides[ndim]."""
    nitems = math.prod(int(d) for d in shape)
    return ([np.uint64(0), np.uint64(0), np.int64(nitems), np.int64(dtype.itemsize),
             np.uint64(data_ptr)]
            + [np.int64(d) for d in shape] + [np.int64(s) for s in strides])


# -- PTX ------------------------------------------------------------------------------

_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$%.][\w$%.]*)\s*\(([^)]*)\)", re.S)
_PARAM_TYPE = re.compile(r"\.(?:[usbf])(8|16|32|64)\b")
_ARRAY = re.compile(r"\[\s*(\d+)\s*\]")


def ptx_text(image: bytes | str) -> str:
    if isinstance(image, str):
        return image
    return bytes(image).split(b"\0", 1)[0].decode("utf-8", "replace")


def ptx_entries(ptx: str) -> dict[str, list[int] | None]:
    """Kernel entries of a PTX module and the byte size of each of their parameters
    (None for an entry whose parameter list this parser does not understand)."""
    entries: dict[str, list[int] | None] = {}
    for match in _ENTRY.finditer(ptx):
        sizes: list[int] | None = []
        for param in match.group(2).split(","):
            if ".param" not in param:
                continue
            kind = _PARAM_TYPE.search(param)
            if kind is None:
                sizes = None
                break
            count = _ARRAY.search(param)
            sizes.append(int(kind.group(1)) // 8 * (int(count.group(1)) if count else 1))
        entries[match.group(1)] = sizes
    return entries


def _itanium_function_name(symbol: str) -> str | None:
    """The function's own name in an Itanium-mangled symbol: the innermost part of a nested
    name (`_ZN8__main__5saxpyB2v1...E...` -> "saxpy", how numba names its kernels) or a plain
    one (`_Z5saxpyPfS_` -> "saxpy", C++ CUDA without extern "C"); None if not mangled so."""
    if symbol.startswith("_ZN"):
        i, nested = 3, True
    elif symbol.startswith("_Z") and symbol[2:3].isdigit():
        i, nested = 2, False
    else:
        return None
    last = None
    while i < len(symbol) and symbol[i].isdigit():
        j = i
        while j < len(symbol) and symbol[j].isdigit():
            j += 1
        length = int(symbol[i:j])
        last = symbol[j:j + length]
        i = j + length
        if not nested:
            break
    return last


def resolve_entry(entries: Sequence[str], name: str) -> str:
    """The entry a client means by `name`: itself, or the one numba-mangled entry whose
    function name it is. Raises ArgumentError when there is none, or more than one."""
    if name in entries:
        return name
    matches = [e for e in entries if _itanium_function_name(e) == name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ArgumentError(f"module has no kernel {name!r}; it has "
                            f"{', '.join(sorted(entries)) or 'none'}")
    raise ArgumentError(f"kernel name {name!r} is ambiguous in this module (several "
                        f"specializations): pass one of {', '.join(sorted(matches))}")


def param_sizes(args: Sequence[Any]) -> list[int]:
    return [int(np.asarray(a).dtype.itemsize) for a in args]
