"""Talking to the scheduler: attach, renew, detach, and the operator's views of the pool."""
from __future__ import annotations

import socket
from typing import Any

import grpc

from harp.errors import ERROR_CLASSES, HarpError, InternalError, TransportError
from harp.lease import Lease, LeaseDevice
from harp.proto import scheduler_pb2 as pb
from harp.proto.codec import facts_from_proto
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.security import TlsFiles, channel_credentials, tls_files
from harp.transport import channel_options, error_from_rpc, is_loopback

from .address import parse_address

DEFAULT_SCHEDULER = "harp://127.0.0.1:50050"


def scheduler_channel(address: str, tls: TlsFiles | None = None,
                      cert_dir: Any = None) -> grpc.Channel:
    """A channel to the scheduler at a harp:// address (mutual TLS unless harp+insecure://)."""
    target, secure = parse_address(address)
    options = channel_options(server_name="localhost" if target.startswith("unix") else None)
    if secure:
        return grpc.secure_channel(target, channel_credentials(
            tls or tls_files("client", directory=cert_dir)), options=options)
    if not is_loopback(target):
        from harp.errors import AuthError
        raise AuthError(f"refusing plain text to non-loopback {target}")
    return grpc.insecure_channel(target, options=options)


def _error(exc: grpc.RpcError, address: str, what: str) -> HarpError:
    details = exc.details() or ""
    code, _, message = details.partition(": ")
    if code in ERROR_CLASSES:
        return ERROR_CLASSES[code](message)
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        err = error_from_rpc(exc, f"{what}: scheduler at {address}")
        if isinstance(err, TransportError):
            err = TransportError(f"{what}: the scheduler at {address} is unreachable "
                                 f"({exc.code().name}: {details})")
        return err
    return InternalError(f"{what}: {exc.code().name}: {details}")


def lease_from_proto(msg: Any, scheduler: str) -> Lease:
    return Lease(
        lease_id=msg.lease_id, state=msg.state, expires_at=msg.expires_at, ttl_s=msg.ttl_s,
        memory=msg.memory, share=msg.share, scheduler=scheduler, client_name=msg.client_name,
        created_at=msg.created_at, reason=msg.reason,
        devices=[LeaseDevice(server=d.server, index=d.index, endpoints=list(d.endpoints),
                             host=d.host, token=d.token,
                             info=facts_from_proto(d.facts) if d.HasField("facts") else None)
                 for d in msg.devices])


def server_to_dict(s: Any) -> dict[str, Any]:
    return {"name": s.name, "host": s.host, "state": s.state, "endpoints": list(s.endpoints),
            "last_heartbeat": s.last_heartbeat, "sessions": s.sessions,
            "memory_used": s.memory_used, "leases": s.leases,
            "devices": [dict(facts_from_proto(d.facts).to_dict(), index=d.index)
                        for d in s.devices]}


class SchedulerClient:
    """The scheduler's API for clients and operators; every refusal is a typed `HarpError`."""

    def __init__(self, address: str = DEFAULT_SCHEDULER, *, tls: TlsFiles | None = None,
                 cert_dir: Any = None, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = scheduler_channel(address, tls, cert_dir)
        self._stub = pb_grpc.SchedulerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SchedulerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(exc, self.address, what) from None

    def attach(self, kind: str = "", *, count: int = 1, memory: int = 0, share: float = 1.0,
               same_host: bool = False, policy: str = "spread", ttl_s: float = 0.0,
               client_name: str = "") -> Lease:
        reply = self._call("attach", self._stub.Attach, pb.AttachRequest(
            kind=kind, count=count, memory=memory, share=share, same_host=same_host,
            client_host=socket.gethostname(), policy=policy, ttl_s=ttl_s,
            client_name=client_name))
        return lease_from_proto(reply, self.address)

    def renew(self, lease_id: str) -> Lease:
        return lease_from_proto(self._call("renew", self._stub.Renew,
                                           pb.LeaseRef(lease_id=lease_id)), self.address)

    def detach(self, lease_id: str) -> Lease:
        return lease_from_proto(self._call("detach", self._stub.Detach,
                                           pb.LeaseRef(lease_id=lease_id)), self.address)

    def leases(self, include_ended: bool = False) -> list[Lease]:
        reply = self._call("leases", self._stub.Leases, pb.LeasesRequest(all=include_ended))
        return [lease_from_proto(x, self.address) for x in reply.leases]

    def pool(self) -> list[dict[str, Any]]:
        reply = self._call("pool", self._stub.Pool, pb.PoolRequest())
        return [server_to_dict(s) for s in reply.servers]

    def drain(self, server: str, undo: bool = False) -> dict[str, Any]:
        reply = self._call("drain", self._stub.Drain, pb.DrainRequest(server=server, undo=undo))
        return server_to_dict(reply.server)
