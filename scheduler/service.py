"""The scheduler's gRPC service: registration, heartbeats, leases, and the pool view.

State lives in the store; this module turns requests into store calls, signs
lease tokens, and runs the reaper that marks silent servers down and overdue
leases expired.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from harp import security
from harp.errors import ArgumentError, HarpError, LeaseError, NoCapacityError
from harp.proto import scheduler_pb2 as pb
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.proto.codec import facts_from_proto, facts_to_proto
from harp.tokens import Claims, SigningKey
from harp.transport import serve, server_options
from harp.types import DeviceInfo

from .placement import Request
from .store import LeaseRecord, SqliteStore

log = logging.getLogger("harp.scheduler")

DEFAULT_TTL_S = 600.0
MIN_TTL_S, MAX_TTL_S = 1.0, 7 * 24 * 3600.0

#: gRPC status for each refusal, so clients can tell them apart.
_STATUS = {"NO_CAPACITY": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
           "LEASE": grpc.StatusCode.FAILED_PRECONDITION,
           "NOT_FOUND": grpc.StatusCode.NOT_FOUND}


def _abort(context: grpc.ServicerContext, exc: HarpError) -> None:
    """End the RPC with the error's code in the status details (`CODE: message`)."""
    context.abort(_STATUS.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION),
                  f"{exc.code}: {exc.message}")


class Scheduler(pb_grpc.SchedulerServicer):
    """Attaches devices to clients and tracks the pool servers that own them."""

    def __init__(self, store: SqliteStore, key: SigningKey, *, heartbeat_s: float = 5.0,
                 down_after_s: float | None = None, default_ttl_s: float = DEFAULT_TTL_S) -> None:
        self.store = store
        self.key = key
        self.heartbeat_s = heartbeat_s
        self.down_after_s = down_after_s or 3 * heartbeat_s
        self.default_ttl_s = default_ttl_s
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="harp-reaper", daemon=True)
        self._server: grpc.Server | None = None
        self.insecure = False
        self.addresses: list[str] = []

    # -- lifetime ------------------------------------------------------------------
    def start(self, listen: list[str], credentials: grpc.ServerCredentials | None) -> list[str]:
        self.insecure = credentials is None
        self.store.forgive_silence(time.time(), grace=self.down_after_s)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16,
                                                        thread_name_prefix="harp-scheduler"),
                             options=server_options())
        pb_grpc.add_SchedulerServicer_to_server(self, server)
        bound = serve(server, listen, credentials, ("harp.v1.Scheduler",))
        self._server, self.addresses = server, bound
        self._reaper.start()
        log.info("scheduler serving on %s (key %s)", bound, self.key.key_id)
        return bound

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._reaper.is_alive():
            self._reaper.join(5)

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    def _reap_loop(self) -> None:
        interval = min(1.0, self.heartbeat_s / 2)
        while not self._stop.wait(interval):
            try:
                changed = self.store.reap(time.time(), self.down_after_s)
                for what, ids in changed.items():
                    if ids:
                        log.info("reaper: %s %s", what, ", ".join(ids))
            except Exception:  # the reaper must outlive a bad moment of the database
                log.exception("reaper failed")

    # -- pool servers ----------------------------------------------------------------
    def _require_pool_server(self, context: grpc.ServicerContext) -> None:
        """Register and Heartbeat are for pool servers: their peer must hold a server
        certificate of the pool (a user's client certificate cannot take a server's name)."""
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            if self.insecure:
                return                  # plain text on loopback: development only
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "AUTH: registering needs a pool server certificate")
        if not security.is_server_certificate(pems[0]):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "AUTH: only pool servers (server certificates) may register or "
                          "heartbeat; this peer holds a client certificate")

    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_pool_server(context)
        if not request.name:
            _abort(context, ArgumentError("a pool server registers with a name"))
        devices = []
        for offer in request.devices:
            info = facts_from_proto(offer.facts)
            devices.append((offer.index, info.kind, info.memory, info.to_dict()))
        lost = self.store.register(request.name, request.instance, request.host,
                                   list(request.endpoints), devices, time.time())
        log.info("server %s registered (%d devices)%s", request.name, len(devices),
                 f"; leases lost to its restart: {', '.join(lost)}" if lost else "")
        return pb.RegisterReply(scheduler_public_key=self.key.public_bytes,
                                scheduler_key_id=self.key.key_id,
                                heartbeat_interval_s=self.heartbeat_s)

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_pool_server(context)
        leases, draining, unknown = self.store.heartbeat(
            request.name, request.instance, request.sessions, request.memory_used,
            list(request.lease_ids), time.time())
        statuses = [pb.LeaseStatus(lease_id=lid, state=lease.state if lease else "ended",
                                   expires_at=lease.expires_at if lease else 0.0)
                    for lid, lease in zip(request.lease_ids, leases)]
        return pb.HeartbeatReply(leases=statuses, draining=draining, unknown=unknown)

    # -- leases ----------------------------------------------------------------------
    def Attach(self, request: Any, context: grpc.ServicerContext) -> Any:
        ttl = request.ttl_s or self.default_ttl_s
        try:
            if not MIN_TTL_S <= ttl <= MAX_TTL_S:
                raise ArgumentError(f"ttl must be between {MIN_TTL_S} and {MAX_TTL_S} s")
            lease = self.store.attach(Request(
                kind=request.kind, count=request.count or 1, memory=request.memory,
                share=request.share or 1.0, same_host=request.same_host,
                client_host=request.client_host, policy=request.policy or "spread"),
                ttl, request.client_name, time.time())
        except (ArgumentError, NoCapacityError) as exc:
            _abort(context, exc)
        log.info("attached %s to %s", lease.id, [(d["server"], d["index"]) for d in lease.devices])
        return self._lease_reply(lease)

    def Renew(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return self._lease_reply(self.store.renew(request.lease_id, time.time()))
        except LeaseError as exc:
            _abort(context, exc)

    def Detach(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return self._lease_reply(self.store.detach(request.lease_id, time.time()))
        except LeaseError as exc:
            _abort(context, exc)

    def Leases(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.LeasesReply(leases=[self._lease_reply(lease, tokens=False)
                                      for lease in self.store.leases(request.all)])

    def Pool(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.PoolReply(servers=[self._server_info(s) for s in self.store.servers()])

    def Drain(self, request: Any, context: grpc.ServicerContext) -> Any:
        server = self.store.drain(request.server, request.undo)
        if server is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"NOT_FOUND: no pool server named {request.server!r}")
        return pb.DrainReply(server=self._server_info(server))

    # -- replies ---------------------------------------------------------------------
    def _server_info(self, s: dict[str, Any]) -> Any:
        return pb.ServerInfo(
            name=s["name"], host=s["host"], state=s["state"], endpoints=s["endpoints"],
            last_heartbeat=s["last_heartbeat"], sessions=s["sessions"],
            memory_used=s["memory_used"], leases=s["leases"],
            devices=[pb.DeviceOffer(index=d["index"], facts=facts_to_proto(
                DeviceInfo.from_dict(d["facts"]))) for d in s["devices"]])

    def _lease_reply(self, lease: LeaseRecord, tokens: bool = True) -> Any:
        servers = {s["name"]: s for s in self.store.servers()}
        devices = []
        for d in lease.devices:
            server = servers.get(d["server"], {"endpoints": [], "host": "", "devices": []})
            facts = next((x["facts"] for x in server["devices"] if x["index"] == d["index"]), None)
            token = ""
            if tokens and lease.state == "active":
                token = self.key.sign(Claims(
                    lease_id=lease.id, server=d["server"], device=d["index"], memory=d["memory"],
                    share=d["share"], expires_at=lease.expires_at, issued_at=time.time(),
                    key_id=self.key.key_id))
            if facts is not None:
                facts = dict(facts, memory=d["memory"])
            devices.append(pb.LeaseDevice(
                server=d["server"], index=d["index"], endpoints=server["endpoints"],
                host=server["host"], token=token,
                facts=facts_to_proto(DeviceInfo.from_dict(facts)) if facts else None))
        return pb.Lease(lease_id=lease.id, state=lease.state, expires_at=lease.expires_at,
                        ttl_s=lease.ttl, memory=lease.memory, share=lease.share, devices=devices,
                        client_name=lease.client_name, created_at=lease.created_at,
                        reason=lease.reason)


def open_scheduler(data_dir: Path, **options: Any) -> Scheduler:
    """A scheduler on the SQLite database and signing key in `data_dir`."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = SqliteStore(data_dir / "scheduler.sqlite3")
    key = SigningKey.load_or_create(data_dir / "scheduler-signing.key")
    return Scheduler(store, key, **options)
