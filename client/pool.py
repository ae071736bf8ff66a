"""Talking to the scheduler: attach, renew, detach, and the operator's views of the pool.

The scheduler may be several replicas ("harp://a:50050,harp://b:50050"): calls go to
the one last found leading and move on when it is away or says another leads
(`harp.replicas`); an attach carries a request id, so one retried after a failover
does not make a second lease.
"""
from __future__ import annotations

import secrets
import socket
from typing import Any

import grpc

from harp.errors import ERROR_CLASSES, AuthError, HarpError, InternalError, TransportError
from harp.lease import Lease, LeaseDevice
from harp.proto import scheduler_pb2 as pb
from harp.proto.codec import facts_from_proto
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.replicas import ReplicaSet, split_addresses
from harp.security import TlsFiles, channel_credentials, tls_files
from harp.transport import channel_options, diagnose_tls, error_from_rpc, is_loopback

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
        created_at=msg.created_at, reason=msg.reason, owner=msg.owner,
        token_ttl_s=msg.token_ttl_s,
        devices=[LeaseDevice(server=d.server, index=d.index, endpoints=list(d.endpoints),
                             host=d.host, token=d.token,
                             info=facts_from_proto(d.facts) if d.HasField("facts") else None)
                 for d in msg.devices])


_STAT_FIELDS = ("session", "identity", "lease_id", "device", "share", "device_time_s",
                "memory_used", "bytes_in", "bytes_out", "idle_s", "isolation")


def server_to_dict(s: Any) -> dict[str, Any]:
    return {"name": s.name, "host": s.host, "state": s.state, "endpoints": list(s.endpoints),
            "last_heartbeat": s.last_heartbeat, "sessions": s.sessions,
            "memory_used": s.memory_used, "leases": s.leases,
            "devices": [dict(facts_from_proto(d.facts).to_dict(), index=d.index)
                        for d in s.devices],
            "session_stats": [{f: getattr(x, f) for f in _STAT_FIELDS} for x in s.session_stats]}


class SchedulerClient:
    """The scheduler's API for clients and operators; every refusal is a typed `HarpError`.

    `address` is one scheduler address or several, comma-separated (replicas)."""

    def __init__(self, address: str = DEFAULT_SCHEDULER, *, tls: TlsFiles | None = None,
                 cert_dir: Any = None, timeout: float = 10.0, cert_name: str | None = None
                 ) -> None:
        addresses = split_addresses(address)
        self.address = ",".join(addresses)
        self.timeout = timeout
        secure = {parse_address(a)[1] for a in addresses}
        if len(secure) != 1:
            raise AuthError(f"scheduler addresses {self.address} mix mutual TLS and plain "
                            "text: use one scheme for all replicas")
        self._tls = (tls or tls_files("client", cert_name, directory=cert_dir)) \
            if secure.pop() else None
        self.replicas = ReplicaSet(addresses, lambda a: scheduler_channel(a, self._tls),
                                   pb_grpc.SchedulerStub)

    def close(self) -> None:
        self.replicas.close()

    def __enter__(self) -> "SchedulerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, method: str, request: Any) -> Any:
        try:
            return self.replicas.call(method, request, self.timeout)
        except grpc.RpcError as exc:
            address = self.replicas.current
            error = _error(exc, self.address, what)
            if type(error) is TransportError and self._tls is not None:
                target = parse_address(address)[0]
                why = diagnose_tls(target, str(self._tls.ca), str(self._tls.cert),
                                   str(self._tls.key),
                                   server_name="localhost" if target.startswith("unix")
                                   else None)
                if why is not None:
                    error = AuthError(f"{what}: the scheduler at {address}: {why}")
            raise error from None

    def attach(self, kind: str = "", *, count: int = 1, memory: int = 0, share: float = 1.0,
               same_host: bool = False, policy: str = "spread", ttl_s: float = 0.0,
               client_name: str = "") -> Lease:
        reply = self._call("attach", "Attach", pb.AttachRequest(
            kind=kind, count=count, memory=memory, share=share, same_host=same_host,
            client_host=socket.gethostname(), policy=policy, ttl_s=ttl_s,
            client_name=client_name, request_id=secrets.token_hex(16)))
        return lease_from_proto(reply, self.address)

    def renew(self, lease_id: str) -> Lease:
        return lease_from_proto(self._call("renew", "Renew",
                                           pb.LeaseRef(lease_id=lease_id)), self.address)

    def detach(self, lease_id: str) -> Lease:
        return lease_from_proto(self._call("detach", "Detach",
                                           pb.LeaseRef(lease_id=lease_id)), self.address)

    def leases(self, include_ended: bool = False, everyone: bool = False) -> list[Lease]:
        """The caller's leases (`everyone`: every identity's, for admins); active ones
        unless `include_ended`."""
        reply = self._call("leases", "Leases",
                           pb.LeasesRequest(all=everyone, ended=include_ended))
        return [lease_from_proto(x, self.address) for x in reply.leases]

    def pool(self) -> list[dict[str, Any]]:
        reply = self._call("pool", "Pool", pb.PoolRequest())
        return [server_to_dict(s) for s in reply.servers]

    def drain(self, server: str, undo: bool = False) -> dict[str, Any]:
        reply = self._call("drain", "Drain", pb.DrainRequest(server=server, undo=undo))
        return server_to_dict(reply.server)
