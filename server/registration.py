"""A pool server's link to its scheduler: registration, heartbeats, and token checks.

The server registers its devices, pins the scheduler's public key from the
answer, and heartbeats its load and the leases of its open sessions. Each
answer says what became of those leases (renewed, ended, lost), and the
server ends sessions whose lease is over. Tokens are verified with the pinned
key alone, so sessions open and run while the scheduler is away.
"""
from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from typing import Any

import grpc

from harp import tokens
from harp.errors import AuthError, LeaseError
from harp.proto import scheduler_pb2 as pb
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.proto.codec import facts_to_proto

from .service import Grant, PoolServer

log = logging.getLogger("harp.server")


class Registrar:
    """Keeps one pool server registered with a scheduler, and admits sessions by token."""

    def __init__(self, server: PoolServer, channel: grpc.Channel, *, endpoints: list[str],
                 host: str | None = None, retry_s: float = 1.0) -> None:
        self.server = server
        self.stub = pb_grpc.SchedulerStub(channel)
        self.channel = channel
        self.endpoints = endpoints
        self.host = host or socket.gethostname()
        self.instance = secrets.token_hex(8)
        self.retry_s = retry_s
        self.public_key: bytes | None = None
        self.heartbeat_s = 5.0
        self.draining = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harp-heartbeat", daemon=True)

    # -- admission ---------------------------------------------------------------------
    def authorize(self, request: Any) -> Grant:
        """A session's grant from its token: signed by the pinned key, for this device, unexpired.

        The session lasts until the lease's expiry plus one heartbeat (see `heartbeat`)."""
        if self.public_key is None:
            raise AuthError("this pool server has not yet registered with its scheduler; "
                            "try again shortly")
        claims = tokens.verify(request.token, self.public_key, server=self.server.name,
                               device=request.device_index)
        return Grant(device_index=claims.device, memory_quota=claims.memory or None,
                     share=claims.share, lease_id=claims.lease_id,
                     expires_at=claims.expires_at + self.heartbeat_s)

    # -- lifetime ----------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> None:
        """Register (retrying until `wait_s`), then heartbeat in the background."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.register()
                break
            except grpc.RpcError as exc:
                if time.monotonic() >= deadline:
                    log.warning("scheduler unreachable (%s); will keep trying", exc.code())
                    break
                time.sleep(self.retry_s)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.channel.close()

    def register(self) -> None:
        backend = self.server.backend
        offers = [pb.DeviceOffer(index=i, facts=facts_to_proto(backend.describe(i)))
                  for i in range(backend.device_count())]
        reply = self.stub.Register(pb.RegisterRequest(
            name=self.server.name, instance=self.instance, host=self.host,
            endpoints=self.endpoints, devices=offers), timeout=10)
        key = bytes(reply.scheduler_public_key)
        if self.public_key is not None and key != self.public_key:
            # A different key is a different scheduler: keep the pinned one, admit no tokens of it.
            log.error("scheduler key changed from %s to %s: keeping the pinned key",
                      tokens.key_id(self.public_key), reply.scheduler_key_id)
            return
        self.public_key = key
        self.heartbeat_s = reply.heartbeat_interval_s or self.heartbeat_s
        log.info("registered with the scheduler as %s (key %s)", self.server.name,
                 reply.scheduler_key_id)

    def heartbeat(self) -> None:
        sessions = self.server.session_records()
        lease_ids = sorted({s.lease_id for s in sessions if s.lease_id})
        used = self.server.memory_used()
        reply = self.stub.Heartbeat(pb.HeartbeatRequest(
            name=self.server.name, instance=self.instance, sessions=len(sessions),
            memory_used=used, lease_ids=lease_ids), timeout=10)
        if reply.unknown:
            log.info("the scheduler does not know this server; registering again")
            self.register()
            return
        self.draining = reply.draining
        for status in reply.leases:
            # Renewals reach this server only by heartbeat: an active lease gets one
            # heartbeat of grace, so a renewed lease is never cut between two of them.
            expires = status.expires_at + self.heartbeat_s if status.state == "active" else 0.0
            self.server.set_lease_expiry(status.lease_id, expires)

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s if self.public_key else self.retry_s):
            try:
                if self.public_key is None:
                    self.register()
                else:
                    self.heartbeat()
            except grpc.RpcError as exc:
                log.debug("scheduler unreachable (%s); sessions go on", exc.code())
            except LeaseError as exc:
                log.warning("heartbeat: %s", exc)
