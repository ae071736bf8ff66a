"""The session wire format, without any I/O: frames, call records, and their checks.

A session is one gRPC bidirectional stream of raw byte frames:

1. client -> server: a protobuf `HandshakeRequest`; server -> client: a
   protobuf `HandshakeReply` (proto/session.proto).
2. client -> server: frames that start with a *kind* byte:
   - `BATCH` / `BATCH_SYNC`, then a msgpack array of call records
     `[op, seq, *args]` (the ops and their arguments: `harp.api`). A
     `BATCH_SYNC` batch ends with a sync call and gets exactly one reply; a
     sync call ends its batch. A chunked write (`WRITE_CHUNKED`) also ends its
     batch, and `PAYLOAD` frames carrying its `nbytes` follow it.
   - `PAYLOAD`, then bytes of the chunked write in progress, as they are.
   - `DATA`, then a little-endian u64: all the remaining bytes of the chunked
     write in progress follow on the session's data channel (a mutual-TLS
     socket beside the stream, `harp/datachannel.py`), as they are. A session
     with a data channel also gets a large read's payload on it, not in frames.
   - `FRAMES_ON_DATA`, alone (protocol 3): the client's next frames, and the
     server's replies to them, travel on the session's data channel, each
     as a little-endian u32 length and its bytes (`harp.dataframes`); the
     stream stays open and carries nothing more but its end.
   A session that took a shared-memory window (`harp.shm`: same host, unix
   socket) moves large payloads through it instead: `WRITE_SHM` ends its batch
   and its bytes follow through the window's write ring; `READ_SHM` is a sync
   call whose data goes through the read ring before its reply (`[nbytes]`).
3. server -> client, with no kind byte (the client always knows what comes
   next): one *reply* frame for each sync call, a msgpack array
   `[seq, error, result]` where `error` is a serialized protobuf
   `ErrorRecord` or nil. A successful `READ` of up to `INLINE_LIMIT` bytes
   carries its data in the result (`[nbytes, data]`); a larger one
   (`[nbytes]`) is followed by bare payload frames.
4. When the server ends a session (a protocol error, a lease that is over, a
   worker that died), it ends the gRPC call with status `ABORTED` and the
   `ErrorRecord` in the trailing metadata key `ERROR_METADATA`; or, when no
   call of the session was running, it cancels the call and answers the
   unary `/harp.v1.Session/Why` (the session id in, the `ErrorRecord` out) for
   the session's own identity.

The kind byte costs nothing where it matters: the client makes the one copy
of each payload chunk it must make anyway (`PAYLOAD + view`), and lets a pool
server route frames (payload into shared memory, batches to the session's
worker) without decoding them.

msgpack carries the batches because a call record is a small array of ints
and a few bytes: it packs and unpacks at several million records a second in
C, with no schema step (see ARCHITECTURE.md for the measurement).
"""
from __future__ import annotations

import reprlib
import struct
from typing import Any

import msgpack
import numpy as np

from . import api
from .errors import ProtocolError, VersionMismatchError
from .types import ArrayArg, Buffer, BufferArg, Scalar, as_kernel_arg

#: Protocol versions this build speaks (inclusive). Version 2: frame kinds, ABORTED ends;
#: version 3: a session's frames may move to its data channel (`FRAMES_ON_DATA`).
PROTOCOL_MIN = 2
PROTOCOL_MAX = 3

METHOD = "/harp.v1.Session/Open"
HEALTH_SERVICE = "harp.v1.Session"
#: Trailing metadata key of the `ErrorRecord` that says why the server ended a session.
ERROR_METADATA = "harp-error-bin"

#: Payload bytes per bulk frame (1 MiB: the fastest over gRPC with TLS here).
CHUNK_SIZE = 1 << 20
#: Writes up to this size travel inside the batch; larger ones in chunks.
INLINE_LIMIT = 64 << 10
#: A batch is sent when it holds this many calls or bytes (or at the next sync call).
BATCH_CALLS = 512
BATCH_BYTES = 4 << 20
#: Largest frame either side accepts: a batch, or one module image with its record.
MAX_FRAME = 64 << 20
#: Largest module image (kernel code) a device accepts, local or remote alike.
MAX_IMAGE = 48 << 20
#: Most records one batch may hold.
MAX_BATCH_CALLS = 4096
#: Longest string a record may carry (an image format, a kernel name, a dtype).
MAX_NAME = 4096
#: Most kernel arguments one launch may carry, and most dimensions of an array argument.
MAX_KERNEL_ARGS = 1024
MAX_ARRAY_DIMS = 32

# Client frame kinds (the first byte of every client frame after the handshake).
BATCH, BATCH_SYNC, PAYLOAD, DATA, FRAMES_ON_DATA = 1, 2, 3, 4, 5
BATCH_TAG, BATCH_SYNC_TAG, PAYLOAD_TAG = bytes((BATCH,)), bytes((BATCH_SYNC,)), bytes((PAYLOAD,))
FRAMES_ON_DATA_TAG = bytes((FRAMES_ON_DATA,))
#: The first protocol version in which a session's frames may move to its data channel.
FRAMES_ON_DATA_SINCE = 3
_U64 = struct.Struct("<Q")


def data_frame(nbytes: int) -> bytes:
    """A `DATA` frame: the chunked write's remaining `nbytes` follow on the data channel."""
    return bytes((DATA,)) + _U64.pack(nbytes)


def data_frame_size(frame: Any) -> int:
    """The byte count a `DATA` frame announces (`ProtocolError` if it is malformed)."""
    if len(frame) != 1 + _U64.size:
        raise ProtocolError(f"a data frame is 9 bytes, got {len(frame)}")
    return _U64.unpack_from(frame, 1)[0]

# Op numbers, from the API table.
ALLOC, FREE, WRITE, WRITE_CHUNKED = api.op("alloc"), api.op("free"), api.op("write"), \
    api.op("write_chunked")
COPY, FILL, LOAD_MODULE, FUNCTION = api.op("copy"), api.op("fill"), api.op("load_module"), \
    api.op("function")
LAUNCH, STREAM, EVENT, RECORD, WAIT = api.op("launch"), api.op("stream"), api.op("event"), \
    api.op("record"), api.op("wait")
READ, SYNCHRONIZE, ELAPSED, MEM_INFO, CLOSE = api.op("read"), api.op("synchronize"), \
    api.op("elapsed"), api.op("mem_info"), api.op("close")
WRITE_SHM, READ_SHM = api.op("write_shm"), api.op("read_shm")

# Kernel argument tags inside a LAUNCH record.
ARG_BUFFER, ARG_SCALAR, ARG_ARRAY = 0, 1, 2

#: For each op: its API name and the types of its arguments after [op, seq].
SCHEMA: dict[int, tuple[str, tuple]] = {c.op: (c.name, c.types) for c in api.CALLS}
SYNC_OPS = frozenset(c.op for c in api.CALLS if c.sync)

_packer = msgpack.Packer(use_bin_type=True)
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


def short(value: Any) -> str:
    """A bounded repr of a value from the wire (any size, any nesting)."""
    return _short.repr(value)


def pack(obj: Any) -> bytes:
    """msgpack-encode one frame body."""
    return _packer.pack(obj)


def batch_frame(calls: list, sync: bool) -> bytes:
    """A client batch frame: its kind byte, then the records."""
    return (BATCH_SYNC_TAG if sync else BATCH_TAG) + _packer.pack(calls)


def unpack_batch(body: Any) -> list:
    """Decode and check a batch body: a non-empty list of well-formed call records.

    Anything else raises `ProtocolError`; a server ends the session on it.
    """
    try:
        calls = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True,
                                max_array_len=MAX_BATCH_CALLS, max_bin_len=MAX_FRAME,
                                max_str_len=MAX_NAME, max_map_len=0, max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"malformed batch frame ({len(body)} bytes): "
                            f"{type(exc).__name__}") from None
    if not isinstance(calls, list) or not calls:
        raise ProtocolError("a batch frame must be a non-empty array of call records")
    for call in calls:
        check_record(call)
    return calls


def check_record(call: Any) -> None:
    """Check one record's op, arity and argument types against `SCHEMA`, the kernel
    arguments of a launch included, without recursion (any nesting is refused flat)."""
    if type(call) is not list or len(call) < 2:
        raise ProtocolError(f"a call record is [op, seq, ...], got {short(call)}")
    op, seq = call[0], call[1]
    if op == LAUNCH and type(op) is int:            # the hot one, checked without loops
        _check_launch(call)
        return
    spec = SCHEMA.get(op) if type(op) is int else None
    if spec is None:
        raise ProtocolError(f"unknown call op {short(op)}")
    if type(seq) is not int or seq < 1:
        raise ProtocolError(f"bad sequence number {short(seq)} in {spec[0]}")
    types = spec[1]
    if len(call) != 2 + len(types):
        raise ProtocolError(f"{spec[0]} record has {len(call) - 2} arguments, "
                            f"expected {len(types)}")
    for value, want in zip(call[2:], types):
        if type(value) is bool or not isinstance(value, want):
            raise ProtocolError(f"{spec[0]} record has an argument of type "
                                f"{type(value).__name__}")


def _check_launch(call: list) -> None:
    if len(call) != 8:
        raise ProtocolError(f"launch record has {len(call) - 2} arguments, expected 6")
    _, seq, fn, grid, block, shared, stream, args = call
    if type(seq) is not int or seq < 1:
        raise ProtocolError(f"bad sequence number {short(seq)} in launch")
    if type(fn) is not int or type(shared) is not int or type(stream) is not int \
            or type(grid) is not list or type(block) is not list or type(args) is not list:
        raise ProtocolError("launch record has an argument of the wrong type")
    if len(grid) != 3 or type(grid[0]) is not int or type(grid[1]) is not int \
            or type(grid[2]) is not int:
        _check_dims(grid, "grid")
    if len(block) != 3 or type(block[0]) is not int or type(block[1]) is not int \
            or type(block[2]) is not int:
        _check_dims(block, "block")
    if args:
        _check_kernel_args(args)


def _check_dims(dims: list, what: str) -> None:
    n = len(dims)
    if n == 3:
        a, b, c = dims
        if type(a) is int and type(b) is int and type(c) is int:
            return
    elif 1 <= n <= 3 and all(type(d) is int for d in dims):
        return
    raise ProtocolError(f"launch {what} must be 1 to 3 ints, got {short(dims)}")


def _is_int(v: Any) -> bool:
    return type(v) is int


_SCALAR_VALUES = frozenset((int, float, bool))


def _check_kernel_args(args: list) -> None:
    if len(args) > MAX_KERNEL_ARGS:
        raise ProtocolError(f"a launch carries at most {MAX_KERNEL_ARGS} kernel arguments")
    for a in args:
        if type(a) is not list or not a:
            raise ProtocolError(f"a kernel argument is a tagged array, got {short(a)}")
        tag = a[0]
        if len(a) == 3:
            if tag == ARG_BUFFER and type(a[1]) is int and type(a[2]) is int:
                continue
            if tag == ARG_SCALAR and type(a[2]) is str and type(a[1]) in _SCALAR_VALUES:
                continue
        if tag == ARG_ARRAY and len(a) == 6 and _is_int(a[1]) and type(a[2]) is str \
                and type(a[3]) is list and _is_int(a[4]) \
                and (a[5] is None or type(a[5]) is list):
            dims = a[3] + (a[5] or [])
            if len(a[3]) <= MAX_ARRAY_DIMS and len(a[5] or ()) <= MAX_ARRAY_DIMS and \
                    all(type(d) is int for d in dims):
                continue
        raise ProtocolError(f"malformed kernel argument {short(a)}")


# -- handshake ---------------------------------------------------------------------

def choose_version(client_min: int, client_max: int) -> int:
    """The highest version both sides speak, or a `VersionMismatchError` that says both ranges."""
    low, high = max(client_min, PROTOCOL_MIN), min(client_max, PROTOCOL_MAX)
    if low > high:
        raise VersionMismatchError(
            f"no common protocol version: the client speaks {client_min}..{client_max}, "
            f"this server {PROTOCOL_MIN}..{PROTOCOL_MAX}; upgrade the older side")
    return high


def encode_arg(arg: Any) -> list:
    """One normalised kernel argument as a LAUNCH record element."""
    if isinstance(arg, BufferArg):
        return [ARG_BUFFER, arg.buffer.id, arg.offset]
    if isinstance(arg, ArrayArg):
        return [ARG_ARRAY, arg.buffer.id, arg.dtype, list(arg.shape), arg.offset,
                list(arg.strides) if arg.strides is not None else None]
    return [ARG_SCALAR, arg.value, arg.dtype]


#: NumPy scalar types whose dtype name a `Scalar` accepted (numeric ones only).
_NUMERIC_SCALARS: dict[type, str] = {}


def encode_args(args: Any) -> list:
    """Launch arguments as LAUNCH record elements, normalised as `types.as_kernel_arg`
    would normalise them, without building the argument objects for the common kinds
    (a buffer, a buffer at an offset, a `Scalar`, a NumPy scalar)."""
    out: list = []
    append = out.append
    for a in args:
        t = type(a)
        if t is BufferArg:
            append([ARG_BUFFER, a.buffer.id, a.offset])
        elif t is Buffer:
            append([ARG_BUFFER, a.id, 0])
        elif t is Scalar:
            append([ARG_SCALAR, a.value, a.dtype])
        else:
            name = _NUMERIC_SCALARS.get(t)
            if name is not None:
                append([ARG_SCALAR, a.item(), name])
                continue
            arg = as_kernel_arg(a)
            if isinstance(a, np.generic):
                _NUMERIC_SCALARS[t] = arg.dtype      # as_kernel_arg accepted its dtype
            append(encode_arg(arg))
    return out
