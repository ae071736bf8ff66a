from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionRange(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("versions", "device_index", "token", "client_name", "client_host", "shared_memory", "data_channel")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    DATA_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    versions: VersionRange
    device_index: int
    token: str
    client_name: str
    client_host: str
    shared_memory: bool
    data_channel: bool
    def __init__(self, versions: _Optional[_Union[VersionRange, _Mapping]] = ..., device_index: _Optional[int] = ..., token: _Optional[str] = ..., client_name: _Optional[str] = ..., client_host: _Optional[str] = ..., shared_memory: _Optional[bool] = ..., data_channel: _Optional[bool] = ...) -> None: ...

class DataChannel(_message.Message):
    __slots__ = ("port", "ticket")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    port: int
    ticket: bytes
    def __init__(self, port: _Optional[int] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("door", "ticket", "slot_size", "slots")
    DOOR_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SLOT_SIZE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    door: str
    ticket: bytes
    slot_size: int
    slots: int
    def __init__(self, door: _Optional[str] = ..., ticket: _Optional[bytes] = ..., slot_size: _Optional[int] = ..., slots: _Optional[int] = ...) -> None: ...

class DeviceFacts(_message.Message):
    __slots__ = ("kind", "name", "backend", "index", "memory", "compute_capability", "formats", "extra_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    backend: str
    index: int
    memory: int
    compute_capability: _containers.RepeatedScalarFieldContainer[int]
    formats: _containers.RepeatedScalarFieldContainer[str]
    extra_json: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., backend: _Optional[str] = ..., index: _Optional[int] = ..., memory: _Optional[int] = ..., compute_capability: _Optional[_Iterable[int]] = ..., formats: _Optional[_Iterable[str]] = ..., extra_json: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("version", "session_id", "device", "error", "chunk_size", "server_name", "shared_memory", "data_channel")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    DATA_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: str
    device: DeviceFacts
    error: ErrorRecord
    chunk_size: int
    server_name: str
    shared_memory: SharedMemory
    data_channel: DataChannel
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[str] = ..., device: _Optional[_Union[DeviceFacts, _Mapping]] = ..., error: _Optional[_Union[ErrorRecord, _Mapping]] = ..., chunk_size: _Optional[int] = ..., server_name: _Optional[str] = ..., shared_memory: _Optional[_Union[SharedMemory, _Mapping]] = ..., data_channel: _Optional[_Union[DataChannel, _Mapping]] = ...) -> None: ...

class ErrorRecord(_message.Message):
    __slots__ = ("code", "message", "call", "seq", "detail", "later")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LATER_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    call: str
    seq: int
    detail: str
    later: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., call: _Optional[str] = ..., seq: _Optional[int] = ..., detail: _Optional[str] = ..., later: _Optional[int] = ...) -> None: ...
