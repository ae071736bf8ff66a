"""`HarpTensor`: a torch tensor whose storage is a HARP buffer on the session's device.

The tensor itself holds no data on the client: its sizes, strides, storage offset
and dtype are torch's own (a wrapper subclass), and its `harp_storage` names the
buffer; views share it. The buffer is freed when the last tensor that uses it is
gone.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import UnsupportedError
from .session import TorchSession

#: torch dtype -> the NumPy name the wire uses.
NUMPY_NAMES = {torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8",
               torch.int16: "int16", torch.int32: "int32", torch.int64: "int64",
               torch.float16: "float16", torch.float32: "float32", torch.float64: "float64",
               torch.complex64: "complex64", torch.complex128: "complex128"}


#: torch dtype -> bytes per element.
ITEMSIZE = {d: np.dtype(n).itemsize for d, n in NUMPY_NAMES.items()}


def numpy_name(dtype: torch.dtype) -> str:
    name = NUMPY_NAMES.get(dtype)
    if name is None:
        raise UnsupportedError(f"HARP's torch device has no {dtype} tensors yet")
    return name


class HarpStorage:
    """One buffer of the session's device, shared by the tensors that view it."""

    __slots__ = ("session", "buffer", "nbytes", "__weakref__")

    def __init__(self, session: TorchSession, nbytes: int) -> None:
        self.session = session
        self.nbytes = max(int(nbytes), 1)
        self.buffer = session.take(self.nbytes)

    def __del__(self) -> None:
        try:
            self.session.release(self.buffer, self.nbytes)   # kept or freed at the next call
        except AttributeError:
            pass


class HarpTensor(torch.Tensor):
    """A tensor on torch's `harp` device."""

    harp_storage: HarpStorage

    @staticmethod
    def __new__(cls, storage: HarpStorage, size: Any, stride: Any, offset: int,
                dtype: torch.dtype, requires_grad: bool = False) -> "HarpTensor":
        t = torch.Tensor._make_wrapper_subclass(
            cls, size, strides=stride, storage_offset=offset, dtype=dtype,
            device=torch.device("harp", 0), requires_grad=requires_grad)
        t.harp_storage = storage
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Everything is set in `__new__` (torch.Tensor's own __init__ takes no arguments)."""

    #: `harp.torch.dispatch.dispatch`, set when that module loads (it imports this one).
    dispatcher: Any = None

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        return HarpTensor.dispatcher(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        with torch._C.DisableTorchFunctionSubclass():
            text = repr(self.detach().cpu())
        if text.endswith(")"):
            text = text[:-1] + ", device='harp:0')"
        return text

    __str__ = __repr__

    def array_arg(self) -> Any:
        """This tensor as a launch's array argument (strides and offset in bytes; made once:
        a harp tensor's sizes never change)."""
        arg = self.__dict__.get("_harp_arg")
        if arg is None:
            arg = self.__dict__["_harp_arg"] = self._make_array_arg()
        return arg

    def _make_array_arg(self) -> Any:
        from ..types import ArrayArg
        size = ITEMSIZE[self.dtype]
        return ArrayArg.normalized(self.harp_storage.buffer, NUMPY_NAMES[self.dtype],
                                   tuple(self.shape), self.storage_offset() * size,
                                   tuple(s * size for s in self.stride()))


def new_tensor(session: TorchSession, size: Any, stride: Any, dtype: torch.dtype,
               offset: int = 0) -> HarpTensor:
    """A tensor on a new buffer, big enough for its sizes and strides (not zeroed:
    a buffer may be reused, as `torch.empty` allows)."""
    numpy_name(dtype)
    extent = span_elements(size, stride) + offset
    storage = HarpStorage(session, extent * ITEMSIZE[dtype])
    return HarpTensor(storage, size, stride, offset, dtype)


def span_elements(size: Any, stride: Any) -> int:
    """Elements from a view's first to one past its last (0 for an empty view)."""
    if any(s == 0 for s in size):
        return 0
    return 1 + sum((n - 1) * abs(st) for n, st in zip(size, stride))


def contiguous_strides(size: Any) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(list(size)):
        out.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(out))


def to_cpu(t: HarpTensor) -> torch.Tensor:
    """The tensor's values, read from the device (a sync call: waits for what is queued)."""
    size = t.element_size()
    n = span_elements(t.shape, t.stride())
    if n == 0:
        return torch.empty(tuple(t.shape), dtype=t.dtype)
    start = t.storage_offset() * size
    raw = t.harp_storage.session.device.read(t.harp_storage.buffer, start, n * size)
    flat = torch.from_numpy(np.frombuffer(bytearray(raw), np.dtype(numpy_name(t.dtype))))
    return flat.as_strided(tuple(t.shape), tuple(t.stride()), 0).clone()
