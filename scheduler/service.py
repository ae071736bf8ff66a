"""The scheduler's gRPC service: registration, heartbeats, leases, and the pool view.

State lives in the store; this module turns requests into store calls, decides who
may make them, signs lease tokens, tells pool servers at once when a lease of theirs
ends (`Watch`), and runs the reaper that marks silent servers down and overdue
leases expired.

Who may do what (from the peer's certificate, `harp.security.Identity`):
- a pool server (server certificate) registers, heartbeats and watches under the
  name its certificate carries, and no other;
- any client attaches; a lease belongs to the identity that attached it, and only
  that identity or an admin may see, renew or detach it;
- `Drain` and `Leases(all)` are for admins; `Pool` shows everyone the servers and
  devices, and each identity only its own sessions (admins see all).
Refusals are `AuthError`s saying which identity lacked which right.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc

from harp import security
from harp.errors import ArgumentError, AuthError, HarpError, LeaseError, NoCapacityError
from harp.executor import ElasticExecutor
from harp.proto import scheduler_pb2 as pb
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.proto.codec import facts_from_proto, facts_to_proto
from harp.security import Identity
from harp.tokens import Claims, SigningKey
from harp.transport import serve, server_options
from harp.types import DeviceInfo

from .placement import BAD_REQUEST, Request, refusal
from .store import LeaseRecord, SqliteStore

log = logging.getLogger("harp.scheduler")

DEFAULT_TTL_S = 600.0
MIN_TTL_S, MAX_TTL_S = 1.0, 7 * 24 * 3600.0
#: How long a lease token lives (a client's lease keeper renews it well before).
DEFAULT_TOKEN_TTL_S = 60.0

#: gRPC status for each refusal, so clients can tell them apart.
_STATUS = {"NO_CAPACITY": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
           "LEASE": grpc.StatusCode.FAILED_PRECONDITION,
           "AUTH": grpc.StatusCode.PERMISSION_DENIED,
           "NOT_FOUND": grpc.StatusCode.NOT_FOUND}


def _abort(context: grpc.ServicerContext, exc: HarpError) -> None:
    """End the RPC with the error's code in the status details (`CODE: message`)."""
    context.abort(_STATUS.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION),
                  f"{exc.code}: {exc.message}")


class Scheduler(pb_grpc.SchedulerServicer):
    """Attaches devices to clients and tracks the pool servers that own them."""

    def __init__(self, store: SqliteStore, key: SigningKey, *, heartbeat_s: float = 5.0,
                 down_after_s: float | None = None, default_ttl_s: float = DEFAULT_TTL_S,
                 token_ttl_s: float = DEFAULT_TOKEN_TTL_S) -> None:
        self.store = store
        self.key = key
        self.heartbeat_s = heartbeat_s
        self.down_after_s = down_after_s or 3 * heartbeat_s
        self.default_ttl_s = default_ttl_s
        self.token_ttl_s = token_ttl_s
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="harp-reaper", daemon=True)
        self._server: grpc.Server | None = None
        self.insecure = False
        self.addresses: list[str] = []
        self._watchers: dict[str, set[queue.SimpleQueue]] = {}
        self._watch_lock = threading.Lock()
        #: Told of every attach once answered: its seconds, and None or the placement
        #: reason it was refused for (`placement.REASONS`); the metrics hook in here.
        self.attach_observers: list[Callable[[float, str | None], None]] = []

    # -- lifetime ------------------------------------------------------------------
    def start(self, listen: list[str], credentials: grpc.ServerCredentials | None) -> list[str]:
        self.insecure = credentials is None
        self.store.forgive_silence(time.time(), grace=self.down_after_s)
        server = grpc.server(ElasticExecutor(256, thread_name_prefix="harp-scheduler"),
                             options=server_options())
        pb_grpc.add_SchedulerServicer_to_server(self, server)
        bound = serve(server, listen, credentials, ("harp.v1.Scheduler",))
        self._server, self.addresses = server, bound
        self._reaper.start()
        log.info("scheduler serving on %s (key %s)", bound, self.key.key_id)
        return bound

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        with self._watch_lock:
            for queues in self._watchers.values():
                for q in queues:
                    q.put(None)
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
                for lease_id in changed["lost"] + changed["expired"]:
                    self._tell_servers(lease_id)
            except Exception:  # the reaper must outlive a bad moment of the database
                log.exception("reaper failed")

    # -- who is asking ---------------------------------------------------------------
    def _identity(self, context: grpc.ServicerContext) -> Identity:
        try:
            who = security.peer_identity(context.auth_context(), insecure=self.insecure)
            security.refuse_monitor(who, "scheduler")
            return who
        except AuthError as exc:
            _abort(context, exc)
            raise

    def _require_pool_server(self, context: grpc.ServicerContext, name: str) -> None:
        """Register, Heartbeat and Watch are for pool servers, each under the name its own
        certificate carries (a client certificate cannot pose as a pool server, and one
        server cannot take another's name)."""
        who = self._identity(context)
        if who is security.ANONYMOUS:
            return                      # plain text on loopback: development only
        if who.role != "server":
            _abort(context, AuthError(f"{who} may not register or heartbeat: only pool "
                                      "servers (server certificates) may"))
        if who.name != name:
            _abort(context, AuthError(f"{who} may register only as {who.name!r}, not as "
                                      f"{name!r}: a pool server's name is its certificate's"))

    def _require_admin(self, context: grpc.ServicerContext, what: str) -> Identity:
        who = self._identity(context)
        if not who.is_admin:
            _abort(context, AuthError(f"{who} may not {what}: it is for admins "
                                      "(harp certs issue admin NAME)"))
        return who

    def _owned(self, context: grpc.ServicerContext, lease_id: str, what: str) -> Identity:
        """The caller, if it may `what` the lease (its owner, or an admin)."""
        who = self._identity(context)
        lease = self.store.lease(lease_id)
        if lease is None:
            _abort(context, LeaseError(f"unknown lease {lease_id}"))
        if not who.is_admin and lease.owner != who.name:
            _abort(context, AuthError(f"{who} may not {what} lease {lease_id}: it belongs to "
                                      f"{lease.owner or 'another identity'}"))
        return who

    # -- pool servers ----------------------------------------------------------------
    def Register(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not request.name:
            _abort(context, ArgumentError("a pool server registers with a name"))
        self._require_pool_server(context, request.name)
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
                                heartbeat_interval_s=self.heartbeat_s,
                                token_ttl_s=self.token_ttl_s)

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_pool_server(context, request.name)
        stats = [_stats_dict(s) for s in request.session_stats]
        leases, draining, unknown = self.store.heartbeat(
            request.name, request.instance, request.sessions, request.memory_used,
            list(request.lease_ids), time.time(), stats)
        statuses = [pb.LeaseStatus(lease_id=lid, state=lease.state if lease else "ended",
                                   expires_at=lease.expires_at if lease else 0.0)
                    for lid, lease in zip(request.lease_ids, leases)]
        return pb.HeartbeatReply(leases=statuses, draining=draining, unknown=unknown)

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Every lease of this server that ends, as it ends (detached, expired, lost)."""
        self._require_pool_server(context, request.name)
        mine: queue.SimpleQueue = queue.SimpleQueue()
        with self._watch_lock:
            self._watchers.setdefault(request.name, set()).add(mine)
        try:
            while context.is_active() and not self._stop.is_set():
                try:
                    status = mine.get(timeout=1.0)
                except queue.Empty:
                    continue
                if status is None:
                    return
                yield status
        finally:
            with self._watch_lock:
                self._watchers.get(request.name, set()).discard(mine)

    def _tell_servers(self, lease_id: str) -> None:
        lease = self.store.lease(lease_id)
        if lease is None:
            return
        status = pb.LeaseStatus(lease_id=lease.id, state=lease.state, expires_at=0.0)
        with self._watch_lock:
            for server in lease.servers:
                for q in self._watchers.get(server, ()):
                    q.put(status)

    # -- leases ----------------------------------------------------------------------
    def Attach(self, request: Any, context: grpc.ServicerContext) -> Any:
        who = self._identity(context)
        started = time.perf_counter()
        ttl = request.ttl_s or self.default_ttl_s
        try:
            if not MIN_TTL_S <= ttl <= MAX_TTL_S:
                raise refusal(ArgumentError, BAD_REQUEST,
                              f"ttl must be between {MIN_TTL_S:g} and {MAX_TTL_S:g} s")
            lease = self.store.attach(Request(
                kind=request.kind, count=request.count or 1, memory=request.memory,
                share=request.share or 1.0, same_host=request.same_host,
                client_host=request.client_host, policy=request.policy or "spread"),
                ttl, request.client_name, time.time(), owner=who.name)
        except (ArgumentError, NoCapacityError) as exc:
            self._attached(started, getattr(exc, "reason", BAD_REQUEST))
            _abort(context, exc)
        log.info("attached %s for %s to %s", lease.id, who,
                 [(d["server"], d["index"]) for d in lease.devices])
        reply = self._lease_reply(lease)
        self._attached(started, None)
        return reply

    def _attached(self, started: float, refused: str | None) -> None:
        seconds = time.perf_counter() - started
        for observe in self.attach_observers:
            try:
                observe(seconds, refused)
            except Exception:       # a metrics hook must not fail an attach
                log.exception("attach observer failed")

    def Renew(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owned(context, request.lease_id, "renew")
        try:
            return self._lease_reply(self.store.renew(request.lease_id, time.time()))
        except LeaseError as exc:
            _abort(context, exc)

    def Detach(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owned(context, request.lease_id, "detach")
        try:
            lease = self.store.detach(request.lease_id, time.time())
        except LeaseError as exc:
            _abort(context, exc)
        self._tell_servers(lease.id)
        return self._lease_reply(lease)

    def Leases(self, request: Any, context: grpc.ServicerContext) -> Any:
        who = self._require_admin(context, "list every identity's leases") if request.all \
            else self._identity(context)
        owner = None if request.all else who.name
        return pb.LeasesReply(leases=[self._lease_reply(lease, tokens=False)
                                      for lease in self.store.leases(request.ended, owner)])

    def Pool(self, request: Any, context: grpc.ServicerContext) -> Any:
        who = self._identity(context)
        return pb.PoolReply(servers=[self._server_info(s, who) for s in self.store.servers()])

    def Drain(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_admin(context, "drain a pool server")
        server = self.store.drain(request.server, request.undo)
        if server is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"NOT_FOUND: no pool server named {request.server!r}")
        return pb.DrainReply(server=self._server_info(server, None))

    # -- replies ---------------------------------------------------------------------
    def _server_info(self, s: dict[str, Any], who: Identity | None) -> Any:
        stats = [x for x in s.get("session_stats", [])
                 if who is None or who.is_admin or x.get("identity") == who.name]
        return pb.ServerInfo(
            name=s["name"], host=s["host"], state=s["state"], endpoints=s["endpoints"],
            last_heartbeat=s["last_heartbeat"], sessions=s["sessions"],
            memory_used=s["memory_used"], leases=s["leases"],
            devices=[pb.DeviceOffer(index=d["index"], facts=facts_to_proto(
                DeviceInfo.from_dict(d["facts"]))) for d in s["devices"]],
            session_stats=[pb.SessionStats(**x) for x in stats])

    def _lease_reply(self, lease: LeaseRecord, tokens: bool = True) -> Any:
        servers = {s["name"]: s for s in self.store.servers()}
        devices = []
        now = time.time()
        for d in lease.devices:
            server = servers.get(d["server"], {"endpoints": [], "host": "", "devices": []})
            facts = next((x["facts"] for x in server["devices"] if x["index"] == d["index"]), None)
            token = ""
            if tokens and lease.state == "active":
                token = self.key.sign(Claims(
                    lease_id=lease.id, server=d["server"], device=d["index"], memory=d["memory"],
                    share=d["share"], expires_at=min(lease.expires_at, now + self.token_ttl_s),
                    issued_at=now, key_id=self.key.key_id, lease_expires_at=lease.expires_at,
                    owner=lease.owner))
            if facts is not None:
                facts = dict(facts, memory=d["memory"])
            devices.append(pb.LeaseDevice(
                server=d["server"], index=d["index"], endpoints=server["endpoints"],
                host=server["host"], token=token,
                facts=facts_to_proto(DeviceInfo.from_dict(facts)) if facts else None))
        return pb.Lease(lease_id=lease.id, state=lease.state, expires_at=lease.expires_at,
                        ttl_s=lease.ttl, memory=lease.memory, share=lease.share, devices=devices,
                        client_name=lease.client_name, created_at=lease.created_at,
                        reason=lease.reason, owner=lease.owner, token_ttl_s=self.token_ttl_s)


_STAT_FIELDS = ("session", "identity", "lease_id", "device", "share", "device_time_s",
                "memory_used", "bytes_in", "bytes_out", "idle_s", "isolation")


def _stats_dict(s: Any) -> dict[str, Any]:
    return {f: getattr(s, f) for f in _STAT_FIELDS}


def open_scheduler(data_dir: Path, **options: Any) -> Scheduler:
    """A scheduler on the SQLite database and signing key in `data_dir`."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = SqliteStore(data_dir / "scheduler.sqlite3")
    key = SigningKey.load_or_create(data_dir / "scheduler-signing.key")
    return Scheduler(store, key, **options)
