"""Conversions between HARP's types and the protobuf messages of `proto/` (hand-written).

The control plane is protobuf (the handshake, device facts, error records);
this module is the one place that turns those messages into `harp` values and
back, for the client, the pool server and the scheduler alike. The rest of
`proto/` is generated (`proto/generate.sh`).
"""
from __future__ import annotations

import json
from typing import Any

from harp.errors import HarpError, ProtocolError, from_record
from harp.types import DeviceInfo

from . import session_pb2 as pb


def error_to_bytes(error: HarpError) -> bytes:
    """A `HarpError` as a serialized `ErrorRecord`."""
    return pb.ErrorRecord(code=error.code, message=error.message, call=error.call or "",
                          seq=error.seq or 0, detail=error.detail or "",
                          later=len(getattr(error, "later", ()) or ())).SerializeToString()


def error_from_bytes(data: bytes) -> HarpError:
    """The `HarpError` subclass a serialized `ErrorRecord` names."""
    rec = pb.ErrorRecord()
    try:
        rec.ParseFromString(data)
    except Exception:
        return ProtocolError("the server sent an unreadable error record")
    return error_from_message(rec)


def error_from_message(rec: Any) -> HarpError:
    message = rec.message
    if rec.later:
        message += f" ({rec.later} later asynchronous failure(s) also occurred)"
    return from_record({"code": rec.code, "message": message, "call": rec.call or None,
                        "seq": rec.seq or None, "detail": rec.detail or None})


def error_message(error: HarpError) -> Any:
    """A `HarpError` as an `ErrorRecord` message (to embed in another message)."""
    rec = pb.ErrorRecord()
    rec.ParseFromString(error_to_bytes(error))
    return rec


def facts_to_proto(info: DeviceInfo) -> Any:
    return pb.DeviceFacts(kind=info.kind, name=info.name, backend=info.backend, index=info.index,
                          memory=info.memory, compute_capability=list(info.compute_capability or ()),
                          formats=list(info.formats), extra_json=json.dumps(info.extra))


def facts_from_proto(facts: Any) -> DeviceInfo:
    cc = tuple(facts.compute_capability)
    return DeviceInfo(kind=facts.kind, name=facts.name, backend=facts.backend, index=facts.index,
                      memory=facts.memory, compute_capability=cc if cc else None,
                      formats=tuple(facts.formats),
                      extra=json.loads(facts.extra_json) if facts.extra_json else {})
