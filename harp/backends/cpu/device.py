"""`CpuDevice`: one session on a cpu card, a real host-memory device.

A `HostDevice` (host-memory buffers, streams on a few pool threads, events with
real timestamps; numbering, handles, quota and deferred errors from
`BackendDevice`) whose kernels are the NumPy catalog or numba source in the
CUDA simulator (trusted sessions only).
"""
from __future__ import annotations


from typing import Any

import numpy as np

from ... import catalog
from ...errors import ArgumentError
from ...tenancy import ComputeGate, MemoryBroker
from ...types import ArrayArg, BufferArg, DeviceInfo, Scalar
from ..base import Loaded
from ..host import HostDevice, HostKernel
from .card import CpuCard
from .kernels import catalog_runner, load_numba_source, numba_runner


#: Most NumPy scalars a session keeps made (`CpuDevice._scalars`); past it, it starts over.
_KEPT_SCALARS = 1024


class CpuDevice(HostDevice):
    """A session on a `CpuCard`: its own handles, streams, quota and deferred errors."""

    CLIENT_CODE = {"numba-python": (
        "numba-python modules run client Python code on this host; the device refuses "
        "them unless opened with trust_client_code=True (a pool server: --trust-client-code)"
        " — for development and tests only")}

    def __init__(self, card: CpuCard, info: DeviceInfo, memory: MemoryBroker, *,
                 compute: ComputeGate | None = None, trust_client_code: bool = False) -> None:
        super().__init__(info, memory, name=f"harp-cpu{card.index}", card=card,
                         compute=compute, trust_client_code=trust_client_code)
        #: id(Scalar) -> (that Scalar, its NumPy value): a launch loop passes the same
        #: `Scalar` objects again (a pool server keeps them), and making the NumPy scalar is
        #: the dearest step of a scalar argument. Holding the `Scalar` keeps its id unique.
        self._scalars: dict[int, tuple[Scalar, Any]] = {}

    # -- kernels -------------------------------------------------------------------------
    def _load(self, image: bytes | str, format: str) -> Any:
        if format == "aten":
            from ..aten import AtenModule
            return AtenModule()
        # numba-python, trusted: the base checked
        source = image.decode("utf-8", "replace") if isinstance(image, bytes) else image
        return load_numba_source(source)

    def _catalog_target(self, kernel: catalog.Kernel) -> HostKernel:
        return HostKernel(kernel, catalog_runner(kernel), kernel.name)

    def _lookup(self, loaded: Loaded, name: str) -> HostKernel:
        if loaded.format == "aten":
            call = loaded.payload.call(name)
            return HostKernel(call, call.run, call.name)
        kernel = loaded.payload.get(name)
        if kernel is None:
            raise ArgumentError(f"module has no kernel {name!r}; it has "
                                f"{', '.join(sorted(loaded.payload)) or 'none'}")
        return HostKernel(None, numba_runner(kernel, loaded.payload.unpack), name)

    def _prepare(self, target: HostKernel, grid: tuple[int, int, int],
                 block: tuple[int, int, int], args: list) -> list:
        kernel = target.kernel
        if kernel is not None:
            if type(kernel) is not catalog.Kernel:     # an aten call
                return kernel.prepare([self._resolve(a) for a in args])
            prepared = self._catalog_fast(kernel.plan, args)
            if prepared is not None:
                return prepared
            catalog.check_args(kernel, args)
        return [self._resolve(a) for a in args]

    def _catalog_fast(self, plan: tuple, args: list) -> list | None:
        """A catalog launch's arguments resolved in one pass when every one is of the plain
        kind (a buffer in bounds, a scalar of the parameter's dtype that fits, a size not
        negative); None sends anything else down the checked path, which says what is
        wrong. Launches are the hot path: this is `check_args` and `_resolve` fused."""
        if len(args) != len(plan):
            return None
        if not args:
            return []
        buffers = self._buffers
        scalars = self._scalars
        fast_scalar = catalog.fast_scalar
        out: list = []
        append = out.append
        for (dtype, size), arg in zip(plan, args):
            t = type(arg)
            if dtype is None:
                if t is not BufferArg:
                    return None
                mem = buffers.get(arg.buffer.id)
                offset = arg.offset
                if mem is None or type(offset) is not int or not 0 <= offset <= mem.size:
                    return None
                append((mem, offset))
            else:
                if t is not Scalar or arg.dtype != dtype:
                    return None
                made = scalars.get(id(arg))
                if made is not None and made[0] is arg:     # the same Scalar as before
                    append(made[1])
                    continue
                value = fast_scalar(arg.value, dtype)
                if value is None or (size and value < 0):
                    return None
                if len(scalars) >= _KEPT_SCALARS:
                    scalars.clear()
                scalars[id(arg)] = (arg, value)      # holds arg: its id is not reused
                append(value)
        return out

    def _resolve(self, arg: Any) -> Any:
        """A kernel argument as the cpu kernels take it: (memory, offset), an array view,
        or a NumPy scalar of its dtype (a value that does not fit is an ArgumentError)."""
        t = type(arg)
        if t is BufferArg:                      # the common kinds first, without the slow
            mem = self._buffers.get(arg.buffer.id)   # paths' checks (launches are hot)
            offset = arg.offset
            if mem is not None and type(offset) is int and 0 <= offset <= mem.size:
                return (mem, offset)
        elif t is Scalar:
            value = catalog.fast_scalar(arg.value, arg.dtype)
            if value is not None:
                return value
        if isinstance(arg, BufferArg):
            return self._arg_memory(arg)
        if isinstance(arg, ArrayArg):
            mem = self._mem(arg.buffer)
            dtype = np.dtype(arg.dtype)
            try:
                return np.ndarray(arg.shape, dtype, buffer=mem, offset=arg.offset,
                                  strides=arg.strides)
            except (TypeError, ValueError) as exc:
                raise ArgumentError(f"array argument {arg.dtype}{list(arg.shape)} at offset "
                                    f"{arg.offset} does not fit its buffer of {mem.size} bytes: "
                                    f"{exc}") from None
        if isinstance(arg, Scalar):
            return catalog.scalar_value(arg.value, arg.dtype)
        raise ArgumentError(f"unknown kernel argument {arg!r}")
