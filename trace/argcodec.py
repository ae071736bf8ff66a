"""Launch arguments in a trace: kept raw by the recorder's hot path, encoded when a block is packed.

A recorded launch keeps its arguments as the tuple that was passed (a list or
other iterable is frozen into a tuple first): handles and NumPy scalars are
immutable, so the tuple still says what was launched when its block is packed,
up to `FLUSH_INTERVAL` later, in the flusher thread or at the next sync call.
`BlockValues.default` is the msgpack fallback of a CALLS block: it turns each
such tuple into the tagged list of docs/trace-format.md, and encodes a tuple
once for a run of records that carry it (a program that launches with the
same argument tuple in a loop pays for one encoding per block, not one per
launch).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from harp.types import ArrayArg, Buffer, BufferArg, Event, Function, Module, Scalar, Stream

from . import format as fmt

#: NumPy scalar type -> (dtype name, Python conversion): `dtype.name` costs over a
#: microsecond per call, a dict lookup on the type a few dozen nanoseconds.
_NP_SCALARS: dict[type, tuple[str, Any]] = {}


def _np_scalar(kind: type, arg: Any) -> tuple[str, Any] | None:
    if not (isinstance(arg, np.generic) and arg.dtype.kind in "biuf"):
        return None
    spec = _NP_SCALARS[kind] = (arg.dtype.name, {"b": bool, "f": float}.get(arg.dtype.kind, int))
    return spec


def encode_args(args: tuple) -> list:
    """A launch's arguments as the format's list of tagged arguments."""
    out = []
    for arg in args:                     # the two common kinds inline, the rest in encode_arg
        kind = type(arg)
        if kind is Buffer:
            out.append([fmt.ARG_BUFFER, arg.id, arg.nbytes, 0])
            continue
        spec = _NP_SCALARS.get(kind)
        out.append([fmt.ARG_SCALAR, spec[1](arg), spec[0]] if spec is not None
                   else encode_arg(arg))
    return out


def encode_arg(arg: Any) -> Any:
    """One launch argument as its tagged list (see docs/trace-format.md)."""
    kind = type(arg)
    if kind is Buffer:
        return [fmt.ARG_BUFFER, arg.id, arg.nbytes, 0]
    spec = _NP_SCALARS.get(kind) or _np_scalar(kind, arg)
    if spec is not None:
        return [fmt.ARG_SCALAR, spec[1](arg), spec[0]]
    if kind is BufferArg and type(arg.buffer) is Buffer:
        return [fmt.ARG_BUFFER, arg.buffer.id, arg.buffer.nbytes, arg.offset]
    if kind is Scalar:
        return [fmt.ARG_SCALAR, arg.value, arg.dtype]
    if kind is ArrayArg and type(arg.buffer) is Buffer:
        return [fmt.ARG_ARRAY, arg.buffer.id, arg.buffer.nbytes, arg.dtype, list(arg.shape),
                arg.offset, list(arg.strides) if arg.strides is not None else None]
    if isinstance(arg, (bool, int, float, str, type(None))):
        return arg           # a bare value: the call failed at once on it, and will again
    return {fmt.UNRECORDABLE: fmt._short_repr(arg)}


_HANDLES = (Buffer, Module, Function, Stream, Event)


def handle_id(value: Any) -> Any:
    """A handle's id; anything else marked unrecordable (only in calls that failed)."""
    if isinstance(value, _HANDLES):
        return value.id
    return {fmt.UNRECORDABLE: fmt._short_repr(value)}


def failed_dims(dims: Any) -> Any:
    """Grid or block dims of a call that failed at once: ints kept, anything else its repr."""
    if isinstance(dims, (list, tuple)):
        return [d if isinstance(d, (int, float, np.integer)) else fmt._short_repr(d)
                for d in dims]
    return dims


def safe_args(args: Any) -> Any:
    """The arguments of a launch that failed at once: whatever the program passed."""
    try:
        return [encode_arg(a) for a in args]
    except TypeError:
        return {fmt.UNRECORDABLE: fmt._short_repr(args)}


def frozen_args(args: Any) -> Any:
    """A launch's arguments as a tuple the program cannot change after the call: a list or a
    one-shot iterable (which the wrapped device would otherwise consume) becomes a tuple; a
    string, bytes or a non-iterable stays as it is, for the device to refuse."""
    if isinstance(args, (str, bytes)) or not hasattr(args, "__iter__"):
        return args
    return tuple(args)


class BlockValues:
    """The msgpack fallback of one writer's CALLS blocks: values the hot path stored raw.

    A tuple is a launch's arguments (the only tuples a record holds: grid and block dims
    are stored as ints or lists); a `Stream` is its id; anything else goes to the format's
    own fallback. `reset()` after each block: the last tuple is known by identity, which
    holds only while the block's records keep it alive.
    """

    def __init__(self) -> None:
        self._last: Any = None           # the last tuple encoded, and its encoding
        self._encoded: list = []

    def default(self, value: Any) -> Any:
        kind = type(value)
        if kind is tuple:
            # one entry, not a memo of the block's every tuple: their encodings would live
            # until the block is packed, thousands of lists for the garbage collector to walk
            if value is not self._last:
                self._last, self._encoded = value, encode_args(value)
            return self._encoded
        if isinstance(value, Stream):
            return value.id
        return fmt._default(value)

    def reset(self) -> None:
        self._last, self._encoded = None, []
