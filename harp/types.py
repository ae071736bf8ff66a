"""Handles, kernel arguments and device facts: the values the `Device` calls take and give.

Handles are opaque values chosen by the side that issues the call, so creating
one never waits for a device or a network. Their ids carry a per-session
random prefix, which lets a device tell a foreign handle from its own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

#: Kernel image formats a device may accept (see `DeviceInfo.formats`).
FORMATS = ("ptx", "cubin", "fatbin", "cuda-source", "catalog", "numba-python", "opencl-binary",
           "opencl-source", "onnx", "aten")

DEFAULT_STREAM_ID = 0


@dataclass(frozen=True, slots=True)
class Buffer:
    """A range of device memory."""
    id: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Module:
    """A loaded kernel image."""
    id: int
    format: str


@dataclass(frozen=True, slots=True)
class Function:
    """A kernel inside a module."""
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Stream:
    """An in-order queue of device work; id 0 is the default stream."""
    id: int


@dataclass(frozen=True, slots=True)
class Event:
    """A marker recorded on a stream: other streams can wait on it, and it carries a time."""
    id: int


DEFAULT_STREAM = Stream(DEFAULT_STREAM_ID)


@dataclass(frozen=True, slots=True)
class BufferArg:
    """A kernel argument that is a pointer into a buffer, at a byte offset."""
    buffer: Buffer
    offset: int = 0


#: dtype spellings already checked -> canonical name (np.dtype() is slow on a hot path).
_CHECKED_DTYPES: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class Scalar:
    """A kernel argument that is a scalar of an explicit dtype."""
    value: Any
    dtype: str

    def __post_init__(self) -> None:
        name = _CHECKED_DTYPES.get(self.dtype) if isinstance(self.dtype, str) else None
        if name is None:
            dt = np.dtype(self.dtype)
            if dt.kind not in "biuf":
                raise TypeError(f"scalar dtype must be numeric, got {self.dtype!r}")
            name = dt.name
            if isinstance(self.dtype, str):
                _CHECKED_DTYPES[self.dtype] = name
        object.__setattr__(self, "dtype", name)


@dataclass(frozen=True, slots=True)
class ArrayArg:
    """A typed array view of a buffer (what a numba kernel takes as an array).

    HARP's extension to the design's two argument kinds: numba-compiled kernels
    take arrays with a dtype and a shape, not raw pointers.
    """
    buffer: Buffer
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0
    strides: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.strides is not None:
            object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))

    @classmethod
    def normalized(cls, buffer: Buffer, dtype: str, shape: tuple[int, ...], offset: int,
                   strides: tuple[int, ...] | None) -> "ArrayArg":
        """An `ArrayArg` from values already in normal form (a NumPy dtype name, tuples of
        ints), without normalizing them again: for callers that make many (harp.torch)."""
        arg = object.__new__(cls)
        for name, value in (("buffer", buffer), ("dtype", dtype), ("shape", shape),
                            ("offset", offset), ("strides", strides)):
            object.__setattr__(arg, name, value)
        return arg


KernelArg = Union[BufferArg, Scalar, ArrayArg]


#: NumPy scalar type -> dtype name; `value.dtype.name` costs about a microsecond per launch arg.
_SCALAR_DTYPE_NAMES: dict[type, str] = {}


def as_kernel_arg(value: Any) -> KernelArg:
    """Normalise one launch argument: a `Buffer` means offset 0, a NumPy scalar keeps its dtype.

    A bare Python int or float is refused: its width on the device would be a guess.
    """
    if isinstance(value, (BufferArg, Scalar, ArrayArg)):
        return value
    if isinstance(value, Buffer):
        return BufferArg(value, 0)
    if isinstance(value, np.generic):
        name = _SCALAR_DTYPE_NAMES.get(type(value))
        if name is None:
            name = _SCALAR_DTYPE_NAMES.setdefault(type(value), value.dtype.name)
        return Scalar(value.item(), name)
    if isinstance(value, (bool, int, float, complex)):
        raise TypeError(
            f"kernel scalar {value!r} needs an explicit dtype: pass harp.Scalar({value!r}, 'int64') "
            "or a NumPy scalar such as numpy.float32(...)")
    raise TypeError(f"cannot pass {type(value).__name__} as a kernel argument")


@dataclass(frozen=True)
class DeviceInfo:
    """Facts about a device, fixed for its lifetime."""
    kind: str                      # "cpu", "gpu", "fpga", "npu"
    name: str
    backend: str
    index: int
    memory: int                    # bytes this session may use (the quota when one applies)
    compute_capability: tuple[int, int] | None = None
    formats: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for the wire and for `--json` output."""
        d = dataclasses.asdict(self)
        d["formats"] = list(self.formats)
        d["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceInfo":
        """Inverse of `to_dict`."""
        cc = d.get("compute_capability")
        return cls(kind=d["kind"], name=d["name"], backend=d["backend"], index=int(d["index"]),
                   memory=int(d["memory"]), compute_capability=tuple(cc) if cc else None,
                   formats=tuple(d.get("formats", ())), extra=dict(d.get("extra") or {}))


@dataclass(frozen=True, slots=True)
class MemInfo:
    """Free and total bytes, as the session sees them (its quota, not the card, when it has one)."""
    free: int
    total: int
