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

Replicas (a PostgreSQL store and a `Leadership`): only the leader changes state,
runs the reaper and keeps the revocation streams; a follower answers reads (the
pool, leases) from the shared database and refuses every change with
`NOT_LEADER: ...`, status UNAVAILABLE, naming the leader's address in the trailing
metadata (`harp-leader`), so clients and pool servers go there. Tokens carry the
term of the change that issued them, and their times are those of that change, so
a reply delayed past a failover cannot hand out a token that outlives a revocation.
"""
from __future__ import annotations

import functools
import logging
import queue
import socket
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc

from harp import security
from harp.errors import (ArgumentError, AuthError, HarpError, LeaseError, NoCapacityError,
                         NotLeaderError, TransportError)
from harp.executor import ElasticExecutor
from harp.proto import scheduler_pb2 as pb
from harp.proto import scheduler_pb2_grpc as pb_grpc
from harp.proto.codec import facts_from_proto, facts_to_proto
from harp.replicas import LEADER_METADATA, NOT_LEADER
from harp.security import Identity
from harp.tokens import Claims, SigningKey
from harp.transport import serve, server_options
from harp.types import DeviceInfo

from .placement import BAD_REQUEST, Request, refusal
from .sqlite import SqliteStore
from .store import LeaseRecord, Store

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


#: Ends a Watch stream because this replica stepped down.
_DEPOSED = object()


def _changes_state(handler: Callable[..., Any]) -> Callable[..., Any]:
    """An RPC that changes state: only the leader runs it. A follower, or a leader whose
    term the store finds ended (fenced), refuses with NOT_LEADER; a database that cannot
    be reached is UNAVAILABLE, so the caller tries another replica."""
    @functools.wraps(handler)
    def run(self: "Scheduler", request: Any, context: grpc.ServicerContext) -> Any:
        self._require_leader(context)
        try:
            return handler(self, request, context)
        except NotLeaderError as exc:
            if self.leadership is not None:
                self.leadership.step_down(f"fenced: {exc.message}")
            self._refuse_not_leader(context, exc.message)
        except TransportError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc.code}: {exc.message}")
    return run


class Scheduler(pb_grpc.SchedulerServicer):
    """Attaches devices to clients and tracks the pool servers that own them."""

    def __init__(self, store: Store, key: SigningKey, *, heartbeat_s: float = 5.0,
                 down_after_s: float | None = None, default_ttl_s: float = DEFAULT_TTL_S,
                 token_ttl_s: float = DEFAULT_TOKEN_TTL_S, leadership: Any = None,
                 advertise: str = "") -> None:
        self.store = store
        self.key = key
        self.leadership = leadership          # a Leadership among replicas, or None: alone
        self.advertise = advertise
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
        if self.leadership is None:
            self.store.forgive_silence(time.time(), grace=self.down_after_s)
        server = grpc.server(ElasticExecutor(256, thread_name_prefix="harp-scheduler"),
                             options=server_options())
        pb_grpc.add_SchedulerServicer_to_server(self, server)
        bound = serve(server, listen, credentials, ("harp.v1.Scheduler",))
        self._server, self.addresses = server, bound
        if not self.advertise:
            scheme = "harp+insecure" if self.insecure else "harp"
            self.advertise = f"{scheme}://{bound[0]}"
        if self.leadership is not None:
            self.leadership.on_elected = self._elected
            self.leadership.on_deposed = self._deposed
            self.leadership.start(self.advertise)
        self._reaper.start()
        log.info("scheduler serving on %s (key %s)", bound, self.key.key_id)
        return bound

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        if self.leadership is not None:
            self.leadership.stop()            # a follower takes over without a timeout
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

    # -- leadership ----------------------------------------------------------------------
    def leading(self) -> bool:
        """Whether this scheduler changes state: always when alone, else while it leads."""
        return self.leadership is None or self.leadership.term is not None

    def _elected(self, term: int) -> None:
        """This replica leads from now on: write under `term`, and forgive every server
        the silence of the failover (they heartbeated to a leader that was gone)."""
        self.store.term = term
        self.store.forgive_silence(time.time(), grace=self.down_after_s)

    def _deposed(self, term: int) -> None:
        """This replica no longer leads: write nothing, and send the pool servers'
        revocation streams to the new leader."""
        self.store.term = None
        with self._watch_lock:
            for queues in self._watchers.values():
                for q in queues:
                    q.put(_DEPOSED)

    def _require_leader(self, context: grpc.ServicerContext) -> None:
        if not self.leading():
            self._refuse_not_leader(context, self.store.not_leader_message())

    def _refuse_not_leader(self, context: grpc.ServicerContext, message: str) -> None:
        """Refuse as a follower: NOT_LEADER, naming the leader's address for the caller."""
        try:
            address = self.store.leader()["address"]
        except (HarpError, KeyError):
            address = ""
        if address and address != self.advertise:
            context.set_trailing_metadata(((LEADER_METADATA, address),))
        context.abort(grpc.StatusCode.UNAVAILABLE, f"{NOT_LEADER}: {message}")

    def _term(self) -> tuple[int, float]:
        """This leader's term and when it began (database clock), or (0, 0) alone."""
        if self.leadership is None:
            return 0, 0.0
        return self.leadership.term or 0, self.leadership.started_at

    def _reap_loop(self) -> None:
        interval = min(1.0, self.heartbeat_s / 2)
        while not self._stop.wait(interval):
            if not self.leading():
                continue
            try:
                changed = self.store.reap(time.time(), self.down_after_s)
                for what, ids in changed.items():
                    if ids:
                        log.info("reaper: %s %s", what, ", ".join(ids))
                for lease_id in changed["lost"] + changed["expired"]:
                    self._tell_servers(lease_id)
            except NotLeaderError as exc:
                if self.leadership is not None:
                    self.leadership.step_down(f"fenced: {exc.message}")
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
    @_changes_state
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
        term, started_at = self._term()
        return pb.RegisterReply(scheduler_public_key=self.key.public_bytes,
                                scheduler_key_id=self.key.key_id,
                                heartbeat_interval_s=self.heartbeat_s,
                                token_ttl_s=self.token_ttl_s, term=term,
                                term_started_at=started_at)

    @_changes_state
    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_pool_server(context, request.name)
        stats = [_stats_dict(s) for s in request.session_stats]
        leases, draining, unknown = self.store.heartbeat(
            request.name, request.instance, request.sessions, request.memory_used,
            list(request.lease_ids), time.time(), stats)
        statuses = [pb.LeaseStatus(lease_id=lid, state=lease.state if lease else "ended",
                                   expires_at=lease.expires_at if lease else 0.0)
                    for lid, lease in zip(request.lease_ids, leases)]
        term, started_at = self._term()
        return pb.HeartbeatReply(leases=statuses, draining=draining, unknown=unknown, term=term,
                                 term_started_at=started_at)

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        """Every lease of this server that ends, as it ends (detached, expired, lost).
        Only the leader ends leases, so only the leader keeps these streams; one that
        steps down ends them with NOT_LEADER."""
        self._require_pool_server(context, request.name)
        self._require_leader(context)
        mine: queue.SimpleQueue = queue.SimpleQueue()
        with self._watch_lock:
            self._watchers.setdefault(request.name, set()).add(mine)
        try:
            while context.is_active() and not self._stop.is_set():
                try:
                    status = mine.get(timeout=1.0)
                except queue.Empty:
                    self._require_leader(context)
                    continue
                if status is None:
                    return
                if status is _DEPOSED:
                    self._refuse_not_leader(context, "this scheduler replica stepped down")
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
    @_changes_state
    def Attach(self, request: Any, context: grpc.ServicerContext) -> Any:
        who = self._identity(context)
        started = time.perf_counter()
        ttl = request.ttl_s or self.default_ttl_s
        now = time.time()
        try:
            if not MIN_TTL_S <= ttl <= MAX_TTL_S:
                raise refusal(ArgumentError, BAD_REQUEST,
                              f"ttl must be between {MIN_TTL_S:g} and {MAX_TTL_S:g} s")
            if len(request.request_id) > 64:
                raise refusal(ArgumentError, BAD_REQUEST,
                              "an attach's request id is at most 64 characters")
            lease = self.store.attach(Request(
                kind=request.kind, count=request.count or 1, memory=request.memory,
                share=request.share or 1.0, same_host=request.same_host,
                client_host=request.client_host, policy=request.policy or "spread"),
                ttl, request.client_name, now, owner=who.name, request_id=request.request_id)
        except (ArgumentError, NoCapacityError) as exc:
            self._attached(started, getattr(exc, "reason", BAD_REQUEST))
            _abort(context, exc)
        log.info("attached %s for %s to %s", lease.id, who,
                 [(d["server"], d["index"]) for d in lease.devices])
        reply = self._lease_reply(lease, now=min(now, lease.created_at))
        self._attached(started, None)
        return reply

    def _attached(self, started: float, refused: str | None) -> None:
        seconds = time.perf_counter() - started
        for observe in self.attach_observers:
            try:
                observe(seconds, refused)
            except Exception:       # a metrics hook must not fail an attach
                log.exception("attach observer failed")

    @_changes_state
    def Renew(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._owned(context, request.lease_id, "renew")
        now = time.time()
        try:
            return self._lease_reply(self.store.renew(request.lease_id, now), now=now)
        except LeaseError as exc:
            _abort(context, exc)

    @_changes_state
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

    @_changes_state
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

    def _lease_reply(self, lease: LeaseRecord, tokens: bool = True,
                     now: float | None = None) -> Any:
        """The lease as the wire has it; with `tokens`, one signed token per device, whose
        times count from `now`, the moment of the change that issued them."""
        servers = {s["name"]: s for s in self.store.servers()}
        devices = []
        now = time.time() if now is None else now
        for d in lease.devices:
            server = servers.get(d["server"], {"endpoints": [], "host": "", "devices": []})
            facts = next((x["facts"] for x in server["devices"] if x["index"] == d["index"]), None)
            token = ""
            if tokens and lease.state == "active":
                token = self.key.sign(Claims(
                    lease_id=lease.id, server=d["server"], device=d["index"], memory=d["memory"],
                    share=d["share"], expires_at=min(lease.expires_at, now + self.token_ttl_s),
                    issued_at=now, key_id=self.key.key_id, lease_expires_at=lease.expires_at,
                    owner=lease.owner, term=lease.term))
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


def open_scheduler(data_dir: Path, *, store: str = "", signing_key: Path | None = None,
                   failover_timeout_s: float = 5.0, **options: Any) -> Scheduler:
    """A scheduler on the store named by `store` (default: the SQLite database in
    `data_dir`; `postgresql://...` or `host=... dbname=...`: a PostgreSQL database that
    replicas share, with leadership) and the signing key at `signing_key` (default: in
    `data_dir`; replicas must all be given the same key)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = SigningKey.load_or_create(signing_key or data_dir / "scheduler-signing.key")
    kind, where = store_location(store)
    if kind == "sqlite":
        return Scheduler(SqliteStore(where or data_dir / "scheduler.sqlite3"), key, **options)
    try:
        from .leadership import Leadership
        from .postgres import PostgresStore
    except ImportError as exc:
        raise ArgumentError(f"a PostgreSQL store needs psycopg ({exc}): pip install "
                            "'harp[postgresql]'") from None
    shared = PostgresStore(where, stuck_transaction_s=failover_timeout_s)
    try:
        shared.claim_signing_key(key.key_id)
    except BaseException:
        shared.close()
        raise
    leadership = Leadership(where, name=f"{socket.gethostname()}-{os.getpid()}",
                            timeout_s=failover_timeout_s)
    return Scheduler(shared, key, leadership=leadership, **options)


def store_location(spec: str) -> tuple[str, str]:
    """("sqlite", PATH or "" for the default file) or ("postgresql", DSN) from a --store
    value: "", "sqlite", "sqlite:PATH", "postgresql://...", "postgres://...", or a libpq
    keyword string ("host=/run/postgresql dbname=harp")."""
    spec = (spec or "").strip()
    if spec in ("", "sqlite"):
        return "sqlite", ""
    if spec.startswith("sqlite:"):
        path = spec[len("sqlite:"):]
        if not path:
            raise ArgumentError("sqlite: needs a path, e.g. sqlite:/var/lib/harp/scheduler.db")
        return "sqlite", path
    if spec.startswith(("postgresql://", "postgres://")) or \
            ("=" in spec and "://" not in spec):
        return "postgresql", spec
    raise ArgumentError(f"unknown store {spec!r}: sqlite, sqlite:PATH, postgresql://... or "
                        "'host=... dbname=...'")
