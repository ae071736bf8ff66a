"""The front half every `Device` implementation shares: argument checks, call
sequence numbers, client-chosen handle ids, and the deferred-error list.

Keeping these in one place is what makes the local and remote devices behave
alike: both raise the same immediate errors for the same bad arguments, and
both number calls the same way, so a deferred error names the same call.
"""
from __future__ import annotations

import secrets
import threading
from typing import Any, Sequence

import numpy as np

from .errors import ArgumentError, HarpError
from .types import (DEFAULT_STREAM, ArrayArg, Buffer, BufferArg, Event, Function, Module, Scalar,
                    Stream, as_kernel_arg)


class HandleIds:
    """Issues handle ids: a random 31-bit session prefix above a 32-bit counter.

    The prefix lets a device reject a handle from another session even when
    the counters happen to agree.
    """

    __slots__ = ("prefix", "_next")

    def __init__(self) -> None:
        self.prefix = (secrets.randbits(31) | 1) << 32
        self._next = 0

    def new(self) -> int:
        self._next += 1
        return self.prefix | self._next


class DeferredErrors:
    """Failures of asynchronous calls, held until the next sync call raises them.

    At most `MAX_KEPT` are kept between two sync calls; later ones are only counted,
    so a client cannot grow a server's memory by failing calls without syncing.
    """

    MAX_KEPT = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[HarpError] = []
        self._dropped = 0

    def add(self, error: HarpError, call: str, seq: int) -> None:
        if error.call is None:
            error.call, error.seq = call, seq
        bound_message(error)
        with self._lock:
            if len(self._errors) >= self.MAX_KEPT:
                self._dropped += 1
                return
            # In call order: a failure may be learnt late (a GPU kernel fault, at a sync
            # call), but it belongs to its call, before failures recorded since.
            i = len(self._errors)
            while i and (self._errors[i - 1].seq or 0) > (error.seq or 0):
                i -= 1
            self._errors.insert(i, error)

    def __bool__(self) -> bool:
        return bool(self._errors)

    def take(self) -> HarpError | None:
        """Remove and return the earliest failure, with the later ones attached as `.later`."""
        with self._lock:
            if not self._errors:
                return None
            first, rest = self._errors[0], self._errors[1:]
            dropped, self._errors, self._dropped = self._dropped, [], 0
        first.later = rest  # type: ignore[attr-defined]
        if dropped:
            first.message += f" ({dropped} more asynchronous failures were not kept)"
        return first

    def raise_pending(self) -> None:
        err = self.take()
        if err is not None:
            raise err


def bound_message(error: HarpError) -> HarpError:
    """Cut an error's message and detail to `limits.MAX_ERROR_MESSAGE` characters, so kept
    errors cannot hold a server's memory (a 1 MiB kernel name in every message)."""
    from .limits import MAX_ERROR_MESSAGE
    for attr in ("message", "detail"):
        text = getattr(error, attr)
        if text and len(text) > MAX_ERROR_MESSAGE:
            setattr(error, attr, text[:MAX_ERROR_MESSAGE] + f"... ({len(text)} characters)")
            if attr == "message":
                error.args = (error.message,)
    return error


def check_count(value: Any, what: str) -> int:
    """A non-negative int (sizes, offsets, lengths); anything else is refused at once."""
    if isinstance(value, bool) or not isinstance(value, int):
        if not isinstance(value, np.integer):
            raise TypeError(f"{what} must be an int, got {type(value).__name__}")
        value = int(value)
    if value < 0:
        raise ArgumentError(f"{what} must be >= 0, got {value}")
    return value


def check_buffer(buf: Any) -> Buffer:
    if not isinstance(buf, Buffer):
        raise TypeError(f"expected a Buffer handle, got {type(buf).__name__}")
    return buf


def check_range(buf: Any, offset: Any, nbytes: Any, what: str = "range") -> tuple[int, int]:
    """Check that [offset, offset+nbytes) lies inside `buf`; return the two as ints."""
    check_buffer(buf)
    offset = check_count(offset, "offset")
    nbytes = check_count(nbytes, "nbytes")
    if offset + nbytes > buf.nbytes:
        raise ArgumentError(
            f"{what} [{offset}, {offset + nbytes}) is outside the buffer of {buf.nbytes} bytes")
    return offset, nbytes


def check_stream(stream: Any) -> Stream:
    if stream is None:
        return DEFAULT_STREAM
    if not isinstance(stream, Stream):
        raise TypeError(f"expected a Stream handle, got {type(stream).__name__}")
    return stream


def check_event(event: Any) -> Event:
    if not isinstance(event, Event):
        raise TypeError(f"expected an Event handle, got {type(event).__name__}")
    return event


def check_module(module: Any) -> Module:
    if not isinstance(module, Module):
        raise TypeError(f"expected a Module handle, got {type(module).__name__}")
    return module


def check_function(fn: Any) -> Function:
    if not isinstance(fn, Function):
        raise TypeError(f"expected a Function handle, got {type(fn).__name__}")
    return fn


MAX_DIM = 2**31 - 1


def check_dims(dims: Any, what: str) -> tuple[int, int, int]:
    """Grid or block dimensions as a 3-tuple of positive ints."""
    if type(dims) is int and 1 <= dims <= MAX_DIM:      # the common case, first: launches are hot
        return (dims, 1, 1)
    if type(dims) is tuple and len(dims) == 3:
        a, b, c = dims
        if type(a) is int and type(b) is int and type(c) is int and 1 <= a <= MAX_DIM and \
                1 <= b <= MAX_DIM and 1 <= c <= MAX_DIM:
            return dims
    if isinstance(dims, int) and not isinstance(dims, bool):
        dims = (dims,)
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise TypeError(f"{what} must be an int or a sequence of up to 3 ints") from None
    if not 1 <= len(dims) <= 3 or any(d < 1 or d > MAX_DIM for d in dims):
        raise ArgumentError(f"{what} must be 1 to 3 positive ints, got {dims}")
    return dims + (1,) * (3 - len(dims))  # type: ignore[return-value]


def check_fill_value(value: Any) -> int:
    """A byte value (an int or NumPy integer in 0..255)."""
    try:
        byte = check_count(value, "fill value")
    except (TypeError, ArgumentError):
        byte = -1
    if not 0 <= byte <= 255:
        raise ArgumentError(f"fill value must be a byte (0..255), got {value!r}")
    return byte


def check_fill(buf: Any, value: Any, offset: Any, nbytes: Any) -> tuple[int, int, int]:
    """The checked (value, offset, nbytes) of a fill; `nbytes=None` means to the end."""
    check_buffer(buf)
    value = check_fill_value(value)
    offset = check_count(offset, "offset")
    if nbytes is None:
        nbytes = max(0, buf.nbytes - offset)
    offset, nbytes = check_range(buf, offset, nbytes, "fill")
    return value, offset, nbytes


def check_image(image: Any) -> bytes | str:
    """A module image: bytes-like or str, at most `wire.MAX_IMAGE` bytes (the same limit for
    every device, so a module that loads locally also loads remotely)."""
    from .wire import MAX_IMAGE
    if not isinstance(image, (bytes, bytearray, memoryview, str)):
        raise TypeError(f"a module image is bytes or str, got {type(image).__name__}")
    size = len(image.encode("utf-8")) if isinstance(image, str) else memoryview(image).nbytes
    if size > MAX_IMAGE:
        raise ArgumentError(f"module image of {size} bytes is over the {MAX_IMAGE} byte limit")
    return image if isinstance(image, (str, bytes)) else bytes(image)


MAX_FORMAT = 64


def check_format(format: Any) -> str:
    """An image format name (the device says whether it takes it)."""
    if not isinstance(format, str):
        raise TypeError(f"an image format is a str, got {type(format).__name__}")
    if len(format) > MAX_FORMAT:
        raise ArgumentError(f"image format name of {len(format)} characters; formats are "
                            "names such as 'ptx' or 'catalog'")
    return format


def check_kernel_name(name: Any) -> str:
    """A kernel name, at most `wire.MAX_NAME` characters (the same bound local and remote)."""
    from .wire import MAX_NAME
    if not isinstance(name, str):
        raise TypeError(f"a kernel name is a str, got {type(name).__name__}")
    if len(name) > MAX_NAME:
        raise ArgumentError(f"kernel name of {len(name)} characters is over the {MAX_NAME} "
                            "character limit")
    return name


def check_copy(dst: Any, dst_offset: Any, src: Any, src_offset: Any,
               nbytes: Any) -> tuple[int, int, int]:
    """The checked (dst_offset, src_offset, nbytes) of a device-to-device copy."""
    dst_offset, nbytes = check_range(dst, dst_offset, nbytes, "copy destination")
    src_offset, _ = check_range(src, src_offset, nbytes, "copy source")
    return dst_offset, src_offset, nbytes


def as_bytes_view(data: Any) -> memoryview:
    """A flat byte view of any C-contiguous buffer-protocol object, without copying."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"write needs a buffer-protocol object, got {type(data).__name__}") from None
    if not mv.c_contiguous:
        raise ArgumentError("write needs C-contiguous data")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def out_view(out: Any, nbytes: int) -> memoryview:
    """A writable flat byte view of `out`, which must hold at least `nbytes`."""
    try:
        mv = memoryview(out)
    except TypeError:
        raise TypeError(f"read's out must be a writable buffer, got {type(out).__name__}") from None
    if mv.readonly or not mv.c_contiguous:
        raise ArgumentError("read's out must be a writable C-contiguous buffer")
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    if mv.nbytes < nbytes:
        raise ArgumentError(f"read's out holds {mv.nbytes} bytes, {nbytes} requested")
    return mv[:nbytes]


def normalize_args(args: Sequence[Any]) -> list:
    """Launch arguments as `BufferArg`/`ArrayArg`/`Scalar` (see `types.as_kernel_arg`)."""
    t = type(args)
    if t is list or t is tuple:
        out = []
        append = out.append
        for a in args:              # the kinds already normal pass as they are (hot path)
            k = type(a)
            append(a if k is BufferArg or k is Scalar or k is ArrayArg else as_kernel_arg(a))
        return out
    if isinstance(args, (str, bytes)) or not hasattr(args, "__iter__"):
        raise TypeError("launch args must be a sequence")
    return [as_kernel_arg(a) for a in args]
