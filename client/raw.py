"""CuPy-style CUDA C kernels on a HARP device: `harp.RawKernel` and `harp.RawModule`.

    add = harp.RawKernel(r'''
    extern "C" __global__ void add(float* y, const float* x, int n) {
        int i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < n) y[i] += x[i];
    }''', "add")
    add((blocks,), (threads,), (d_y, d_x, numpy.int32(n)))

The source goes to the device as a "cuda-source" image, which the pool server
compiles with NVRTC. A device that takes "ptx" but not "cuda-source" gets PTX
compiled here with NVRTC (also when compile options or C++ name expressions are
given, which a cuda-source image cannot carry). Arguments: HARP device arrays
(numba.cuda's, from `harp run` or `harp.client.numba_shim`) and `harp.Buffer` /
`harp.BufferArg` become pointers; NumPy scalars and `harp.Scalar` keep their dtype;
a bare Python number is refused, as everywhere in HARP (its width would be a guess).

`compile_ptx(arch)` compiles on this machine, no GPU needed (NVRTC from the
`nvidia-cuda-nvrtc` wheel, through `cuda.bindings.nvrtc`).
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from harp.device import Device
from harp.errors import ArgumentError, UnsupportedError
from harp.types import Buffer, BufferArg, Function, Module, Scalar, Stream


class CompileError(ArgumentError):
    """NVRTC refused the CUDA C source; the message holds its log."""


def _nvrtc() -> Any:
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:
        raise UnsupportedError("compiling CUDA C here needs cuda-bindings and the NVRTC wheel "
                               "(pip install 'harp[numba]')") from exc
    return nvrtc


def _check(nvrtc: Any, result: Any, what: str, prog: Any = None) -> Any:
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.rstrip(b"\x00 ").decode("utf-8", "replace")
        _, name = nvrtc.nvrtcGetErrorString(err)
        message = f"NVRTC {what} failed: {name.decode() if isinstance(name, bytes) else name}"
        raise CompileError(message + (f"\n{log}" if log else ""))
    return rest[0] if len(rest) == 1 else rest


def nvrtc_compile(source: str, *, arch: str = "sm_90", options: Sequence[str] = (),
                  name_expressions: Sequence[str] = (), filename: str = "harp_raw.cu"
                  ) -> tuple[str, dict[str, str]]:
    """Compile CUDA C to PTX here: (PTX text, {name expression: lowered kernel name})."""
    nvrtc = _nvrtc()
    virtual = arch.replace("sm_", "compute_") if arch.startswith("sm_") else arch
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], []),
                  "program creation")
    try:
        for expr in name_expressions:
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, expr.encode()), "name expression")
        opts = [f"--gpu-architecture={virtual}".encode()] + \
            [o.encode() for o in (*DEFAULT_OPTIONS, *options)]
        _check(nvrtc, nvrtc.nvrtcCompileProgram(prog, len(opts), opts), "compilation", prog)
        size = _check(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "PTX size")
        buf = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetPTX(prog, buf), "PTX")
        lowered = {}
        for expr in name_expressions:
            name = _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, expr.encode()), "lowered name")
            lowered[expr] = name.decode() if isinstance(name, bytes) else str(name)
        return buf.rstrip(b"\x00 ").decode("utf-8"), lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


#: Options every local compile gets before the caller's (as the pool server's NVRTC compile).
DEFAULT_OPTIONS = ("-std=c++17",)


def _sm(cc: tuple[int, int] | None) -> str:
    return f"sm_{cc[0]}{cc[1]}" if cc else "sm_90"


class RawModule:
    """A CUDA C module (CuPy's `RawModule`), loaded on a HARP device on first use.

    `device`: a `harp.Device`; default: the device of this process's numba.cuda
    session (what `harp run` attached, else `harp.connect()`'s default).
    """

    def __init__(self, code: str | None = None, *, options: Sequence[str] = (),
                 name_expressions: Sequence[str] | None = None, device: Device | None = None,
                 backend: str = "nvrtc", source: str | None = None) -> None:
        code = code if code is not None else source
        if not isinstance(code, str) or not code.strip():
            raise TypeError("RawModule needs the CUDA C source as a str")
        if backend != "nvrtc":
            raise UnsupportedError(f"RawModule backend {backend!r}: HARP compiles with NVRTC only")
        self.code = code
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions or ())
        self._device = device
        self._lock = threading.Lock()
        self._loaded: dict[int, tuple[Any, Module, str, dict[str, str], dict[str, Function]]] = {}

    def compile_ptx(self, arch: str = "sm_90") -> str:
        """PTX for `arch` (e.g. "sm_90"), compiled on this machine with NVRTC."""
        return nvrtc_compile(self.code, arch=arch, options=self.options,
                             name_expressions=self.name_expressions)[0]

    def get_lowered_name(self, name_expression: str, arch: str = "sm_90") -> str:
        """The mangled kernel name of a C++ name expression given at construction."""
        if name_expression not in self.name_expressions:
            raise ArgumentError(f"{name_expression!r} is not among the module's name_expressions")
        return nvrtc_compile(self.code, arch=arch, options=self.options,
                             name_expressions=self.name_expressions)[1][name_expression]

    def get_function(self, name: str) -> "RawKernel":
        """The kernel `name` (an `extern "C"` name, or one of the name expressions)."""
        return RawKernel(None, name, module=self)

    # -- on a device ---------------------------------------------------------------
    def _target(self) -> tuple[Device, Any]:
        """(device, numba.cuda session or None)."""
        if self._device is not None:
            from .numba_shim.session import peek
            session = peek()
            return self._device, (session if session is not None and
                                  session.device is self._device else None)
        from .numba_shim.session import current
        session = current()
        return session.device, session

    def _function(self, device: Device, session: Any, name: str) -> Function:
        with self._lock:
            entry = self._loaded.get(id(device))
            if entry is None or entry[0] is not device:
                entry = self._loaded[id(device)] = self._load(device)
            _, module, fmt, lowered, functions = entry
            fn = functions.get(name)
            if fn is None:
                if name in self.name_expressions and fmt == "ptx":
                    kernel = lowered[name]
                else:
                    kernel = name
                lock = session.lock if session is not None else threading.RLock()
                with lock:
                    fn = functions[name] = device.function(module, kernel)
            return fn

    def _load(self, device: Device) -> tuple[Any, Module, str, dict[str, str],
                                             dict[str, Function]]:
        info = device.info
        local = bool(self.options or self.name_expressions)
        if "cuda-source" in info.formats and not local:
            return device, device.load_module(self.code, "cuda-source"), "cuda-source", {}, {}
        if "ptx" in info.formats:
            ptx, lowered = nvrtc_compile(self.code, arch=_sm(info.compute_capability),
                                         options=self.options,
                                         name_expressions=self.name_expressions)
            return device, device.load_module(ptx, "ptx"), "ptx", lowered, {}
        why = ("compile options and name expressions need a device that takes \"ptx\" "
               "(compiled here)") if local and "cuda-source" in info.formats else \
            "CUDA C runs on devices that take \"cuda-source\" (compiled by the pool server " \
            "with NVRTC) or \"ptx\""
        raise UnsupportedError(f"RawModule/RawKernel on device {info.name!r}, which accepts "
                               f"{', '.join(info.formats) or 'no kernel images'}: {why}")


class RawKernel:
    """A CUDA C kernel (CuPy's `RawKernel`): `kernel(grid, block, args, shared_mem=0,
    stream=None)`."""

    def __init__(self, code: str | None, name: str, options: Sequence[str] = (), *,
                 device: Device | None = None, backend: str = "nvrtc",
                 module: RawModule | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("RawKernel needs the kernel's name")
        self.name = name
        self.module = module if module is not None else \
            RawModule(code, options=options, device=device, backend=backend)
        self.code = self.module.code

    def compile_ptx(self, arch: str = "sm_90") -> str:
        """PTX of the kernel's source for `arch`, compiled on this machine with NVRTC."""
        return self.module.compile_ptx(arch)

    def __call__(self, grid: Any, block: Any, args: Sequence[Any], *, shared_mem: int = 0,
                 stream: Any = None) -> None:
        device, session = self.module._target()
        fn = self.module._function(device, session, self.name)
        kernel_args = [_arg(a, i, self.name, device, session) for i, a in enumerate(args)]
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else grid
        block = tuple(block) if isinstance(block, (tuple, list)) else block
        if session is not None:
            from .numba_shim.devicearray import stream_handle
            handle = stream if isinstance(stream, Stream) else stream_handle(stream, session)
            with session.lock:
                handle = session.enter(handle)
                device.launch(fn, grid, block, kernel_args, shared_mem=shared_mem, stream=handle)
            return
        if stream is not None and not isinstance(stream, Stream):
            raise TypeError("with an explicit device, stream is a harp.Stream of that device")
        device.launch(fn, grid, block, kernel_args, shared_mem=shared_mem, stream=stream)


def _arg(value: Any, index: int, kernel: str, device: Device, session: Any) -> Any:
    from .numba_shim.devicearray import DeviceNDArray
    if isinstance(value, DeviceNDArray):
        if value.session.device is not device:
            raise ArgumentError(f"kernel {kernel}: argument {index} is a device array of "
                                "another device or session")
        return value.pointer_arg(value.session)
    if isinstance(value, (BufferArg, Scalar)):
        return value
    if isinstance(value, Buffer):
        return BufferArg(value, 0)
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise UnsupportedError(f"kernel {kernel}: argument {index} has dtype "
                                   f"{value.dtype}; scalars are bool, int, uint or float")
        return Scalar(value.item(), value.dtype.name)
    if isinstance(value, np.ndarray):
        raise TypeError(f"kernel {kernel}: argument {index} is a host array; copy it to the "
                        "device first (numba.cuda.to_device)")
    if isinstance(value, (bool, int, float)):
        raise TypeError(f"kernel {kernel}: argument {index} ({value!r}) needs an explicit "
                        "dtype: pass numpy.int32(...), numpy.float32(...) or harp.Scalar")
    raise TypeError(f"kernel {kernel}: cannot pass {type(value).__name__} as argument {index}")
