"""CUDA C to GPU code with NVRTC, on any machine (no GPU needed to compile).

Two ways to reach NVRTC, tried in order:

1. `cuda.bindings.nvrtc` (the `cuda-bindings` package, which `harp[numba]` brings
   through numba-cuda[cu12], with the NVRTC library of the `nvidia-cuda-nvrtc-cu12`
   wheel). It can emit a CUBIN for a real architecture (`sm_90`), which any 12.x
   driver loads, or PTX for a virtual one (`compute_90`).
2. CuPy's own NVRTC binding (`cupy.cuda.nvrtc`), when only `harp[cuda]` is
   installed. It emits PTX only; the driver JIT-compiles it, which needs a driver
   at least as new as that NVRTC.

`compile_cuda(source, arch=(9, 0))` picks a CUBIN for the device's own
architecture when this NVRTC knows it, else PTX for the newest virtual
architecture it knows that the device can run. A compile error raises
`CompileError` (an `ArgumentError`) carrying NVRTC's log.

Source from a tenant is compiled only by a pool server that trusts client code,
and even then it may name no file but CUDA's own headers:
`compile_client_source` refuses any `#include` that is not `<header>` of the
CUDA include directories (`cuda_include_dirs`), any `__has_include`, and gives
NVRTC no include path but those (and not the source's own directory), so an
`#include "/path/to/server.key"` can never put a server file into a compile log.
"""
from __future__ import annotations

import importlib.util
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ...errors import ArgumentError, PermissionDeniedError, UnsupportedError

#: Options every compile gets (before the caller's).
DEFAULT_OPTIONS = ("-std=c++17",)


class CompileError(ArgumentError):
    """NVRTC refused the source; `log` holds its messages."""

    def __init__(self, message: str, log: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.log = log


class NvrtcUnavailableError(UnsupportedError):
    """No NVRTC library could be loaded on this machine."""


@dataclass(frozen=True)
class Compiled:
    """The result of one compile: `image` is CUBIN or NUL-free PTX text, as `kind` says;
    `ptx` is the PTX text (also for a CUBIN, when NVRTC kept it), for its kernel entries."""
    image: bytes
    kind: str           # "cubin" or "ptx"
    arch: str           # what NVRTC compiled for, e.g. "sm_90" or "compute_90"
    log: str
    nvrtc: str          # which binding compiled it, and its version
    ptx: str | None = None


_lock = threading.Lock()
_binding: Any = None
_binding_error: str | None = None


def _load() -> Any:
    """The first NVRTC binding that works here (cached), or NvrtcUnavailableError."""
    global _binding, _binding_error
    with _lock:
        if _binding is not None:
            return _binding
        reasons = []
        for factory in (_BindingsNvrtc, _CupyNvrtc):
            try:
                _binding = factory()
                return _binding
            except Exception as exc:  # ImportError, a missing libnvrtc, ...
                reasons.append(f"{factory.label}: {type(exc).__name__}: {exc}")
        _binding_error = "; ".join(reasons)
    raise NvrtcUnavailableError(
        "NVRTC is not available here, so CUDA C cannot be compiled "
        f"(install 'harp[numba]' for cuda-bindings and the NVRTC wheel): {_binding_error}")


def available() -> tuple[bool, str]:
    """Whether NVRTC can be used here, and which binding (or why not)."""
    try:
        b = _load()
    except NvrtcUnavailableError as exc:
        return False, str(exc)
    return True, b.describe()


def version() -> tuple[int, int]:
    return _load().version()


def supported_archs() -> list[int] | None:
    """Compute capabilities (as 90 for 9.0) this NVRTC can target, or None if unknown."""
    return _load().supported_archs()


def choose_target(arch: tuple[int, int], kind: str = "auto") -> tuple[str, str]:
    """(NVRTC architecture option value, "cubin" or "ptx") for a device of capability `arch`."""
    cc = arch[0] * 10 + arch[1]
    binding = _load()
    known = binding.supported_archs()
    if kind == "cubin" or (kind == "auto" and binding.can_cubin and known and cc in known):
        if not binding.can_cubin:
            raise NvrtcUnavailableError(f"{binding.describe()} cannot emit CUBIN")
        return f"sm_{cc}", "cubin"
    if known:
        lower = [a for a in known if a <= cc]
        if not lower:
            raise UnsupportedError(f"{binding.describe()} cannot target compute capability "
                                   f"{arch[0]}.{arch[1]}; it knows {known}")
        cc = max(lower)
    return f"compute_{cc}", "ptx"


def compile_cuda(source: str | bytes, *, arch: tuple[int, int], kind: str = "auto",
                 options: Sequence[str] = (), name: str = "harp_module.cu") -> Compiled:
    """Compile CUDA C for a device of compute capability `arch` (e.g. (9, 0)).

    `kind` is "auto" (CUBIN when possible, else PTX), "cubin" or "ptx".
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = bytes(source).decode("utf-8")
    target, out_kind = choose_target(arch, kind)
    opts = [f"--gpu-architecture={target}", *DEFAULT_OPTIONS, *options]
    binding = _load()
    image, ptx, log = binding.compile(source, name, opts, out_kind)
    return Compiled(image=image, kind=out_kind, arch=target, log=log, nvrtc=binding.describe(),
                    ptx=ptx)


#: Longest compile log a client gets back.
MAX_LOG = 8192


def cuda_include_dirs() -> list[Path]:
    """CUDA's own header directories here: the CUDA runtime and CCCL wheels, and the
    toolkit under $CUDA_HOME (or /usr/local/cuda) when there is one."""
    dirs: list[Path] = []
    for package in ("nvidia.cuda_runtime", "nvidia.cuda_cccl"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(Path(location) / "include")
    found = [d.resolve() for d in dict.fromkeys(dirs) if d.is_dir()]
    if found:                   # the headers of the NVRTC wheel's own CUDA release
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    toolkit = Path(home) / "include"
    return [toolkit.resolve()] if toolkit.is_dir() else []


_INCLUDE_OPERAND = re.compile(r"<([A-Za-z0-9_][A-Za-z0-9_./+-]*)>\s*")
_FILE_DIRECTIVES = ("include", "include_next", "import", "embed")


def _strip_comments(text: str) -> str:
    """The text with comments replaced by a space (string and char literals kept)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            out.append(" ")
        elif c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def check_client_source(source: str, include_dirs: Sequence[Path]) -> None:
    """Refuse tenant CUDA C that would make the compiler read any file but CUDA's headers."""
    text = re.sub(r"\\\r?\n", "", source.replace("\r\n", "\n"))
    text = _strip_comments(text)
    if re.search(r"\b__has_include(_next)?\b", text):
        raise PermissionDeniedError("CUDA C sent to a pool server may not use __has_include: "
                                    "it would probe the server's files")
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip()
        if not stripped.startswith(("#", "%:", "??=")):
            continue
        directive = stripped.lstrip("#%:?=").lstrip()
        name = re.match(r"[A-Za-z_]+", directive)
        if name is None or name.group(0) not in _FILE_DIRECTIVES:
            continue
        operand = directive[name.end():].strip()
        match = _INCLUDE_OPERAND.fullmatch(operand)
        header = match.group(1) if match else None
        if header is None or ".." in header.split("/") or not any(
                (d / header).resolve().is_file() and
                (d / header).resolve().is_relative_to(d) for d in include_dirs):
            raise PermissionDeniedError(
                f"line {number}: a pool server compiles CUDA C that includes only CUDA's own "
                "headers, as #include <name>; inline your own headers, or compile on the "
                "client (harp.RawKernel/RawModule compile to PTX on the client for servers "
                "that do not compile)")


def compile_client_source(source: str | bytes, *, arch: tuple[int, int],
                          options: Sequence[str] = ()) -> Compiled:
    """Compile a tenant's CUDA C (on a server that trusts client code): CUDA's headers only,
    checked first, and NVRTC's log cut to `MAX_LOG` characters."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            source = bytes(source).decode("utf-8")
        except UnicodeDecodeError:
            raise ArgumentError("CUDA C source must be UTF-8 text") from None
    dirs = cuda_include_dirs()
    check_client_source(source, dirs)
    includes = [f"--include-path={d}" for d in dirs]
    try:
        return compile_cuda(source, arch=arch, name="harp_module.cu",
                            options=["--no-source-include", *includes, *options])
    except CompileError as exc:
        log = exc.log[:MAX_LOG]
        raise CompileError(f"NVRTC could not compile the module:\n{log.strip()}", log) from None


class _BindingsNvrtc:
    """NVRTC through `cuda.bindings.nvrtc` (cuda-bindings 12.x)."""

    label = "cuda.bindings.nvrtc"
    can_cubin = True

    def __init__(self) -> None:
        from cuda.bindings import nvrtc
        self.n = nvrtc
        err, self._major, self._minor = nvrtc.nvrtcVersion()
        self._check(err, "nvrtcVersion")
        self._archs: list[int] | None = None

    def describe(self) -> str:
        return f"NVRTC {self._major}.{self._minor} ({self.label})"

    def version(self) -> tuple[int, int]:
        return self._major, self._minor

    def supported_archs(self) -> list[int] | None:
        if self._archs is None:
            try:
                err, archs = self.n.nvrtcGetSupportedArchs()
                self._check(err, "nvrtcGetSupportedArchs")
                self._archs = sorted(int(a) for a in archs)
            except Exception:
                self._archs = []
        return self._archs or None

    def _check(self, err: Any, what: str) -> None:
        if err != self.n.nvrtcResult.NVRTC_SUCCESS:
            _, text = self.n.nvrtcGetErrorString(err)
            raise RuntimeError(f"{what} failed: {text.decode(errors='replace')}")

    def _log(self, prog: Any) -> str:
        err, size = self.n.nvrtcGetProgramLogSize(prog)
        if err != self.n.nvrtcResult.NVRTC_SUCCESS or size <= 1:
            return ""
        buf = b" " * size
        self.n.nvrtcGetProgramLog(prog, buf)
        return buf.rstrip(b"\0").decode("utf-8", "replace")

    def _ptx(self, prog: Any) -> bytes | None:
        err, size = self.n.nvrtcGetPTXSize(prog)
        if err != self.n.nvrtcResult.NVRTC_SUCCESS or size <= 1:
            return None
        buf = b" " * size
        (err,) = self.n.nvrtcGetPTX(prog, buf)
        return buf.rstrip(b"\0") if err == self.n.nvrtcResult.NVRTC_SUCCESS else None

    def compile(self, source: str, name: str, options: list[str],
                kind: str) -> tuple[bytes, str | None, str]:
        n = self.n
        err, prog = n.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
        self._check(err, "nvrtcCreateProgram")
        try:
            (err,) = n.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
            log = self._log(prog)
            if err != n.nvrtcResult.NVRTC_SUCCESS:
                _, text = n.nvrtcGetErrorString(err)
                raise CompileError(f"NVRTC could not compile {name} "
                                   f"({text.decode(errors='replace')}):\n{log.strip()}", log)
            ptx = self._ptx(prog)
            text = ptx.decode("utf-8", "replace") if ptx is not None else None
            if kind == "cubin":
                err, size = n.nvrtcGetCUBINSize(prog)
                self._check(err, "nvrtcGetCUBINSize")
                buf = b" " * size
                (err,) = n.nvrtcGetCUBIN(prog, buf)
                self._check(err, "nvrtcGetCUBIN")
                return buf, text, log
            if ptx is None:
                raise RuntimeError("NVRTC produced no PTX")
            return ptx, text, log
        finally:
            n.nvrtcDestroyProgram(prog)


class _CupyNvrtc:
    """NVRTC through CuPy's binding (`cupy.cuda.nvrtc`): PTX only."""

    label = "cupy.cuda.nvrtc"
    can_cubin = False

    def __init__(self) -> None:
        from cupy.cuda import nvrtc
        self.n = nvrtc
        self._major, self._minor = nvrtc.getVersion()

    def describe(self) -> str:
        return f"NVRTC {self._major}.{self._minor} ({self.label})"

    def version(self) -> tuple[int, int]:
        return self._major, self._minor

    def supported_archs(self) -> list[int] | None:
        get = getattr(self.n, "getSupportedArchs", None)
        if get is None:
            return None
        try:
            return sorted(int(a) for a in get())
        except Exception:
            return None

    def compile(self, source: str, name: str, options: list[str],
                kind: str) -> tuple[bytes, str | None, str]:
        n = self.n
        prog = n.createProgram(source, name, (), ())
        try:
            try:
                n.compileProgram(prog, options)
            except n.NVRTCError as exc:
                log = n.getProgramLog(prog)
                raise CompileError(f"NVRTC could not compile {name} ({exc}):\n{log.strip()}",
                                   log) from None
            ptx = n.getPTX(prog)
            return ptx.encode(), ptx, n.getProgramLog(prog)
        finally:
            n.destroyProgram(prog)
