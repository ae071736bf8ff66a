"""`cuda.jit`: kernels and device functions, compiled on the client, launched on the HARP device.

A kernel is compiled for the device's best format (see `Session.kernel_format`):

- "ptx" (CUDA devices): numba compiles the kernel to PTX on the client, once per
  signature (argument types), for the device's compute capability; arrays go as
  `ArrayArg` (the backend expands them to numba's array ABI) and the kernel is
  numba's mangled entry name from the PTX.
- "numba-python" (a cpu device that trusts client code): the kernel's source,
  with the device functions and module globals it uses, runs in Numba's CUDA
  simulator on the device.

Each image is loaded once per session and reused by every launch.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
import threading
from typing import Any, Callable, Sequence

import numpy as np

from harp.types import Scalar

from . import packing
from .devicearray import DeviceNDArray, to_device
from .functions import DeviceFunction, KernelFunction, ShimFunction
from .errors import UnsupportedAttributeError, unsupported
from .session import Session, current
from .streams import stream_handle

#: `cuda.jit` options HARP takes. Those that only tune performance on a real GPU
#: and that PTX cannot carry (max_registers, cache, boundscheck,
#: shared_memory_carveout) are accepted and have no effect.
OPTIONS = frozenset({"device", "inline", "forceinline", "debug", "opt", "lineinfo", "cache",
                     "fastmath", "max_registers", "boundscheck", "launch_bounds",
                     "shared_memory_carveout", "extensions"})
REFUSED_OPTIONS = {
    "link": "linking extra device code (CUDA C, PTX, LTO-IR) into a kernel needs numba's "
            "linker on the device's side, which HARP does not send code to",
    "lto": "link-time optimisation needs numba's linker on the device's side",
    "argtypes": "argtypes= (give a signature instead)",
    "restype": "restype= (give a signature instead)",
}

#: Threads per block that `kernel.forall(n)` uses (numba asks the driver's occupancy
#: calculator, which a remote device does not offer; any kernel written for forall
#: is correct for any block size).
FORALL_BLOCK = 128

_TOKENS = itertools.count(1)


def _dims(value: Any, what: str) -> tuple[int, ...]:
    """A grid or block as numba checks it (`numba.cuda.errors.normalize_kernel_dimensions`)."""
    dims = list(value) if isinstance(value, (tuple, list)) else [value]
    if len(dims) > 3:
        raise ValueError(f"{what} must be a sequence of 1, 2 or 3 integers, got {dims!r}")
    if not dims or not all(isinstance(v, numbers.Integral) for v in dims):
        raise TypeError(f"{what} must be a sequence of integers, got {dims!r}")
    return tuple(int(v) for v in dims)


#: numba's words for a kernel called without `[griddim, blockdim]`.
MISSING_LAUNCH_CONFIG = ("Kernel launch configuration was not specified. Use the syntax: "
                         "kernel_function[blockspergrid, threadsperblock](arg0, arg1, ..., argn)")


class _ArgHint:
    """numba's `cuda.In`/`Out`/`InOut`: a host array copied in, out, or both around a launch."""

    copy_in = copy_out = True

    def __init__(self, value: Any) -> None:
        self.value = value


class In(_ArgHint):
    copy_out = False


class Out(_ArgHint):
    copy_in = False


class InOut(_ArgHint):
    pass


_ARG_HINTS = {"In": In, "Out": Out, "InOut": InOut}


class _Prepared:
    __slots__ = ("arg", "key", "array", "writeback", "python", "after")

    def __init__(self, arg: Any, key: tuple, array: DeviceNDArray | None = None,
                 writeback: np.ndarray | None = None, python: bool = False,
                 after: Callable[[], None] | None = None) -> None:
        self.arg, self.key, self.array, self.writeback = arg, key, array, writeback
        self.python = python      # a Python bool/int/float (not a NumPy scalar)
        self.after = after        # run once `writeback` holds what the kernel left


def _scalar(value: Any, index: int, name: str) -> _Prepared:
    """A scalar argument, typed as numba types it: a Python bool is boolean, an int int64
    (uint64 beyond), a float float64; a NumPy scalar keeps its dtype."""
    if isinstance(value, (bool, np.bool_)):
        return _Prepared(Scalar(bool(value), "bool"), ("scalar", "bool"),
                         python=isinstance(value, bool))
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            dtype = "int64"
        elif 0 <= value < (1 << 64):
            dtype = "uint64"
        else:
            raise OverflowError(f"kernel {name}: argument {index} ({value}) does not fit 64 bits")
        return _Prepared(Scalar(value, dtype), ("scalar", dtype), python=True)
    if isinstance(value, float):
        return _Prepared(Scalar(value, "float64"), ("scalar", "float64"), python=True)
    if isinstance(value, (np.integer, np.floating)):
        return _Prepared(Scalar(value.item(), value.dtype.name), ("scalar", value.dtype.name))
    unsupported(f"a kernel argument of type {type(value).__name__} (kernel {name}, "
                f"argument {index})", "kernel arguments are device arrays, NumPy arrays, "
                "and int/float/bool or NumPy scalars")


class Dispatcher(KernelFunction):
    """A `@cuda.jit` kernel: `kernel[grid, block](args)`, `kernel[grid, block, stream, shmem]`."""

    def __init__(self, py_func: Callable, sigs: Sequence[Any], options: dict[str, Any]) -> None:
        super().__init__(py_func, sigs, options)
        self._source: str | None = None        # numba-python image, built once
        self._ptx: dict[tuple, tuple[str, str]] = {}   # (cc, arg key) -> (PTX, entry name)
        self._explicit: list[tuple] | None = None      # parsed explicit signatures
        self._seen: list[tuple] = []                    # argument keys launched with
        self._token = next(_TOKENS)                     # this kernel's key in session caches
        self._print: bool | None = None                 # whether it calls print()
        #: numba's argument extensions: objects whose `prepare_args(ty, val, stream=,
        #: retr=)` may replace an argument before the launch (last appended runs first)
        self.extensions: list[Any] = list(options.get("extensions") or ())

    def __repr__(self) -> str:
        return f"<HARP cuda kernel {self.py_func.__qualname__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(f"kernel {self.py_func.__name__}: {MISSING_LAUNCH_CONFIG}")

    def __getitem__(self, config: Any) -> "_Launch":
        if not isinstance(config, tuple) or not 2 <= len(config) <= 4:
            raise ValueError("must specify at least the griddim and blockdim: "
                             "kernel[griddim, blockdim] or kernel[griddim, blockdim, stream, "
                             "sharedmem]")
        grid, block = _dims(config[0], "griddim"), _dims(config[1], "blockdim")
        stream = config[2] if len(config) > 2 else 0
        shared = config[3] if len(config) > 3 else 0
        return _Launch(self, grid, block, stream, int(shared))

    def forall(self, ntasks: int, tpb: int = 0, stream: Any = 0, sharedmem: int = 0) -> "_Launch":
        """A launch with enough threads for `ntasks` (`FORALL_BLOCK` per block unless `tpb`)."""
        if ntasks < 0:
            raise ValueError(f"Can't create ForAll with negative task count: {ntasks}")
        tpb = int(tpb) or FORALL_BLOCK
        blocks = max(1, math.ceil(ntasks / tpb))
        return _Launch(self, (blocks,), (tpb,), stream, int(sharedmem))

    @property
    def signatures(self) -> list[tuple]:
        """The argument-type keys this kernel has been launched with, in order."""
        return list(self._seen)

    # -- arguments -----------------------------------------------------------------
    def _prepare(self, session: Session, args: Sequence[Any], stream: Any, fmt: str
                 ) -> tuple[list[_Prepared], tuple]:
        """The launch's arguments, and the layout that rebuilds the kernel's from them
        (`packing`: complex, tuples, records and non-numeric arrays, numba-python only)."""
        out: list[_Prepared] = []
        layout = tuple(self._argument(value, i, session, stream, fmt, out)
                       for i, value in enumerate(args))
        return out, layout

    def _argument(self, value: Any, index: int, session: Session, stream: Any, fmt: str,
                  out: list[_Prepared]) -> tuple:
        """Append `value`'s launch arguments to `out`; its layout spec (`packing.Spec`)."""
        name = self.py_func.__name__
        hint: _ArgHint | None = None
        if isinstance(value, _ArgHint):
            hint, value = value, value.value
        if packing.packable(value) or (isinstance(value, DeviceNDArray)
                                       and packing.needs_packing(value.dtype)):
            if fmt != "numba-python":
                unsupported(f"a kernel argument of type {type(value).__name__} (kernel {name}, "
                            f"argument {index}) on a CUDA device",
                            "complex, tuple and record arguments and arrays of record, string "
                            "or datetime dtypes reach cpu devices (numba-python) only")
            return self._packed(value, hint, index, session, stream, fmt, out)
        if isinstance(value, DeviceNDArray):
            out.append(_Prepared(value.kernel_arg(session), _array_key(value), value))
        elif isinstance(value, np.ndarray):
            dev, back = self._host_array(value, hint, session, stream)
            out.append(_Prepared(dev.kernel_arg(session), _array_key(dev), dev, back))
        elif getattr(value, "__cuda_array_interface__", None) is not None:
            unsupported(f"a foreign CUDA array as a kernel argument (kernel {name}, "
                        f"argument {index})", "its memory is not on the HARP device")
        else:
            out.append(_scalar(value, index, name))
            return ("py",) if out[-1].python else ("arg",)
        return ("arg",)

    @staticmethod
    def _host_array(value: np.ndarray, hint: "_ArgHint | None", session: Session, stream: Any
                    ) -> tuple[DeviceNDArray, np.ndarray | None]:
        """numba copies a host array to the device for the launch, and back after it."""
        copy_in = hint is None or hint.copy_in
        dev = to_device(value, stream=stream, copy=copy_in, session=session)
        return dev, (value if (hint is None or hint.copy_out) else None)

    def _packed(self, value: Any, hint: "_ArgHint | None", index: int, session: Session,
                stream: Any, fmt: str, out: list[_Prepared]) -> tuple:
        if isinstance(value, (DeviceNDArray, np.ndarray)):
            if isinstance(value, DeviceNDArray):
                dev, back = value, None
            else:
                dev, back = self._host_array(value, hint, session, stream)
            arg, offset = dev.bytes_arg(session)
            out.append(_Prepared(arg, ("bytes",), dev, back))
            return ("array", packing.dtype_literal(dev.dtype), dev.shape, dev.strides, offset)
        if isinstance(value, (np.void, np.datetime64, np.timedelta64)):
            # a record (or a datetime): its bytes; numba passes a record by reference, so
            # what the kernel writes into it comes back into the program's record
            raw = np.frombuffer(value.tobytes(), np.uint8).copy()
            dev = to_device(raw, stream=stream, session=session)
            after = None
            if isinstance(value, np.void) and value.dtype.names:
                def after(record: np.void = value, raw: np.ndarray = raw) -> None:
                    got = raw.view(record.dtype)[0]
                    for field in record.dtype.names:
                        record[field] = got[field]
            out.append(_Prepared(dev.kernel_arg(session), ("bytes",), dev, raw, after=after))
            return ("record", packing.dtype_literal(value.dtype))
        if isinstance(value, (complex, np.complexfloating)):
            part = "float32" if isinstance(value, np.complex64) else "float64"
            for x in (value.real, value.imag):
                out.append(_Prepared(Scalar(float(x), part), ("scalar", part)))
            return ("complex", None if isinstance(value, complex) else np.dtype(type(value)).name)
        fields = getattr(type(value), "_fields", None)
        items = tuple(self._argument(v, index, session, stream, fmt, out) for v in value)
        if fields is None:
            return ("tuple", None, None, items)
        return ("tuple", type(value).__name__, tuple(fields), items)

    def _extend(self, value: Any, stream: Any, retr: list) -> Any:
        """`value` as the kernel's extensions make it (numba's `_prepare_args` order)."""
        import numba
        try:
            ty = numba.typeof(value)
        except Exception:          # a value numba cannot type: the extensions see None
            ty = None
        for extension in reversed(self.extensions):
            ty, value = extension.prepare_args(ty, value, stream=stream, retr=retr)
        hint = _ARG_HINTS.get(type(value).__name__)
        if hint is not None and not isinstance(value, _ArgHint) and \
                type(value).__module__ == "numba.cuda.args":
            value = hint(value.value)      # numba's own cuda.In/Out/InOut
        return value

    def specialize(self, *args: Any) -> "Dispatcher":
        """numba's `specialize`: a kernel for these arguments' types. HARP compiles each
        kernel per argument types anyway, so this is the same kernel, compiled anew."""
        return Dispatcher(self.py_func, self.sigs, self.targetoptions)

    def _apply_signature(self, prepared: list[_Prepared], fmt: str) -> list[_Prepared]:
        """With explicit signatures, pick the one numba would for these arguments (the fewest
        unsafe, then safe, then promoting conversions of the scalars; arrays must match) and
        cast the scalars to it. On a numba-python device a Python value stays the Python
        value, as Numba's simulator passes it."""
        if not self.sigs:
            return prepared
        from . import ptx
        if self._explicit is None:
            self._explicit = [ptx.signature_keys(s) for s in self.sigs]
        best: tuple | None = None
        for keys in self._explicit:
            cost = _conversion_cost(keys, prepared)
            if cost is not None and (best is None or cost < best[0]):
                best = (cost, keys)
        if best is None:
            raise TypeError(f"kernel {self.py_func.__name__}: no matching definition for "
                            f"argument types {[p.key for p in prepared]} among its signatures "
                            f"{self.sigs}")
        out = []
        for want, got in zip(best[1], prepared):
            if want[0] == "scalar":
                if not (got.python and fmt == "numba-python"):
                    value = np.array(got.arg.value).astype(want[1]).item()
                    got = _Prepared(Scalar(value, want[1]), want)
                else:
                    got = _Prepared(got.arg, want, python=True)
            else:
                got = _Prepared(got.arg, want, got.array, got.writeback)
            out.append(got)
        return out

    # -- compiling -----------------------------------------------------------------
    def _function(self, session: Session, fmt: str, key: tuple, layout: tuple = ()) -> Any:
        if self._print is None:
            self._print = self._prints()
        if self._print and session.remote:
            unsupported(f"print() in kernel {self.py_func.__name__} on a remote device",
                        "its output would appear on the pool server, not here; copy values "
                        "to the host and print them there")
        if fmt == "numba-python":
            with self._lock:
                if self._source is None:
                    from .source import kernel_source
                    self._source = kernel_source(self)
            source = self._source
            if layout:      # packed arguments: the module rebuilds them (packing)
                source += "\n" + packing.unpack_source(layout)
            # keyed by the module's text: kernels made again and again from one function
            # (cuda.jit in a loop, per test) share one module (a session holds MAX_MODULES)
            return session.function(("numba-python", source), source, fmt,
                                    self.py_func.__name__)
        cc = session.info.compute_capability or ptx_default_cc()
        ptx_text, entry = self.compile_ptx(key, cc)
        return session.function(("ptx", self._token, cc, key), ptx_text, "ptx", entry)

    def _prints(self) -> bool:
        """Whether the kernel, or a device function it calls, calls print()."""
        from .intrinsics import global_names
        todo, seen = [self.py_func], set()
        while todo:
            fn = todo.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            for name in global_names(fn.__code__):
                value = fn.__globals__.get(name)
                if name == "print" and value is None:
                    return True
                if isinstance(value, (DeviceFunction, KernelFunction)):   # both run inside
                    todo.append(value.py_func)
        return False

    def compile_ptx(self, key: tuple, cc: tuple[int, int]) -> tuple[str, str]:
        """PTX and entry name for argument-type `key` at compute capability `cc` (cached)."""
        with self._lock:
            hit = self._ptx.get((cc, key))
            if hit is None:
                from . import ptx
                hit = self._ptx[(cc, key)] = ptx.compile_kernel(self, key, cc)
            return hit

    def inspect_asm(self, signature: tuple | None = None,
                    cc: tuple[int, int] | None = None) -> Any:
        """PTX of this kernel, as numba's `inspect_asm`: for one argument-type key, or a dict
        for every key it was launched with. `cc` defaults to the session device's (or 9.0)."""
        if cc is None:
            session = current()
            cc = session.info.compute_capability or ptx_default_cc()
        if signature is not None:
            return self.compile_ptx(tuple(signature), tuple(cc))[0]
        return {key: self.compile_ptx(key, tuple(cc))[0] for key in self._seen}

    # -- launching -----------------------------------------------------------------
    def launch(self, grid: tuple, block: tuple, stream: Any, shared: int, args: Sequence[Any]
               ) -> None:
        session = current()
        fmt = session.require_kernel_format()
        stream_h = stream_handle(stream, session)
        retr: list[Callable[[], Any]] = []
        if self.extensions:
            args = [self._extend(value, stream, retr) for value in args]
        prepared, layout = self._prepare(session, args, stream, fmt)
        if packing.is_plain(layout):
            prepared, layout = self._apply_signature(prepared, fmt), ()
        key = tuple(p.key for p in prepared)
        fn = self._function(session, fmt, key, layout)
        with self._lock:
            if key not in self._seen:
                self._seen.append(key)
        with session.lock:
            handle = session.enter(stream_h)
            session.device.launch(fn, grid, block, [p.arg for p in prepared], shared_mem=shared,
                                  stream=handle)
        for p in prepared:
            if p.writeback is not None and p.array is not None:
                p.array.copy_to_host(p.writeback, stream=stream)
                if p.after is not None:
                    p.after()
        for writeback in retr:
            writeback()
        if self.targetoptions.get("debug"):
            # numba checks a debug kernel's exception flag after each launch: its exception
            # is raised by the launch itself
            session.synchronize()


def _conversion_cost(keys: tuple, prepared: list[_Prepared]) -> tuple[int, int, int] | None:
    """(unsafe, safe, promoting) scalar conversions from `prepared` to signature `keys`, as
    numba ranks overloads; None if an argument cannot match."""
    if len(keys) != len(prepared):
        return None
    unsafe = safe = promote = 0
    for want, got in zip(keys, prepared):
        if want[0] == "array":
            if got.key[0] != "array" or got.key[1:3] != want[1:3] or \
                    want[3] not in ("A", got.key[3]):
                return None
            continue
        if got.key[0] != "scalar":
            return None
        src, dst = np.dtype(got.key[1]), np.dtype(want[1])
        if src == dst:
            continue
        if src.kind == dst.kind and dst.itemsize > src.itemsize:
            promote += 1
        elif np.can_cast(src, dst, "safe"):
            safe += 1
        else:
            unsafe += 1
    return unsafe, safe, promote


def ptx_default_cc() -> tuple[int, int]:
    """The compute capability PTX is compiled for when a device reports none."""
    return (9, 0)


def _array_key(array: DeviceNDArray) -> tuple:
    return ("array", array.dtype.str, array.ndim, array.layout)


class _Launch:
    """`kernel[grid, block, stream, shared]`: call it with the kernel's arguments."""

    __slots__ = ("kernel", "grid", "block", "stream", "shared")

    def __init__(self, kernel: Dispatcher, grid: tuple, block: tuple, stream: Any,
                 shared: int) -> None:
        self.kernel, self.grid, self.block, self.stream, self.shared = \
            kernel, grid, block, stream, shared

    def __call__(self, *args: Any) -> None:
        self.kernel.launch(self.grid, self.block, self.stream, self.shared, args)


def jit(func_or_sig: Any = None, device: bool = False, **options: Any) -> Any:
    """numba's `cuda.jit`: a kernel (or, with `device=True`, a device function)."""
    for name in options:
        if name in REFUSED_OPTIONS:
            unsupported(f"cuda.jit({name}=...)", REFUSED_OPTIONS[name])
        if name not in OPTIONS:
            raise TypeError(f"cuda.jit got an unexpected option {name!r}")
    options = dict(options, device=bool(device))

    def make(fn: Callable, sigs: Sequence[Any]) -> ShimFunction:
        if isinstance(fn, ShimFunction):
            fn = fn.py_func
        return (DeviceFunction if device else Dispatcher)(fn, sigs, options)

    if func_or_sig is None:
        return lambda fn: make(fn, ())
    if callable(func_or_sig) and hasattr(func_or_sig, "__code__"):
        return make(func_or_sig, ())
    # as numba: a list holds several signatures; a str, a tuple of types or a Signature is one
    sigs = list(func_or_sig) if isinstance(func_or_sig, list) else [func_or_sig]
    return lambda fn: make(fn, sigs)
