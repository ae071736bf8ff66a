"""Device arrays of HARP's numba.cuda: numba's `DeviceNDArray`, over a HARP `Buffer`.

An array is a shape, strides and a dtype at a byte offset into a buffer of the
session's device. Slicing gives views over the same buffer (basic indexing:
integers, slices, `...`), as numba's device arrays do; an integer index that
selects one element reads it back as a NumPy scalar.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from harp.types import ArrayArg, Buffer, BufferArg, Stream

from .errors import UnsupportedAttributeError, unsupported
from .session import Session, current
from .streams import stream_handle

_CONTIGUOUS_MSG = ("Array contains non-contiguous buffer and cannot be transferred as a single "
                   "memory region. Please ensure contiguous buffer with numpy .ascontiguousarray()")


def check_dtype(dtype: Any, api: str) -> np.dtype:
    """`dtype` if device memory can hold it: anything but Python objects (numeric, record,
    fixed-size string and datetime dtypes are plain bytes)."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        unsupported(f"{api} with dtype {dt}", "device memory holds values, not references to "
                    "Python objects")
    return dt


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def f_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for n in shape:
        strides.append(step)
        step *= max(n, 1)
    return tuple(strides)


def _shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    out = []
    for s in shape:
        if not isinstance(s, (int, np.integer)):
            raise TypeError(f"shape elements must be integers, got {type(s).__name__}")
        out.append(int(s))
    return tuple(out)


class _Allocation:
    """One device buffer; freed (at the session's next call) when no array uses it."""

    __slots__ = ("session", "buffer", "__weakref__")

    def __init__(self, session: Session, nbytes: int) -> None:
        self.session = session
        self.buffer = session.alloc(nbytes)

    def __del__(self) -> None:
        try:
            self.session.release(self.buffer)
        except Exception:   # interpreter shutdown: the session frees everything anyway
            pass


class DeviceNDArray:
    """An array in the memory of the session's HARP device (numba's `DeviceNDArray`)."""

    def __init__(self, shape: Any, strides: Any, dtype: Any, stream: Any = 0, *,
                 session: Session | None = None, allocation: _Allocation | None = None,
                 offset: int = 0) -> None:
        self.dtype = check_dtype(dtype, "a device array")
        self.shape = _shape(shape)
        self.ndim = len(self.shape)
        itemsize = self.dtype.itemsize
        if strides is None:
            strides = c_strides(self.shape, itemsize)
        self.strides = _shape(strides) if not isinstance(strides, int) else (int(strides),)
        if len(self.strides) != self.ndim:
            raise ValueError("strides not match ndim")
        self.size = math.prod(self.shape)
        lo, hi = self._extent_at(0)
        self.alloc_size = hi - lo
        if allocation is None:
            session = session or current()
            allocation = _Allocation(session, max(0, hi - lo))
            offset = -lo
        self._alloc = allocation
        self._offset = int(offset)
        self.stream = stream

    # -- geometry --------------------------------------------------------------------
    def _extent_at(self, offset: int) -> tuple[int, int]:
        """Byte range [lo, hi) of the buffer the elements occupy, for element 0 at `offset`."""
        if self.size == 0:
            return offset, offset
        lo = hi = offset
        for n, s in zip(self.shape, self.strides):
            if s < 0:
                lo += (n - 1) * s
            else:
                hi += (n - 1) * s
        return lo, hi + self.dtype.itemsize

    @property
    def _extent(self) -> tuple[int, int]:
        return self._extent_at(self._offset)

    @property
    def session(self) -> Session:
        return self._alloc.session

    @property
    def buffer(self) -> Buffer:
        """The HARP buffer under this array (views share it)."""
        return self._alloc.buffer

    @property
    def offset(self) -> int:
        """Byte offset of element 0 in `buffer`."""
        return self._offset

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * self.size

    def is_c_contiguous(self) -> bool:
        return self._contiguous(c_strides)

    def is_f_contiguous(self) -> bool:
        return self._contiguous(f_strides)

    def _contiguous(self, layout: Any) -> bool:
        if self.size == 0:
            return True
        want = layout(self.shape, self.dtype.itemsize)
        return all(n == 1 or s == w for n, s, w in zip(self.shape, self.strides, want))

    @property
    def flags(self) -> dict[str, bool]:
        return {"C_CONTIGUOUS": self.is_c_contiguous(), "F_CONTIGUOUS": self.is_f_contiguous()}

    @property
    def layout(self) -> str:
        """numba's layout letter for this array's type: "C", "F" or "A"."""
        broadcast = 0 in self.strides and self.size != 0
        if self.is_c_contiguous() and not broadcast:
            return "C"
        if self.is_f_contiguous() and not broadcast:
            return "F"
        return "A"

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __repr__(self) -> str:
        return (f"<HARP DeviceNDArray shape={self.shape} dtype={self.dtype} strides={self.strides} "
                f"on {self.session.info.name!r}>")

    def _view(self, shape: tuple[int, ...], strides: tuple[int, ...], offset: int,
              stream: Any = None, dtype: Any = None) -> "DeviceNDArray":
        return DeviceNDArray(shape, strides, self.dtype if dtype is None else dtype,
                             self.stream if stream is None else stream, allocation=self._alloc,
                             offset=offset)

    def _default_stream(self, stream: Any) -> Any:
        return self.stream if not stream else stream

    def kernel_arg(self, session: Session) -> ArrayArg:
        """This array as a numba kernel argument."""
        self._check_session(session)
        return ArrayArg(self.buffer, self.dtype, self.shape, offset=self._offset,
                        strides=self.strides)

    def bytes_arg(self, session: Session) -> tuple[ArrayArg, int]:
        """The memory under this array as a `uint8` kernel argument, and element 0's offset
        in it (for arrays whose dtype a launch does not carry: `packing`)."""
        self._check_session(session)
        lo, hi = self._extent
        return ArrayArg(self.buffer, "uint8", (hi - lo,), offset=lo), self._offset - lo

    def pointer_arg(self, session: Session) -> BufferArg:
        """This array as a pointer kernel argument (CUDA C kernels): element 0's address."""
        self._check_session(session)
        if any(s < 0 for s in self.strides):
            raise ValueError("an array with negative strides cannot be passed as a pointer")
        return BufferArg(self.buffer, self._offset)

    def _check_session(self, session: Session) -> None:
        if self.session is not session:
            raise ValueError("this device array belongs to another HARP session (made before "
                             "cuda.close(), in a parent process, or on another device)")
        session.check_open()

    # -- transfers --------------------------------------------------------------------
    def copy_to_host(self, ary: np.ndarray | None = None, stream: Any = 0) -> np.ndarray:
        """Copy to a new NumPy array (or into `ary`) and return it.

        With a stream the copy is ordered on it; HARP's read completes before this
        returns, which a numba program cannot tell from an asynchronous copy.
        """
        session = self.session
        lo, hi = self._extent
        if ary is not None:
            if ary.dtype != self.dtype:
                raise TypeError(f"incompatible dtype: {self.dtype} vs. {ary.dtype}")
            if _squeezed(ary.shape) != _squeezed(self.shape):
                raise ValueError(f"incompatible shape: {self.shape} vs. {ary.shape}")
        raw = np.empty(hi - lo, np.uint8)
        if hi > lo:
            with session.lock:
                handle = session.enter(stream_handle(self._default_stream(stream), session))
                session.device.read(self.buffer, lo, hi - lo, out=raw, stream=handle)
        host = np.ndarray(self.shape, self.dtype, buffer=raw, offset=self._offset - lo,
                          strides=self.strides if self.size else None)
        if ary is None:
            return host
        np.copyto(ary, host.reshape(ary.shape))
        return ary

    def copy_to_device(self, ary: Any, stream: Any = 0) -> None:
        """Copy `ary` (host data, or another device array of this session) into this array."""
        size = ary.size if hasattr(ary, "size") else np.size(ary)
        if size == 0:
            return
        order = self._order()
        session = self.session
        lo, hi = self._extent
        if isinstance(ary, DeviceNDArray):
            if ary.dtype != self.dtype:
                raise TypeError(f"incompatible dtype: {self.dtype} vs. {ary.dtype}")
            if _squeezed(ary.shape) != _squeezed(self.shape) or ary._order() != order:
                raise ValueError(f"incompatible shape or layout: {self.shape} vs. {ary.shape}")
            ary._check_session(session)
            src_lo, _ = ary._extent
            with session.lock:
                handle = session.enter(stream_handle(self._default_stream(stream), session))
                session.device.copy(self.buffer, lo, ary.buffer, src_lo, hi - lo, stream=handle)
            return
        if getattr(ary, "__cuda_array_interface__", None) is not None:
            unsupported("copying from a foreign CUDA array (__cuda_array_interface__)",
                        "its memory is not on the HARP device")
        host = np.asarray(ary)
        if host.dtype != self.dtype:
            raise TypeError(f"incompatible dtype: {self.dtype} vs. {host.dtype}")
        if _squeezed(host.shape) != _squeezed(self.shape):
            raise ValueError(f"incompatible shape: {self.shape} vs. {host.shape}")
        data = np.asarray(host.reshape(self.shape), order=order)
        with session.lock:
            handle = session.enter(stream_handle(self._default_stream(stream), session))
            session.device.write(self.buffer, lo, data.reshape(-1, order="A").view(np.uint8),
                                 stream=handle)

    def _order(self) -> str:
        if self.is_c_contiguous():
            return "C"
        if self.is_f_contiguous():
            return "F"
        raise ValueError(_CONTIGUOUS_MSG)

    # -- views ------------------------------------------------------------------------
    def _index(self, item: Any) -> tuple[tuple[int, ...], tuple[int, ...], int, bool]:
        """(shape, strides, offset, is_element) of `self[item]`, by NumPy's rules for basic
        indexing on a stand-in array that owns no memory (nothing is read)."""
        items = item if isinstance(item, tuple) else (item,)
        for it in items:
            if not (isinstance(it, (int, np.integer, slice)) or it is Ellipsis) \
                    or isinstance(it, (bool, np.bool_)):
                unsupported(f"indexing a device array with {type(it).__name__}",
                            "device arrays take integers, slices and ... (basic indexing); "
                            "copy to the host for fancy indexing")
        base = np.zeros(1, self.dtype)
        dummy = np.lib.stride_tricks.as_strided(base, self.shape, self.strides, writeable=False)
        sub = dummy[items if any(it is Ellipsis for it in items) else items + (Ellipsis,)]
        moved = sub.__array_interface__["data"][0] - base.__array_interface__["data"][0]
        is_element = sub.ndim == 0 and all(not isinstance(it, slice) and it is not Ellipsis
                                           for it in items)
        return sub.shape, sub.strides, self._offset + moved, is_element

    def __getitem__(self, item: Any) -> Any:
        return self.getitem(item)

    def getitem(self, item: Any, stream: Any = 0) -> Any:
        shape, strides, offset, is_element = self._index(item)
        view = self._view(shape, strides, offset, stream=self._default_stream(stream))
        if is_element:
            return view.copy_to_host(stream=stream)[()]
        return view

    def __setitem__(self, key: Any, value: Any) -> None:
        self.setitem(key, value)

    def setitem(self, key: Any, value: Any, stream: Any = 0) -> None:
        shape, strides, offset, _ = self._index(key)
        target = self._view(shape, strides, offset)
        stream = self._default_stream(stream)
        if isinstance(value, DeviceNDArray):
            if value.shape == target.shape and value.dtype == target.dtype and \
                    target.layout != "A" and value.layout == target.layout:
                target.copy_to_device(value, stream=stream)
                return
            value = value.copy_to_host(stream=stream)
        data = np.broadcast_to(np.asarray(value).astype(self.dtype, copy=False), target.shape)
        try:
            order = target._order()
        except ValueError:   # a strided target: read its extent, change it, write it back
            lo, hi = target._extent
            raw = np.empty(hi - lo, np.uint8)
            session = self.session
            with session.lock:
                handle = session.enter(stream_handle(stream, session))
                session.device.read(self.buffer, lo, hi - lo, out=raw, stream=handle)
                np.ndarray(target.shape, self.dtype, buffer=raw, offset=offset - lo,
                           strides=target.strides)[...] = data
                session.device.write(self.buffer, lo, raw, stream=handle)
            return
        target.copy_to_device(np.asarray(data, order=order), stream=stream)

    def bind(self, stream: Any = 0) -> "DeviceNDArray":
        """The same array with `stream` as its default stream."""
        return self._view(self.shape, self.strides, self._offset, stream=stream)

    def split(self, section: int, stream: Any = 0) -> Iterator["DeviceNDArray"]:
        """Views of `section` elements each (the last may be shorter); 1-d, unit stride."""
        stream = self._default_stream(stream)
        if self.ndim != 1:
            raise ValueError("only support 1d array")
        if self.strides[0] != self.dtype.itemsize:
            raise ValueError("only support unit stride")
        itemsize = self.dtype.itemsize
        for begin in range(0, self.size, section):
            end = min(begin + section, self.size)
            yield self._view((end - begin,), self.strides, self._offset + begin * itemsize,
                             stream=stream)

    def reshape(self, *newshape: Any, order: str = "C") -> "DeviceNDArray":
        if len(newshape) == 1 and isinstance(newshape[0], (tuple, list)):
            newshape = tuple(newshape[0])
        shape = _shape(newshape)
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.size:
            raise ValueError(f"cannot reshape array of size {self.size} into shape {shape}")
        if shape == self.shape:
            return self._view(self.shape, self.strides, self._offset)
        if order not in ("C", "F", "A"):
            raise ValueError("order not C|F|A")
        if order == "A":
            order = "F" if self.is_f_contiguous() and not self.is_c_contiguous() else "C"
        if (order == "C" and self.is_c_contiguous()) or (order == "F" and self.is_f_contiguous()):
            strides = (c_strides if order == "C" else f_strides)(shape, self.dtype.itemsize)
            return self._view(shape, strides, self._offset)
        raise NotImplementedError("operation requires copying")

    def ravel(self, order: str = "C", stream: Any = 0) -> "DeviceNDArray":
        view = self.reshape(self.size, order=order)
        return view.bind(self._default_stream(stream))

    def squeeze(self, axis: Any = None, stream: Any = 0) -> "DeviceNDArray":
        axes = range(self.ndim) if axis is None else \
            [axis] if isinstance(axis, int) else list(axis)
        axes = {a % self.ndim for a in axes}
        for a in axes:
            if axis is not None and self.shape[a] != 1:
                raise ValueError("cannot select an axis to squeeze out which has size not "
                                 "equal to one")
        keep = [i for i in range(self.ndim) if not (i in axes and self.shape[i] == 1)]
        return self._view(tuple(self.shape[i] for i in keep), tuple(self.strides[i] for i in keep),
                          self._offset, stream=self._default_stream(stream))

    def view(self, dtype: Any) -> "DeviceNDArray":
        dtype = check_dtype(dtype, "DeviceNDArray.view")
        shape, strides = list(self.shape), list(self.strides)
        if self.dtype.itemsize != dtype.itemsize:
            if not self.is_c_contiguous():
                raise ValueError("To change to a dtype of a different size, the array must be "
                                 "C-contiguous")
            shape[-1], rem = divmod(shape[-1] * self.dtype.itemsize, dtype.itemsize)
            if rem != 0:
                raise ValueError("When changing to a larger dtype, its size must be a divisor of "
                                 "the total size in bytes of the last axis of the array.")
            strides[-1] = dtype.itemsize
        return self._view(tuple(shape), tuple(strides), self._offset, dtype=dtype)

    @property
    def T(self) -> "DeviceNDArray":
        return self.transpose()

    def transpose(self, axes: Any = None) -> "DeviceNDArray":
        """A transposed copy, as numba makes one (a 2-d array only)."""
        if axes and tuple(axes) == tuple(range(self.ndim)):
            return self
        if self.ndim != 2:
            raise NotImplementedError("transposing a non-2D DeviceNDArray isn't supported")
        if axes is not None and set(axes) != set(range(self.ndim)):
            raise ValueError(f"invalid axes list {axes!r}")
        host = np.ascontiguousarray(self.copy_to_host().T)
        out = DeviceNDArray(host.shape, host.strides, self.dtype, self.stream,
                            session=self.session)
        out.copy_to_device(host)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if copy is False:
            raise ValueError("`copy=False` is not supported. A copy is always created.")
        host = self.copy_to_host()
        return host if dtype is None else host.astype(dtype)

    # -- what a remote device cannot give --------------------------------------------
    @property
    def __cuda_array_interface__(self) -> Any:
        raise UnsupportedAttributeError(
            "DeviceNDArray.__cuda_array_interface__ is not supported under HARP: the array "
            "lives on a HARP device, which has no address in this process")

    @property
    def device_ctypes_pointer(self) -> Any:
        raise UnsupportedAttributeError("DeviceNDArray.device_ctypes_pointer is not supported "
                                        "under HARP: device memory has no address here")

    @property
    def gpu_data(self) -> Any:
        raise UnsupportedAttributeError("DeviceNDArray.gpu_data is not supported under HARP; "
                                        "the HARP buffer is .buffer")

    def get_ipc_handle(self) -> Any:
        unsupported("DeviceNDArray.get_ipc_handle", "CUDA IPC handles need a local GPU")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def new_array(shape: Any, dtype: Any, strides: Any = None, order: str = "C", stream: Any = 0,
              session: Session | None = None) -> DeviceNDArray:
    dt = check_dtype(dtype, "cuda.device_array")
    shape = _shape(shape)
    if strides is None:
        if order not in ("C", "F"):
            raise ValueError(f"order must be 'C' or 'F', got {order!r}")
        strides = (c_strides if order == "C" else f_strides)(shape, dt.itemsize)
    return DeviceNDArray(shape, strides, dt, stream, session=session)


def to_device(obj: Any, stream: Any = 0, copy: bool = True, to: DeviceNDArray | None = None,
              session: Session | None = None) -> DeviceNDArray:
    """numba's `cuda.to_device`: a device array with `obj`'s contents (or `obj` into `to`)."""
    if to is not None:
        if copy:
            to.copy_to_device(obj, stream=stream)
        return to
    if isinstance(obj, DeviceNDArray):
        return obj
    if getattr(obj, "__cuda_array_interface__", None) is not None:
        unsupported("cuda.to_device of a foreign CUDA array (__cuda_array_interface__)",
                    "its memory is not on the HARP device")
    host = np.asarray(obj)
    check_dtype(host.dtype, "cuda.to_device")
    if not (host.flags["C_CONTIGUOUS"] or host.flags["F_CONTIGUOUS"]) \
            or (host.size and 0 in host.strides):
        host = np.ascontiguousarray(host)
    out = DeviceNDArray(host.shape, host.strides, host.dtype, stream, session=session)
    if copy:
        out.copy_to_device(host, stream=stream)
    return out
