from harp.proto import session_pb2 as _session_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceOffer(_message.Message):
    __slots__ = ("index", "facts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    facts: _session_pb2.DeviceFacts
    def __init__(self, index: _Optional[int] = ..., facts: _Optional[_Union[_session_pb2.DeviceFacts, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "instance", "host", "endpoints", "devices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance: str
    host: str
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceOffer]
    def __init__(self, name: _Optional[str] = ..., instance: _Optional[str] = ..., host: _Optional[str] = ..., endpoints: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[_Union[DeviceOffer, _Mapping]]] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("scheduler_public_key", "scheduler_key_id", "heartbeat_interval_s", "token_ttl_s", "term", "term_started_at")
    SCHEDULER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TTL_S_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    TERM_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    scheduler_public_key: bytes
    scheduler_key_id: str
    heartbeat_interval_s: float
    token_ttl_s: float
    term: int
    term_started_at: float
    def __init__(self, scheduler_public_key: _Optional[bytes] = ..., scheduler_key_id: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., token_ttl_s: _Optional[float] = ..., term: _Optional[int] = ..., term_started_at: _Optional[float] = ...) -> None: ...

class SessionStats(_message.Message):
    __slots__ = ("session", "identity", "lease_id", "device", "share", "device_time_s", "memory_used", "bytes_in", "bytes_out", "idle_s", "isolation")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    session: str
    identity: str
    lease_id: str
    device: int
    share: float
    device_time_s: float
    memory_used: int
    bytes_in: int
    bytes_out: int
    idle_s: float
    isolation: str
    def __init__(self, session: _Optional[str] = ..., identity: _Optional[str] = ..., lease_id: _Optional[str] = ..., device: _Optional[int] = ..., share: _Optional[float] = ..., device_time_s: _Optional[float] = ..., memory_used: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., idle_s: _Optional[float] = ..., isolation: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("name", "instance", "sessions", "memory_used", "lease_ids", "session_stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance: str
    sessions: int
    memory_used: int
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    session_stats: _containers.RepeatedCompositeFieldContainer[SessionStats]
    def __init__(self, name: _Optional[str] = ..., instance: _Optional[str] = ..., sessions: _Optional[int] = ..., memory_used: _Optional[int] = ..., lease_ids: _Optional[_Iterable[str]] = ..., session_stats: _Optional[_Iterable[_Union[SessionStats, _Mapping]]] = ...) -> None: ...

class LeaseStatus(_message.Message):
    __slots__ = ("lease_id", "state", "expires_at")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    state: str
    expires_at: float
    def __init__(self, lease_id: _Optional[str] = ..., state: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("leases", "draining", "unknown", "term", "term_started_at")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    TERM_STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[LeaseStatus]
    draining: bool
    unknown: bool
    term: int
    term_started_at: float
    def __init__(self, leases: _Optional[_Iterable[_Union[LeaseStatus, _Mapping]]] = ..., draining: _Optional[bool] = ..., unknown: _Optional[bool] = ..., term: _Optional[int] = ..., term_started_at: _Optional[float] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("name", "instance")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance: str
    def __init__(self, name: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("kind", "count", "memory", "share", "same_host", "client_host", "policy", "ttl_s", "client_name", "request_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SAME_HOST_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HOST_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    count: int
    memory: int
    share: float
    same_host: bool
    client_host: str
    policy: str
    ttl_s: float
    client_name: str
    request_id: str
    def __init__(self, kind: _Optional[str] = ..., count: _Optional[int] = ..., memory: _Optional[int] = ..., share: _Optional[float] = ..., same_host: _Optional[bool] = ..., client_host: _Optional[str] = ..., policy: _Optional[str] = ..., ttl_s: _Optional[float] = ..., client_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class LeaseDevice(_message.Message):
    __slots__ = ("server", "index", "endpoints", "host", "facts", "token")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    server: str
    index: int
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    host: str
    facts: _session_pb2.DeviceFacts
    token: str
    def __init__(self, server: _Optional[str] = ..., index: _Optional[int] = ..., endpoints: _Optional[_Iterable[str]] = ..., host: _Optional[str] = ..., facts: _Optional[_Union[_session_pb2.DeviceFacts, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "state", "expires_at", "ttl_s", "memory", "share", "devices", "client_name", "created_at", "reason", "owner", "token_ttl_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TTL_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    state: str
    expires_at: float
    ttl_s: float
    memory: int
    share: float
    devices: _containers.RepeatedCompositeFieldContainer[LeaseDevice]
    client_name: str
    created_at: float
    reason: str
    owner: str
    token_ttl_s: float
    def __init__(self, lease_id: _Optional[str] = ..., state: _Optional[str] = ..., expires_at: _Optional[float] = ..., ttl_s: _Optional[float] = ..., memory: _Optional[int] = ..., share: _Optional[float] = ..., devices: _Optional[_Iterable[_Union[LeaseDevice, _Mapping]]] = ..., client_name: _Optional[str] = ..., created_at: _Optional[float] = ..., reason: _Optional[str] = ..., owner: _Optional[str] = ..., token_ttl_s: _Optional[float] = ...) -> None: ...

class LeaseRef(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class PoolRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("name", "host", "state", "endpoints", "last_heartbeat", "sessions", "memory_used", "devices", "leases", "session_stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    SESSION_STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    state: str
    endpoints: _containers.RepeatedScalarFieldContainer[str]
    last_heartbeat: float
    sessions: int
    memory_used: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceOffer]
    leases: int
    session_stats: _containers.RepeatedCompositeFieldContainer[SessionStats]
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., state: _Optional[str] = ..., endpoints: _Optional[_Iterable[str]] = ..., last_heartbeat: _Optional[float] = ..., sessions: _Optional[int] = ..., memory_used: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceOffer, _Mapping]]] = ..., leases: _Optional[int] = ..., session_stats: _Optional[_Iterable[_Union[SessionStats, _Mapping]]] = ...) -> None: ...

class PoolReply(_message.Message):
    __slots__ = ("servers",)
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerInfo]
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerInfo, _Mapping]]] = ...) -> None: ...

class LeasesRequest(_message.Message):
    __slots__ = ("all", "ended")
    ALL_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    all: bool
    ended: bool
    def __init__(self, all: _Optional[bool] = ..., ended: _Optional[bool] = ...) -> None: ...

class LeasesReply(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("server", "undo")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    server: str
    undo: bool
    def __init__(self, server: _Optional[str] = ..., undo: _Optional[bool] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("server",)
    SERVER_FIELD_NUMBER: _ClassVar[int]
    server: ServerInfo
    def __init__(self, server: _Optional[_Union[ServerInfo, _Mapping]] = ...) -> None: ...
