"""Which of numba's own `numba.cuda` names a program gets through HARP's, and why not the rest.

Much of numba.cuda touches no device: its configuration (`numba.cuda.config`), its
types and typing, the compiler's passes and errors (`numba.cuda.core.*`), NumPy
support. A program that imports those gets numba's own modules, loaded with numba's
real `numba.cuda` in place (`realcuda.real_numba_cuda`). What drives this process's
own CUDA driver, or numba's own dispatcher and launches, is refused with the reason:
a HARP program has no local GPU, and its kernels launch through HARP's `cuda.jit`.
"""
from __future__ import annotations

import importlib
from typing import Any

from .realcuda import real_numba_cuda

#: Submodules of numba.cuda that only describe, type or compile: numba's own serve them.
PURE_SUBMODULES = frozenset({
    "core", "types", "typing", "typeconv", "np", "extending", "errors", "descriptor", "flags",
    "utils", "misc", "testing", "tests", "cudadecl", "cudaimpl", "cudamath", "datamodel",
    "models", "compiler", "libdevice", "libdevicefuncs", "libdevicedecl", "libdeviceimpl",
    "cpython", "cgutils", "fp16", "bf16", "fp8", "mathimpl", "printimpl", "lowering", "args",
    "api_util", "cuda_paths", "itanium_mangler", "nvvmutils", "debuginfo", "serialize",
    "stubs", "cloudpickle", "_internal", "target", "codegen", "intrinsics", "locks",
    "vector_types", "_compat", "cext", "include", "cache_hints", "launchconfig",
})

#: Plain attributes of numba.cuda (not submodules) that are numba's own values.
PURE_ATTRIBUTES = frozenset({
    "HAS_NUMBA", "config", "implementation", "config_default_cc", "numba_cuda_default_ptx_cc",
    # code to link into kernels: holders of bytes (cuda.jit(link=...) says why it is refused)
    "CUSource", "PTXSource", "Archive", "Cubin", "Fatbin", "LinkableCode", "LTOIR", "Object",
    "literal_unroll",
})

#: Submodules HARP does not give a program, and why.
REFUSED_SUBMODULES = {
    "cudadrv": "it is the CUDA driver layer of this process, and a HARP program has no local "
               "GPU: its device is HARP's (use numba.cuda's own API)",
    "simulator": "it is numba's simulator of a local device; under HARP the device is HARP's "
                 "(a cpu device runs the simulator on its side)",
    "simulator_init": "it is numba's simulator of a local device; the device is HARP's",
    "device_init": "it initialises the CUDA driver of this process; the device is HARP's",
    "initialize": "it initialises the CUDA driver of this process; the device is HARP's",
    "dispatcher": "numba's dispatcher launches on this process's own GPU; HARP's kernels "
                  "come from numba.cuda.jit",
    "decorators": "numba's decorators build numba's dispatcher for this process's GPU; use "
                  "numba.cuda.jit",
    "api": "numba's host API drives this process's own GPU; use the numba.cuda module",
    "memory_management": "numba's memory managers allocate on this process's GPU; a HARP "
                         "device manages its own memory",
    "kernels": "numba's ready-made kernels (transpose, reduction) launch on this process's GPU",
    "cg": "cooperative groups need a cooperative launch, which HARP's launch does not make",
    "deviceufunc": "numba's CUDA ufuncs launch on this process's GPU (write the ufunc as a "
                   "kernel)",
    "vectorizers": "numba's CUDA ufuncs launch on this process's GPU (write the ufunc as a "
                   "kernel)",
    "ufuncs": "numba's CUDA ufuncs launch on this process's GPU",
}


def pure(fullname: str) -> bool:
    """Whether `numba.cuda.X[.Y...]` is one of numba's own modules that a program may import."""
    parts = fullname.split(".")
    return len(parts) > 2 and parts[:2] == ["numba", "cuda"] and parts[2] in PURE_SUBMODULES


def refusal(fullname: str) -> str:
    """Why `import numba.cuda.X...` is refused (for an `UnsupportedError`)."""
    head = fullname.split(".")[2]
    why = REFUSED_SUBMODULES.get(head)
    if why is None:
        why = (f"numba.cuda.{head} is not among the parts of numba.cuda that work without a "
               "local GPU")
    return f"import {fullname} is not supported under HARP: {why}"


def import_real(fullname: str) -> Any:
    """numba's own module `fullname`, imported with numba's `numba.cuda` in place."""
    with real_numba_cuda():
        return importlib.import_module(fullname)


def real_attribute(name: str) -> Any:
    """numba.cuda's own `name` (a pure attribute, or a pure submodule)."""
    with real_numba_cuda() as real:
        if name in PURE_SUBMODULES:
            return importlib.import_module(f"numba.cuda.{name}")
        return getattr(real, name)


def exists(name: str) -> bool:
    """Whether numba's own numba.cuda has `name` (an attribute or a submodule)."""
    with real_numba_cuda() as real:
        if hasattr(real, name):
            return True
        import importlib.util
        try:
            return importlib.util.find_spec(f"numba.cuda.{name}") is not None
        except (ImportError, ValueError):
            return False
