"""Run the catalog's CUDA C on the host: a test tool for machines without a GPU.

The catalog source (harp.backends.cuda.kernels.CATALOG_SOURCE) is compiled with
g++ together with a small emulation of CUDA's execution model: `blockIdx`,
`threadIdx`, `blockDim`, `gridDim`, `__syncthreads` (a real barrier between the
threads of a block, which run as host threads when the kernel needs it),
`atomicAdd`, and the round-to-nearest intrinsics. Blocks run one after another,
so `__shared__` arrays are function statics. Floating point is compiled with
`-ffp-contract=off`, so `__fadd_rn` and friends are exact IEEE operations, as on
a GPU.

This checks the kernels' logic (grid-stride loops over 3-D grids, the block
reduction with any block size, integer wraparound, gemm indexing) against NumPy.
It cannot check what only a GPU does (memory model, warp scheduling, PTX).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Sequence

import numpy as np

from harp import catalog
from harp.backends.cuda.kernels import CATALOG_SOURCE

_EMULATION = r"""
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 { unsigned int x, y, z; };
static dim3 gridDim = {1, 1, 1}, blockDim = {1, 1, 1}, blockIdx = {0, 0, 0};
static thread_local dim3 threadIdx = {0, 0, 0};

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace harp_emu {
struct Barrier {
    std::mutex m;
    std::condition_variable cv;
    unsigned n = 1, count = 0, generation = 0;
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        unsigned g = generation;
        if (++count == n) { count = 0; ++generation; cv.notify_all(); }
        else cv.wait(lock, [&] { return g != generation; });
    }
};
static Barrier* barrier = nullptr;
static std::mutex atomic_mutex;
static std::mutex launch_mutex;
}

inline void __syncthreads() { harp_emu::barrier->wait(); }
template <class T> inline T atomicAdd(T* p, T v) {
    std::lock_guard<std::mutex> g(harp_emu::atomic_mutex);
    T old = *p; *p = old + v; return old;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
"""

_RUNNER = r"""
template <class F>
static void harp_run(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                     bool concurrent, F body) {
    std::lock_guard<std::mutex> launch(harp_emu::launch_mutex);
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    harp_emu::Barrier bar;
    bar.n = bx * by * bz;
    harp_emu::barrier = &bar;
    for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        if (concurrent) {
            std::vector<std::thread> threads;
            for (unsigned tz = 0; tz < bz; ++tz) for (unsigned ty = 0; ty < by; ++ty)
                for (unsigned tx = 0; tx < bx; ++tx)
                    threads.emplace_back([=] { threadIdx = {tx, ty, tz}; body(); });
            for (auto& t : threads) t.join();
        } else {
            for (unsigned tz = 0; tz < bz; ++tz) for (unsigned ty = 0; ty < by; ++ty)
                for (unsigned tx = 0; tx < bx; ++tx) { threadIdx = {tx, ty, tz}; body(); }
        }
    }
    harp_emu::barrier = nullptr;
}
"""

_CTYPES = {"float32": "float", "float64": "double", "int32": "int", "int64": "long long"}


def _launcher(kernel: catalog.Kernel) -> str:
    args = []
    for i, p in enumerate(kernel.op.params):
        dtype = kernel.param_dtype(p)
        c = _CTYPES[dtype]
        args.append(f"*({c}**)p[{i}]" if p.kind == "buffer" else f"*({c}*)p[{i}]")
    concurrent = "true" if kernel.op.name == "reduce_sum" else "false"
    return (f'extern "C" void harp_launch_{kernel.name}(unsigned gx, unsigned gy, unsigned gz, '
            f"unsigned bx, unsigned by, unsigned bz, void** p) {{\n"
            f"    harp_run(gx, gy, gz, bx, by, bz, {concurrent}, [p] {{ "
            f"{kernel.name}({', '.join(args)}); }});\n}}\n")


def emulation_source() -> str:
    return (_EMULATION + CATALOG_SOURCE + _RUNNER
            + "\n".join(_launcher(k) for k in catalog.KERNELS.values()))


_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def library() -> ctypes.CDLL:
    """The catalog compiled for the host (built once per source, cached in the temp dir)."""
    global _library
    with _lock:
        if _library is not None:
            return _library
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++) to build the catalog emulation")
        source = emulation_source()
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), f"harp-cuda-emulation-{digest}.so")
        if not os.path.exists(path):
            work = tempfile.mkdtemp(prefix="harp-cuda-emu-")
            src = os.path.join(work, "catalog_emulation.cpp")
            with open(src, "w") as f:
                f.write(source)
            out = os.path.join(work, "lib.so")
            result = subprocess.run(
                [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC",
                 "-shared", "-pthread", "-o", out, src],
                capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"g++ could not build the catalog emulation:\n{result.stderr}")
            os.replace(out, path)
            shutil.rmtree(work, ignore_errors=True)
        _library = ctypes.CDLL(path)
        return _library


def has_kernel(name: str) -> bool:
    return name in catalog.KERNELS


def launch(name: str, grid: Sequence[int], block: Sequence[int], args: Sequence[Any]) -> None:
    """Run catalog kernel `name`; `args` are NumPy scalars (pointers as uint64), as a launch
    passes them to CuPy."""
    values = [np.array(a) for a in args]             # keep each value alive and addressable
    params = (ctypes.c_void_p * max(len(values), 1))(*[v.ctypes.data for v in values])
    fn = getattr(library(), f"harp_launch_{name}")
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    fn(*(ctypes.c_uint(int(v)) for v in g + b), params)
