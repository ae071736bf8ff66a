"""A pool server's link to its scheduler: registration, heartbeats, revocations, token checks.

The server registers its devices, pins the scheduler's public key from the
answer, heartbeats its load and its open sessions, and keeps a stream open on
which the scheduler says at once when a lease of this server ends (`Watch`):
the sessions of that lease end with a `LeaseError`, and its tokens are refused
from then on (a revoked lease is remembered as long as one of its tokens could
live). Heartbeat answers say the same for every lease with a session here, so
a server that missed a word of the stream learns it within a heartbeat; and
tokens live a minute, so even one cut off from the scheduler refuses a detached
lease's token soon. Tokens are verified with the pinned key alone, so sessions
open and run while the scheduler is away.

Replicas: the server is given every replica's address and talks to the leader
(`harp.replicas.ReplicaSet`): a follower's NOT_LEADER or an unreachable replica
sends registration, heartbeats and the revocation stream to the next. Replies
name the leader's term and when it began; the server keeps the newest. A token's
term decides one thing: a token of an older term issued after the newest term
began (beyond `CLOCK_ALLOWANCE_S` of clock skew) is refused, because only a
deposed leader could have signed it. A token of an older term issued before that
is as good as ever, so tokens stay valid across a failover until they expire.
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
from harp.replicas import ReplicaSet, should_move_on

from .service import Grant, PoolServer

log = logging.getLogger("harp.server")

#: How far the clocks of scheduler replicas and their database may disagree (NTP keeps
#: them within milliseconds); a token is judged deposed only beyond it.
CLOCK_ALLOWANCE_S = 2.0


class Registrar:
    """Keeps one pool server registered with a scheduler, and admits sessions by token."""

    def __init__(self, server: PoolServer, scheduler: grpc.Channel | ReplicaSet, *,
                 endpoints: list[str], host: str | None = None, retry_s: float = 1.0) -> None:
        """`scheduler`: a channel to one scheduler, or the `ReplicaSet` of replicas."""
        self.server = server
        if not isinstance(scheduler, ReplicaSet):
            channel = scheduler
            scheduler = ReplicaSet(["scheduler"], lambda _: channel, pb_grpc.SchedulerStub)
        self.replicas = scheduler
        self.endpoints = endpoints
        self.host = host or socket.gethostname()
        self.instance = secrets.token_hex(8)
        self.retry_s = retry_s
        self.public_key: bytes | None = None
        self.heartbeat_s = 5.0
        self.token_ttl_s = 3600.0
        self.draining = False
        self.revoked: dict[str, float] = {}     # lease id -> until when its tokens are refused
        self.term = 0                           # the newest leader term heard of (replicas)
        self.term_started_at = 0.0              # when it began (the database's clock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harp-heartbeat", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="harp-revocations",
                                         daemon=True)
        self._watch_call: Any = None

    # -- admission ---------------------------------------------------------------------
    def authorize(self, request: Any) -> Grant:
        """A session's grant from its token: signed by the pinned key, for this device,
        unexpired, and of a lease that has not ended.

        The session lasts until the lease's expiry plus one heartbeat (see `heartbeat`)."""
        if self.public_key is None:
            raise AuthError("this pool server has not yet registered with its scheduler; "
                            "try again shortly")
        claims = tokens.verify(request.token, self.public_key, server=self.server.name,
                               device=request.device_index)
        with self._lock:
            if claims.lease_id in self.revoked:
                raise LeaseError(f"lease {claims.lease_id} has ended; its tokens are no longer "
                                 "accepted (harp attach for a new lease)")
            if 0 < claims.term < self.term and \
                    claims.issued_at > self.term_started_at + CLOCK_ALLOWANCE_S:
                raise LeaseError(f"the lease token of lease {claims.lease_id} was signed in "
                                 f"scheduler term {claims.term} after term {self.term} began: "
                                 "only a deposed leader signs so; renew the lease for a "
                                 "fresh token")
        ends = claims.lease_expires_at or claims.expires_at
        return Grant(device_index=claims.device, memory_quota=claims.memory or None,
                     share=claims.share, lease_id=claims.lease_id,
                     expires_at=ends + self.heartbeat_s)

    def revoke(self, lease_id: str) -> None:
        """A lease is over: end its sessions now, and refuse its tokens while they live."""
        with self._lock:
            now = time.time()
            self.revoked = {k: v for k, v in self.revoked.items() if v > now}
            self.revoked[lease_id] = now + self.token_ttl_s + self.heartbeat_s
        self.server.set_lease_expiry(lease_id, 0.0)

    # -- lifetime ----------------------------------------------------------------------
    def start(self, wait_s: float = 10.0) -> None:
        """Register (retrying until `wait_s`), then heartbeat and watch in the background."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.register()
                break
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise AuthError(f"the scheduler refused this pool server: "
                                    f"{exc.details()}") from None
                if time.monotonic() >= deadline:
                    log.warning("scheduler unreachable (%s); will keep trying", exc.code())
                    break
                time.sleep(self.retry_s)
        self._thread.start()
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch_call is not None:
            self._watch_call.cancel()
        if self._thread.is_alive():
            self._thread.join(5)
        self.replicas.close()

    def _heard_term(self, term: int, started_at: float) -> None:
        """Keep the newest leader term a reply named."""
        with self._lock:
            if term > self.term:
                self.term, self.term_started_at = term, started_at

    def register(self) -> None:
        backend = self.server.backend
        offers = [pb.DeviceOffer(index=i, facts=facts_to_proto(backend.describe(i)))
                  for i in range(backend.device_count())]
        reply = self.replicas.call("Register", pb.RegisterRequest(
            name=self.server.name, instance=self.instance, host=self.host,
            endpoints=self.endpoints, devices=offers), timeout=10)
        key = bytes(reply.scheduler_public_key)
        if self.public_key is not None and key != self.public_key:
            # A different key is a different scheduler: keep the pinned one, admit no tokens of it.
            log.error("scheduler key changed from %s to %s: keeping the pinned key",
                      tokens.key_id(self.public_key), reply.scheduler_key_id)
            return
        self.public_key = key
        self._heard_term(reply.term, reply.term_started_at)
        self.heartbeat_s = reply.heartbeat_interval_s or self.heartbeat_s
        self.token_ttl_s = reply.token_ttl_s or self.token_ttl_s
        log.info("registered with the scheduler as %s (key %s)", self.server.name,
                 reply.scheduler_key_id)

    def heartbeat(self) -> None:
        records = self.server.session_records()
        lease_ids = sorted({s.lease_id for s in records if s.lease_id})
        stats = [pb.SessionStats(
            session=s["session"], identity=s["identity"], lease_id=s["lease"],
            device=s["device"], share=s["share"], device_time_s=s["device_time_s"],
            memory_used=s["memory_used"], bytes_in=s["bytes_in"], bytes_out=s["bytes_out"],
            idle_s=s["idle_s"], isolation=s["isolation"]) for s in self.server.session_stats()]
        reply = self.replicas.call("Heartbeat", pb.HeartbeatRequest(
            name=self.server.name, instance=self.instance, sessions=len(records),
            memory_used=self.server.memory_used(), lease_ids=lease_ids, session_stats=stats),
            timeout=10)
        self._heard_term(reply.term, reply.term_started_at)
        if reply.unknown:
            log.info("the scheduler does not know this server; registering again")
            self.register()
            return
        self.draining = reply.draining
        for status in reply.leases:
            if status.state == "active":
                # Renewals reach this server only by heartbeat: an active lease gets one
                # heartbeat of grace, so a renewed lease is never cut between two of them.
                self.server.set_lease_expiry(status.lease_id,
                                             status.expires_at + self.heartbeat_s)
            else:
                self.revoke(status.lease_id)

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

    def _watch_loop(self) -> None:
        """Hear of ended leases as they end; after a break, start again (and catch up by
        the next heartbeat)."""
        while not self._stop.is_set():
            if self.public_key is None:
                self._stop.wait(self.retry_s)
                continue
            address = self.replicas.current
            try:
                self._watch_call = self.replicas.stub(address).Watch(pb.WatchRequest(
                    name=self.server.name, instance=self.instance))
                for status in self._watch_call:
                    if status.state != "active":
                        log.info("lease %s is %s: ending its sessions", status.lease_id,
                                 status.state)
                        self.revoke(status.lease_id)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                log.debug("revocation stream broke (%s); reconnecting", exc.code())
                if should_move_on(exc):
                    self.replicas.moved(exc, address)   # a follower, or gone: the next one
            self._stop.wait(self.retry_s)
