"""The session wire format, without any I/O: what the client and the pool server
put in the frames of a session stream, and how each side checks what it gets.

A session is one gRPC bidirectional stream of raw byte frames:

1. client -> server: a protobuf `HandshakeRequest`; server -> client: a
   protobuf `HandshakeReply` (proto/session.proto).
2. client -> server: *batch* frames, each a msgpack array of call records
   `[op, seq, *args]`. A chunked write (`WRITE_CHUNKED`) is always the last
   record of its batch and is followed by `ceil(nbytes / chunk)` bare payload
   frames, sent as they are, with no header and no re-encoding.
3. server -> client: one *reply* frame for each sync call, a msgpack array
   `[seq, error, result]` where `error` is a serialized protobuf `ErrorRecord`
   or nil. A successful `READ` of up to `INLINE_LIMIT` bytes carries its data
   in the result (`[nbytes, data]`); a larger one (`[nbytes]`) is followed by
   its bare payload frames.

msgpack carries the batches because a call record is a small array of ints
and a few bytes: it packs and unpacks at several million records a second in
C, with no schema step (see ARCHITECTURE.md for the measurement).
"""
from __future__ import annotations

import json
from typing import Any

import msgpack

from .errors import HarpError, ProtocolError, VersionMismatchError, from_record
from .types import DeviceInfo

#: Protocol versions this build speaks (inclusive).
PROTOCOL_MIN = 1
PROTOCOL_MAX = 1

METHOD = "/harp.v1.Session/Open"
HEALTH_SERVICE = "harp.v1.Session"

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

# Asynchronous calls.
ALLOC, FREE, WRITE, WRITE_CHUNKED, COPY, FILL = 1, 2, 3, 4, 5, 6
LOAD_MODULE, FUNCTION, LAUNCH, STREAM, EVENT, RECORD, WAIT = 7, 8, 9, 10, 11, 12, 13
# Sync calls: each gets exactly one reply frame.
READ, SYNCHRONIZE, ELAPSED, MEM_INFO, CLOSE = 20, 21, 22, 23, 24

# Kernel argument tags inside a LAUNCH record.
ARG_BUFFER, ARG_SCALAR, ARG_ARRAY = 0, 1, 2

I, B, S, L, N = int, bytes, str, list, type(None)
#: For each op: its API name and the types of its arguments after [op, seq].
SCHEMA: dict[int, tuple[str, tuple]] = {
    ALLOC: ("alloc", (I, I)),                          # id, nbytes
    FREE: ("free", (I,)),                              # buffer
    WRITE: ("write", (I, I, I, B)),                    # buffer, offset, stream, data
    WRITE_CHUNKED: ("write", (I, I, I, I)),            # buffer, offset, stream, nbytes
    COPY: ("copy", (I, I, I, I, I, I)),                # dst, dst_off, src, src_off, nbytes, stream
    FILL: ("fill", (I, I, I, I, I)),                   # buffer, value, offset, nbytes, stream
    LOAD_MODULE: ("load_module", (I, S, B)),           # id, format, image
    FUNCTION: ("function", (I, I, S)),                 # id, module, name
    LAUNCH: ("launch", (I, L, L, I, I, L)),            # fn, grid, block, shared, stream, args
    STREAM: ("stream", (I,)),                          # id
    EVENT: ("event", (I,)),                            # id
    RECORD: ("record", (I, I)),                        # event, stream
    WAIT: ("wait", (I, I)),                            # stream, event
    READ: ("read", (I, I, I, I)),                      # buffer, offset, nbytes, stream
    SYNCHRONIZE: ("synchronize", ((I, N),)),           # stream or nil (all)
    ELAPSED: ("elapsed", (I, I)),                      # start, end
    MEM_INFO: ("mem_info", ()),
    CLOSE: ("close", ()),
}
SYNC_OPS = frozenset((READ, SYNCHRONIZE, ELAPSED, MEM_INFO, CLOSE))

_packer = msgpack.Packer(use_bin_type=True)


def pack(obj: Any) -> bytes:
    """msgpack-encode one frame."""
    return _packer.pack(obj)


def unpack_batch(frame: bytes) -> list:
    """Decode and check a batch frame: a list of well-formed call records.

    Anything else raises `ProtocolError`; a server ends the session on it.
    """
    try:
        calls = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True,
                                max_array_len=MAX_BATCH_CALLS, max_bin_len=MAX_FRAME,
                                max_str_len=1 << 20, max_map_len=0, max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"malformed batch frame ({len(frame)} bytes): {exc}") from None
    if not isinstance(calls, list) or not calls:
        raise ProtocolError("a batch frame must be a non-empty array of call records")
    for call in calls:
        check_record(call)
    return calls


def check_record(call: Any) -> None:
    """Check one record's op, arity and argument types against `SCHEMA`."""
    if not isinstance(call, list) or len(call) < 2:
        raise ProtocolError(f"a call record is [op, seq, ...], got {_short(call)}")
    op, seq = call[0], call[1]
    spec = SCHEMA.get(op) if type(op) is int else None
    if spec is None:
        raise ProtocolError(f"unknown call op {_short(op)}")
    if type(seq) is not int or seq < 1:
        raise ProtocolError(f"bad sequence number {_short(seq)} in {spec[0]}")
    types = spec[1]
    if len(call) != 2 + len(types):
        raise ProtocolError(f"{spec[0]} record has {len(call) - 2} arguments, "
                            f"expected {len(types)}")
    for value, want in zip(call[2:], types):
        if type(value) is bool or not isinstance(value, want):
            raise ProtocolError(f"{spec[0]} record has an argument of type "
                                f"{type(value).__name__}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- errors ----------------------------------------------------------------------

def error_to_proto(error: HarpError) -> bytes:
    """A `HarpError` as a serialized `ErrorRecord`."""
    from harp.proto import session_pb2 as pb
    return pb.ErrorRecord(code=error.code, message=error.message, call=error.call or "",
                          seq=error.seq or 0, detail=error.detail or "",
                          later=len(getattr(error, "later", ()) or ())).SerializeToString()


def error_from_proto(data: bytes) -> HarpError:
    """The `HarpError` subclass a serialized `ErrorRecord` names."""
    from harp.proto import session_pb2 as pb
    rec = pb.ErrorRecord()
    try:
        rec.ParseFromString(data)
    except Exception:
        return ProtocolError("the server sent an unreadable error record")
    message = rec.message
    if rec.later:
        message += f" ({rec.later} later asynchronous failure(s) also occurred)"
    return from_record({"code": rec.code, "message": message, "call": rec.call or None,
                        "seq": rec.seq or None, "detail": rec.detail or None})


# -- handshake ---------------------------------------------------------------------

def choose_version(client_min: int, client_max: int) -> int:
    """The highest version both sides speak, or a `VersionMismatchError` that says both ranges."""
    low, high = max(client_min, PROTOCOL_MIN), min(client_max, PROTOCOL_MAX)
    if low > high:
        raise VersionMismatchError(
            f"no common protocol version: the client speaks {client_min}..{client_max}, "
            f"this server {PROTOCOL_MIN}..{PROTOCOL_MAX}; upgrade the older side")
    return high


def facts_to_proto(info: DeviceInfo) -> Any:
    from harp.proto import session_pb2 as pb
    return pb.DeviceFacts(kind=info.kind, name=info.name, backend=info.backend, index=info.index,
                          memory=info.memory, compute_capability=list(info.compute_capability or ()),
                          formats=list(info.formats), extra_json=json.dumps(info.extra))


def facts_from_proto(facts: Any) -> DeviceInfo:
    cc = tuple(facts.compute_capability)
    return DeviceInfo(kind=facts.kind, name=facts.name, backend=facts.backend, index=facts.index,
                      memory=facts.memory, compute_capability=cc if cc else None,
                      formats=tuple(facts.formats),
                      extra=json.loads(facts.extra_json) if facts.extra_json else {})


def encode_arg(arg: Any) -> list:
    """One normalised kernel argument as a LAUNCH record element."""
    from .types import ArrayArg, BufferArg
    if isinstance(arg, BufferArg):
        return [ARG_BUFFER, arg.buffer.id, arg.offset]
    if isinstance(arg, ArrayArg):
        return [ARG_ARRAY, arg.buffer.id, arg.dtype, list(arg.shape), arg.offset,
                list(arg.strides) if arg.strides is not None else None]
    return [ARG_SCALAR, arg.value, arg.dtype]
