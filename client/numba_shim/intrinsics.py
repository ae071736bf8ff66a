"""What kernels may use of `numba.cuda`, and the stand-ins the host sees for it.

`cuda.grid`, `cuda.threadIdx`, `cuda.shared.array`, `cuda.atomic.add`, ... only
mean something inside a kernel, which is compiled by numba (PTX) or run by
Numba's simulator on the device, never by the shim. On the host they are
stand-ins that say so when used. Before a kernel is compiled, its bytecode is
checked against the API its target supports, so an unsupported intrinsic is
named at once instead of failing later on the device.
"""
from __future__ import annotations

import dis
import re
import types
from typing import Any, Iterator, NoReturn

from harp.errors import UnsupportedError

from .errors import HINT

#: Kernel-side API that both targets run: Numba's simulator (cpu devices, "numba-python")
#: and numba's CUDA compiler (GPUs, "ptx").
COMMON_KERNEL_API = frozenset({
    "threadIdx", "blockIdx", "blockDim", "gridDim", "grid", "gridsize", "warpsize", "laneid",
    "shared", "local", "const", "atomic", "syncthreads", "syncthreads_count", "syncthreads_and",
    "syncthreads_or", "threadfence", "threadfence_block", "threadfence_system", "popc", "brev",
    "clz", "ffs", "fma", "cbrt", "selp", "fp16",
})
#: Only numba's CUDA compiler has these (the simulator does not).
PTX_ONLY_KERNEL_API = frozenset({
    "syncwarp", "all_sync", "any_sync", "eq_sync", "ballot_sync", "shfl_sync", "shfl_up_sync",
    "shfl_down_sync", "shfl_xor_sync", "match_any_sync", "match_all_sync", "activemask",
    "lanemask_lt", "nanosleep", "libdevice",
})
#: Kernel-side API that neither target supports, and why.
KERNEL_UNSUPPORTED = {
    "cg": "cooperative groups on a CUDA device (a grid-wide sync needs a cooperative launch, "
          "which HARP's launch does not make; Numba's simulator on a cpu device runs them)",
}
_VECTOR = re.compile(r"^(u?(char|short|int|long|longlong)|float|double)[1-4]$|"
                     r"^(u?int(8|16|32|64)|float(16|32|64))x[1-4]$")
#: numba's CUDA vector type names (cuda.float32x4, cuda.int2, ...).
VECTOR_TYPE = _VECTOR
#: Names whose attributes are namespaces of further intrinsics (cuda.atomic.add).
_NAMESPACES = frozenset({"shared", "local", "const", "atomic", "fp16", "libdevice", "cg"})


#: Only Numba's simulator runs these under HARP (it runs grid groups in one process; a GPU
#: needs a cooperative launch).
SIMULATOR_ONLY_KERNEL_API = frozenset({"cg"})


def kernel_api(fmt: str) -> frozenset[str]:
    if fmt == "ptx":
        return COMMON_KERNEL_API | PTX_ONLY_KERNEL_API
    return COMMON_KERNEL_API | SIMULATOR_ONLY_KERNEL_API


class KernelOnly:
    """The host's stand-in for a kernel intrinsic: any use outside a kernel raises."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path   # "grid", "atomic.add"

    def _fail(self, *_: Any, **__: Any) -> NoReturn:
        raise UnsupportedError(f"numba.cuda.{self.path} exists only inside a @cuda.jit kernel or "
                               "device function (compiled by numba, or run by the simulator on "
                               "the device); it cannot be used in host code")

    __call__ = __getitem__ = __iter__ = __index__ = __int__ = __float__ = __bool__ = _fail

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if self.path.split(".")[0] in _NAMESPACES:
            return KernelOnly(f"{self.path}.{name}")
        self._fail()

    def __repr__(self) -> str:
        return f"<numba.cuda.{self.path}: kernel-only intrinsic under HARP>"

    def resolve(self, real_cuda: types.ModuleType) -> Any:
        """The real numba object this stands for."""
        obj: Any = real_cuda
        for part in self.path.split("."):
            obj = getattr(obj, part)
        return obj


def intrinsic_names() -> list[str]:
    return sorted(COMMON_KERNEL_API | PTX_ONLY_KERNEL_API | set(KERNEL_UNSUPPORTED))


# -- looking at a kernel's code ---------------------------------------------------

def code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """`code` and every code object nested in it."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from code_objects(const)


def global_names(code: types.CodeType) -> list[str]:
    """Names the function reads as globals, in first-use order."""
    seen: dict[str, None] = {}
    for co in code_objects(code):
        for ins in dis.get_instructions(co):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                seen.setdefault(ins.argval, None)
    return list(seen)


def attribute_uses(fn: types.FunctionType) -> Iterator[tuple[str, str, str | None]]:
    """(global name, attribute, sub-attribute) for each `name.attr[.sub]` read in `fn`'s code,
    where `name` is a global or a closure variable."""
    for co in code_objects(fn.__code__):
        ins = [i for i in dis.get_instructions(co) if i.opname not in ("CACHE", "PRECALL",
                                                                         "PUSH_NULL")]
        for k, i in enumerate(ins):
            if i.opname in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME"):
                if k + 1 < len(ins) and ins[k + 1].opname in ("LOAD_ATTR", "LOAD_METHOD"):
                    sub = None
                    if k + 2 < len(ins) and ins[k + 2].opname in ("LOAD_ATTR", "LOAD_METHOD"):
                        sub = ins[k + 2].argval
                    yield i.argval, ins[k + 1].argval, sub


def check_kernel_code(fn: types.FunctionType, namespace: dict[str, Any], fmt: str,
                      what: str) -> None:
    """Refuse, naming it, any kernel-side numba.cuda API that target `fmt` cannot run.

    `namespace` maps the names the code reads (globals and closure variables) to values.
    """
    allowed = kernel_api(fmt)
    target = ("a cpu device (Numba's simulator)" if fmt == "numba-python"
              else "CUDA devices")
    for name, attr, sub in attribute_uses(fn):
        value = namespace.get(name)
        if getattr(value, "__harp_shim__", False):
            api = attr
        elif isinstance(value, types.ModuleType) and value.__name__ == "numba" and attr == "cuda":
            if sub is None:
                continue
            if fmt == "numba-python":
                raise UnsupportedError(
                    f"{what} uses numba.cuda.{sub} through the numba package; on {target} "
                    "kernels must use the cuda module (`from numba import cuda`, then "
                    f"cuda.{sub}), as in Numba's simulator ({HINT})")
            api = sub
        else:
            continue
        _check_api(api, allowed, target, what)
    from .errors import Unsupported
    for name, value in namespace.items():
        if isinstance(value, Unsupported):
            value()     # raises, naming the API
        if isinstance(value, KernelOnly):
            head = value.path.split(".")[0]
            if fmt == "numba-python":
                raise UnsupportedError(
                    f"{what} uses numba.cuda.{value.path} imported by name ({name}); on {target} "
                    f"kernels must use it as cuda.{value.path}, as in Numba's simulator ({HINT})")
            _check_api(head, allowed, target, what)


def _check_api(api: str, allowed: frozenset[str], target: str, what: str) -> None:
    if api in KERNEL_UNSUPPORTED and api not in allowed:
        raise UnsupportedError(f"{what} uses numba.cuda.{api}: {KERNEL_UNSUPPORTED[api]} is not "
                               f"supported under HARP ({HINT})")
    if api in allowed or _VECTOR.match(api):
        return
    if api in PTX_ONLY_KERNEL_API:
        raise UnsupportedError(f"{what} uses numba.cuda.{api}, which {target} does not run "
                               f"(it needs a CUDA device) ({HINT})")
    if api in _TYPE_NAMES and target == "CUDA devices":
        return
    why = ("Numba's simulator, which runs kernels there, does not provide it"
           if target.startswith("a cpu device") else
           "HARP compiles only the kernel APIs it has checked against its launches there")
    raise UnsupportedError(f"{what} uses numba.cuda.{api} inside the kernel, which is not a "
                           f"kernel API that HARP runs on {target}: {why} ({HINT})")


#: numba type names that numba.cuda re-exports (cuda.float32, ...).
_TYPE_NAMES = frozenset({
    "b1", "bool", "bool_", "boolean", "byte", "c16", "c8", "char", "complex128", "complex64",
    "double", "f4", "f8", "float32", "float64", "i1", "i2", "i4", "i8", "int16", "int32",
    "int64", "int8", "int_", "intc", "intp", "long_", "longlong", "short", "size_t", "ssize_t",
    "u1", "u2", "u4", "u8", "uchar", "uint", "uint16", "uint32", "uint64", "uint8", "uintc",
    "uintp", "ulong", "ulonglong", "ushort", "void", "none", "float16", "f2",
})
TYPE_NAMES = _TYPE_NAMES
