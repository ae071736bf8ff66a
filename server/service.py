"""The pool server's gRPC service: admission, then one relayed session per stream.

The handler reads the handshake, checks what the peer may open (its token,
the server's caps), opens a session host (a worker process of its own by
default, `hosts.WorkerHost`; `isolation="thread"` runs it here), then reads
the client's frames itself and sends back what the host yields for each: one
thread per session, no hand-off between threads on a round trip. Whatever
ends the stream (a clean close, a crashed client, a broken connection, a
malformed frame, a lease that is over, a worker that died), the session's
resources are freed in `finally`. A session the server ends has its reason
delivered as a typed error: in the trailing metadata of the call (status
ABORTED) when the handler is at work, else the call is cancelled and the
client asks `Why` for the reason of its session.

The server keeps one memory `Ledger` for all its sessions (device capacity,
quotas per lease across sessions) and one `DeviceArbiter` per device (compute
shares), so workers account against the same books wherever they run.
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from harp import wire
from harp.backends import Backend
from harp.errors import (HarpError, LeaseError, NoCapacityError, ProtocolError,
                         QuotaError, TransportError)
from harp.proto import session_pb2 as pb
from harp.proto.codec import error_from_bytes, error_message, error_to_bytes, facts_to_proto
from harp.shm import SharedWindow
from harp.security import (ANONYMOUS, Identity, TlsFiles, peer_identity, refuse_monitor,
                           ssl_server_context)
from harp.tenancy import Ledger, Tenancy
from harp.transport import serve, server_options, split_host_port

from . import malloc
from harp.executor import ElasticExecutor
from .counters import Counts
from .datachannel import TICKET_TTL_S as DATA_TICKET_TTL_S, DataListener
from .door import Door, door_path
from .tickets import TicketBook
from .turnstile import Turnstile
from .fairshare import DeviceArbiter
from .hosts import SessionEnded, SessionHost, ThreadHost, WorkerHost
from .workers import ControlLoop, WorkerPool

log = logging.getLogger("harp.server")

#: Seconds a new stream may take to send its handshake.
HANDSHAKE_TIMEOUT_S = 10.0
ISOLATIONS = ("process", "thread")
WHY_METHOD = "/harp.v1.Session/Why"
#: Seconds an ended session's handler is given to tell its client itself.
END_GRACE_S = 1.0
#: How long, and for how many sessions, the server remembers why it ended one.
REASONS_KEPT_S, REASONS_KEPT = 600.0, 10_000


@dataclass(frozen=True)
class Grant:
    """What an authorizer allows a session: the device, its quotas, and until when."""
    device_index: int
    memory_quota: int | None = None
    share: float = 1.0
    lease_id: str = ""
    expires_at: float = float("inf")


#: Turns a handshake into a Grant, or raises AuthError/LeaseError.
Authorizer = Callable[[Any], Grant]


def open_authorizer(request: Any) -> Grant:
    """No tokens: any client with a valid certificate may open any device."""
    return Grant(device_index=request.device_index)


@dataclass
class SessionRecord:
    """An admitted session, as the server tracks it."""
    id: str
    identity: Identity
    device: int
    share: float
    lease_id: str = ""
    expires_at: float = float("inf")
    client_name: str = ""
    host: SessionHost | None = None
    context: Any = None
    data_ticket: bytes = b""
    window_ticket: bytes = b""
    version: int = wire.PROTOCOL_MIN            # the protocol version the handshake chose
    admitted: float = field(default_factory=time.time)


def clean_text(text: str, limit: int = 80) -> str:
    """Client-given text made safe for one log line: control characters escaped, cut short."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


class PoolServer:
    """Serves the devices of one backend to sessions over gRPC."""

    def __init__(self, backend: Backend, *, name: str = "", trust_client_code: bool = False,
                 authorizer: Authorizer = open_authorizer, chunk_size: int = wire.CHUNK_SIZE,
                 max_sessions: int = 64, max_sessions_per_lease: int = 8,
                 max_sessions_per_identity: int = 32, idle_timeout_s: float = 1800.0,
                 isolation: str = "process", warm_workers: int = 4,
                 backend_options: dict | None = None,
                 wrap_device: Callable[[Any, str], Any] | None = None,
                 shared_memory: bool = True, data_channel: bool = True) -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation is one of {', '.join(ISOLATIONS)}, not {isolation!r}")
        self.backend = backend
        self.name = name or f"harp-pool@{os.uname().nodename}"
        self.trust_client_code = trust_client_code
        self.authorizer = authorizer
        self.chunk_size = chunk_size
        #: Sessions take turns at decrypting their bulk bytes (`turnstile`).
        self.turns = Turnstile()
        self.max_sessions = max_sessions
        self.max_sessions_per_lease = max_sessions_per_lease
        self.max_sessions_per_identity = max_sessions_per_identity
        self.idle_timeout_s = idle_timeout_s
        self.isolation = isolation
        self.warm_workers = warm_workers
        self.backend_options = dict(backend_options if backend_options is not None
                                    else backend.options)
        #: Wraps each session's backend device, e.g. in a trace recorder (`--trace-dir`);
        #: with process isolation it runs in the worker, so it must pickle.
        self.wrap_device = wrap_device
        #: Offer same-host clients (on a unix socket) a shared-memory window for bulk data.
        self.shared_memory = shared_memory
        self.doors: list[Door] = []
        #: Offer TCP clients a mutual-TLS data channel beside the stream for bulk bytes.
        self.data_channel = data_channel
        self.data_listeners: dict[str, DataListener] = {}
        self.data_port = 0
        self._data_tickets: TicketBook | None = None
        self.insecure = False
        self.sessions: dict[str, SessionRecord] = {}
        self.ledger = Ledger()
        self.arbiters: dict[int, DeviceArbiter] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._reaper: threading.Thread | None = None
        self._ended = 0
        self._reasons: dict[str, tuple[str, bytes, float]] = {}   # session -> who, why, when
        self.workers: WorkerPool | None = None
        self.control: ControlLoop | None = None
        self.addresses: list[str] = []
        #: Per device, what its ended sessions did, and how many sessions it opened: with the
        #: open sessions' own counts, the totals a metrics scrape reports (`server.metrics`).
        self.retired: dict[int, Counts] = {}
        self.opened: dict[int, int] = {}
        #: Sessions refused at the handshake, by error code.
        self.refused: dict[str, int] = {}

    # -- lifetime ----------------------------------------------------------------
    def start(self, listen: list[str], credentials: grpc.ServerCredentials | None,
              tls: TlsFiles | None = None) -> list[str]:
        """Listen on each address (port 0 picks one); `credentials=None` is plain text,
        allowed on loopback addresses only. Returns the bound addresses. With `tls` (the
        files `credentials` came from) sessions get a data channel beside the stream."""
        self.insecure = credentials is None
        malloc.tune()
        for i in range(self.backend.device_count()):
            self.ledger.add_device(i, self.backend.describe(i).memory)
            self.arbiters[i] = DeviceArbiter()
        if self.isolation == "process":
            self.control = ControlLoop(self.ledger, self.arbiters, on_gone=self._worker_gone)
            self.control.start()
            preload = list(getattr(self.backend, "preload", ()))
            if self.trust_client_code:
                preload.append("numba.cuda.simulator")      # numba-python kernels, if installed
            self.workers = WorkerPool(self.backend.name, self.backend_options,
                                      chunk_size=self.chunk_size, warm=self.warm_workers,
                                      wrap=self.wrap_device, preload=preload)
            self.workers.start()
        server = grpc.server(ElasticExecutor(self.max_sessions + 8,
                                             thread_name_prefix="harp-session"),
                             options=server_options(),
                             maximum_concurrent_rpcs=self.max_sessions + 16)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "harp.v1.Session", {"Open": grpc.stream_stream_rpc_method_handler(self._serve),
                                "Why": grpc.unary_unary_rpc_method_handler(self._why)}),))
        try:
            bound = serve(server, listen, credentials, (wire.HEALTH_SERVICE,))
        except BaseException:
            if self.workers is not None:
                self.workers.stop()
            if self.control is not None:
                self.control.stop()
            raise
        self._server, self.addresses = server, bound
        if self.shared_memory:
            self._open_doors(bound)
        if self.data_channel and tls is not None and credentials is not None:
            self._open_data_listeners(bound, tls)
        self._reaper = threading.Thread(target=self._reap_loop, name="harp-session-reaper",
                                        daemon=True)
        self._reaper.start()
        log.info("pool server %s serving %s on %s (%s isolation)", self.name, self.backend.name,
                 bound, self.isolation)
        return bound

    def _open_doors(self, bound: list[str]) -> None:
        """A door beside each unix listen socket, where same-host clients pick up their
        shared-memory windows (`harp.server.door`); without one, bulk data takes the stream."""
        for address in bound:
            if not address.startswith("unix:"):
                continue
            door = Door(door_path(address))
            try:
                door.start()
            except OSError as exc:
                log.warning("no shared-memory door at %s (%s); same-host sessions will move "
                            "bulk data over the stream", door.path, exc)
                continue
            self.doors.append(door)

    def _open_data_listeners(self, bound: list[str], tls: TlsFiles) -> None:
        """A data listener on the host of each TCP listen address, all on one port."""
        try:
            context = ssl_server_context(tls)
        except (OSError, ValueError) as exc:
            log.warning("no data channels (the TLS files do not load for Python's ssl: %s); "
                        "bulk data will take the stream", exc)
            return
        tickets = TicketBook(DATA_TICKET_TTL_S)
        for address in bound:
            if address.startswith("unix:"):
                continue
            host = split_host_port(address)[0].strip("[]")
            if host in self.data_listeners:
                continue
            try:             # one port on every host, so that a client dials where it is
                listener = DataListener(host, context, tickets, port=self.data_port)
            except OSError as exc:
                log.warning("no data channel on %s (%s); bulk data will take the stream",
                            host, exc)
                continue
            listener.start()
            self.data_listeners[host] = listener
            self.data_port = listener.port
        if self.data_listeners:
            self._data_tickets = tickets

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting, end every session and free what it held."""
        self._stopping.set()
        for record in self.session_records():
            if record.host is not None:
                record.host.end(HarpError(f"the pool server {self.name} is shutting down"))
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self.workers is not None:
            self.workers.stop()
        if self.control is not None:
            self.control.stop()
        for door in self.doors:
            door.stop()
        self.doors = []
        for listener in self.data_listeners.values():
            listener.stop()
        self.data_listeners, self._data_tickets = {}, None

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    # -- views -------------------------------------------------------------------
    def session_records(self) -> list[SessionRecord]:
        with self._lock:
            return list(self.sessions.values())

    def lease_sessions(self) -> list[SessionRecord]:
        return [s for s in self.session_records() if s.lease_id]

    def memory_used(self) -> int:
        return sum(self.ledger.used(i) for i in self.arbiters)

    def session_counts(self, record: SessionRecord) -> Counts:
        """What a session has done so far: its host's counts, with the device time the
        device's arbiter was charged when that is more (a worker that died unheard)."""
        host = record.host
        counts = host.counts() if host is not None else Counts()
        arbiter = self.arbiters.get(record.device)
        charged = arbiter.device_ns(record.id) if arbiter is not None else 0
        if charged > counts.device_ns:
            counts = Counts(counts.calls, counts.write_bytes, counts.read_bytes, charged,
                            counts.errors)
        return counts

    def totals(self) -> tuple[list[SessionRecord], dict[int, Counts], dict[int, int]]:
        """The open sessions, and per device what ended sessions did and how many opened,
        taken together (a session moves from the first to the second under the same lock,
        so totals built from them never go back)."""
        with self._lock:
            return list(self.sessions.values()), dict(self.retired), dict(self.opened)

    def session_stats(self) -> list[dict[str, Any]]:
        """Every open session: who, which lease, device time, memory, traffic."""
        rows = []
        for r in self.session_records():
            host = r.host
            arbiter = self.arbiters.get(r.device)
            turns, curbs, _ = arbiter.turns(r.id) if arbiter is not None else (0, 0, 0)
            rows.append({
                "session": r.id, "identity": r.identity.name, "role": r.identity.role,
                "lease": r.lease_id, "device": r.device, "share": r.share,
                "client": r.client_name,
                "isolation": host.isolation if host else self.isolation,
                "pid": host.pid if host else None,
                "device_time_s": arbiter.device_ns(r.id) / 1e9 if arbiter is not None else 0.0,
                "device_turns": turns, "curbs": curbs,
                "memory_used": self.ledger.session_used(r.id),
                "bytes_in": host.bytes_in if host else 0,
                "bytes_out": host.bytes_out if host else 0,
                "frames_in": host.frames_in if host else 0,
                "idle_s": round(time.monotonic() - host.last_activity, 1) if host else 0.0,
                "opened_at": r.admitted,
            })
        return rows

    # -- leases ------------------------------------------------------------------
    def set_lease_expiry(self, lease_id: str, expires_at: float) -> None:
        """What the scheduler says of a lease (renewed, ended, lost) reaches its sessions."""
        for record in self.lease_sessions():
            if record.lease_id == lease_id:
                record.expires_at = expires_at

    def _reap_loop(self) -> None:
        ended = 0
        while not self._stopping.wait(0.2):
            now, mono = time.time(), time.monotonic()
            if self._ended != ended and malloc.trim():   # sessions ended: give memory back
                ended = self._ended
            for record in self.session_records():
                host = record.host
                if host is None or host.ended is not None:
                    continue
                if record.expires_at <= now:
                    self.end_session(record, LeaseError(
                        f"lease {record.lease_id} is over; the session has ended"))
                elif not host.busy and mono - host.last_activity > self.idle_timeout_s:
                    self.end_session(record, QuotaError(
                        f"the session was idle for more than {self.idle_timeout_s:g} s; "
                        f"server {self.name} ended it (open a new one)"))

    def end_session(self, record: SessionRecord, error: HarpError) -> None:
        """End a session from outside its stream; the client gets `error` as the reason:
        in the call's trailing metadata if its handler is at work, else by asking `Why`
        once the call is cancelled here (a handler waiting for the client's next frame
        cannot be woken any other way)."""
        log.info("ending session %s: %s", record.id, error.message)
        with self._lock:
            now = time.time()
            if len(self._reasons) >= REASONS_KEPT:
                for sid in [k for k, v in self._reasons.items() if v[2] < now - REASONS_KEPT_S] \
                        or list(self._reasons)[:REASONS_KEPT // 10]:
                    del self._reasons[sid]
            self._reasons[record.id] = (record.identity.name, error_to_bytes(error), now)
        if record.host is not None:
            record.host.end(error)
        if record.context is not None:
            # A handler at work, or woken by the client's next frame within the grace,
            # ends the call itself, with the reason in its trailing metadata; one still
            # waiting for the client then is cancelled, and the client asks `Why`.
            timer = threading.Timer(END_GRACE_S, self._cancel_idle, args=(record,))
            timer.daemon = True
            timer.start()

    def _cancel_idle(self, record: SessionRecord) -> None:
        with self._lock:
            still = self.sessions.get(record.id) is record
        if still and not (record.host is not None and record.host.busy):
            record.context.cancel()

    def _worker_gone(self, sid: str, error: bytes | None) -> None:
        """A worker failed (`error`, e.g. a malformed frame it was relayed) or its control
        channel closed: if its session is still here and idle, end it now (a busy one
        learns it on its data channel)."""
        with self._lock:
            record = self.sessions.get(sid)
        host = record.host if record is not None else None
        if host is None or host.ended is not None or host.busy or host.done:
            return
        if error is not None:
            self.end_session(record, error_from_bytes(error))
        elif isinstance(host, WorkerHost) and host.worker.exitcode(2.0) is not None:
            self.end_session(record, host._why_gone())

    def _why(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Why the server ended a session (asked by its own client): an ErrorRecord, or
        nothing if it did not."""
        sid = request.decode("utf-8", "replace")
        with self._lock:
            reason = self._reasons.get(sid)
        if reason is None or reason[0] != self._identity(context).name:
            return b""
        return reason[1]

    # -- one session -------------------------------------------------------------
    def _serve(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        record: SessionRecord | None = None
        try:
            # A stream that never says hello must not hold a session slot forever.
            watchdog = threading.Timer(HANDSHAKE_TIMEOUT_S, context.cancel)
            watchdog.start()
            try:
                first = next(frames)
            except StopIteration:
                return
            finally:
                watchdog.cancel()
            record, reply = self._handshake(first, context)
            yield reply
            if record is None:
                return
            host = record.host
            assert host is not None
            # A client that goes while its call runs (a read waiting on it in shared memory)
            # must not leave the host waiting: end it.
            context.add_callback(lambda: self._rpc_over(record))
            for frame in frames:
                if not frame:
                    raise ProtocolError("an empty frame")
                if frame[0] == wire.FRAMES_ON_DATA:
                    self._serve_on_data(record, frame)
                    return
                yield from host.handle(frame)
                if host.done:
                    return
                if host.ended is not None:           # ended while this frame ran
                    raise SessionEnded(host.ended)
            host.finish()                            # the client closed its side
        except SessionEnded as ended:
            log.info("session %s ended: %s", record.id if record else "-", ended.error.message)
            context.set_trailing_metadata(((wire.ERROR_METADATA, error_to_bytes(ended.error)),))
            context.abort(grpc.StatusCode.ABORTED, ended.error.message[:500])
        except ProtocolError as exc:
            context.set_trailing_metadata(((wire.ERROR_METADATA, error_to_bytes(exc)),))
            context.abort(grpc.StatusCode.ABORTED, exc.message[:500])
        except grpc.RpcError:
            pass  # the client went away; clean up below
        except Exception:  # never let one session's bug take the server down
            if record is None or record.host is None or record.host.ended is None:
                log.exception("session %s failed", record.id if record else "-")
        finally:
            if record is not None:
                final = self.session_counts(record) if record.host is not None else None
                with self._lock:
                    self.sessions.pop(record.id, None)
                    if final is not None:
                        self.retired[record.device] = \
                            self.retired.get(record.device, Counts()) + final
                if record.host is not None:
                    record.host.dispose()
                if record.data_ticket and self._data_tickets is not None:
                    self._data_tickets.discard(record.data_ticket)
                if record.window_ticket and self.doors:  # never picked up: close its copies
                    self.doors[0].tickets.discard(record.window_ticket)
                self.ledger.close(record.id)
                self._ended += 1

    def _serve_on_data(self, record: SessionRecord, frame: bytes) -> None:
        """The rest of a session whose client moved its frames to the data channel
        (`wire.FRAMES_ON_DATA`): frames in, replies out, on that socket, in this thread.
        Returns when the client closed the session or went away; raises `SessionEnded` or
        `ProtocolError` as the stream's loop does (the call then ends with the reason,
        which is where the client looks for it once its channel is shut)."""
        if len(frame) != 1 or record.version < wire.FRAMES_ON_DATA_SINCE:
            raise ProtocolError(f"FRAMES_ON_DATA at protocol {record.version}" if len(frame) == 1
                                else "a FRAMES_ON_DATA frame carries nothing")
        host = record.host
        assert host is not None
        channel = host.move_frames_to_data()
        if not record.context.is_active():       # the call ended before `_rpc_over` could
            return                               # see the switch: nobody is there
        while True:
            try:
                frame = channel.recv()
            except OSError:                      # reset, or shut down by `end`
                if host.ended is not None:
                    raise SessionEnded(host.ended) from None
                return                           # the client went away
            if frame is None:                    # the client closed its side
                host.finish()
                return
            if not frame:
                raise ProtocolError("an empty frame")
            if frame[0] == wire.FRAMES_ON_DATA:
                raise ProtocolError("the session's frames are on its data channel already")
            try:
                for reply in host.handle(frame):
                    channel.send(reply)
            except OSError:
                if host.ended is not None:
                    raise SessionEnded(host.ended) from None
                return
            if host.done:
                return
            if host.ended is not None:           # ended while this frame ran
                raise SessionEnded(host.ended)

    def _rpc_over(self, record: SessionRecord) -> None:
        """The session's call ended (the client cancelled it or went away, or it was
        cancelled here). A host in a call is ended; a handler waiting for the client's next
        frame on the data channel, which only a shut-down wakes, is woken (it then sees the
        channel end, and returns)."""
        host = record.host
        if host is None or host.done:
            return
        if host.busy and host.ended is None:
            host.end(TransportError("the client went away during a call"))
        elif host.frames_on_data:                # ended or not: nothing else would wake it
            host.stop_waiting()

    def _identity(self, context: grpc.ServicerContext) -> Identity:
        if self.insecure:
            return ANONYMOUS
        return peer_identity(context.auth_context())

    def _admit(self, record: SessionRecord) -> None:
        """Take a session slot, atomically with the checks of every cap."""
        with self._lock:
            if self._stopping.is_set():
                raise NoCapacityError(f"pool server {self.name} is shutting down")
            if len(self.sessions) >= self.max_sessions:
                raise NoCapacityError(f"pool server {self.name} has its maximum of "
                                      f"{self.max_sessions} sessions open; try again later")
            if record.lease_id:
                n = sum(1 for s in self.sessions.values() if s.lease_id == record.lease_id)
                if n >= self.max_sessions_per_lease:
                    raise QuotaError(f"lease {record.lease_id} already has {n} sessions on "
                                     f"{self.name}, its maximum")
            n = sum(1 for s in self.sessions.values() if s.identity.name == record.identity.name)
            if n >= self.max_sessions_per_identity and not record.identity.is_admin:
                raise QuotaError(f"{record.identity} already has {n} sessions on {self.name}, "
                                 "the most one identity may hold")
            self.sessions[record.id] = record

    def _handshake(self, frame: bytes,
                   context: grpc.ServicerContext) -> tuple[SessionRecord | None, bytes]:
        request = pb.HandshakeRequest()
        try:
            request.ParseFromString(frame)
        except Exception:
            raise ProtocolError("the first frame of a session must be a HandshakeRequest") from None
        record = None
        client = clean_text(request.client_name)
        try:
            version = wire.choose_version(request.versions.min, request.versions.max)
            identity = self._identity(context)
            refuse_monitor(identity, "pool server's sessions")
            grant = self.authorizer(request)
            self.backend.check_index(grant.device_index)
            record = SessionRecord(id=f"s{next(self._counter)}-{secrets.token_hex(4)}",
                                   identity=identity, device=grant.device_index,
                                   share=grant.share, lease_id=grant.lease_id,
                                   expires_at=grant.expires_at, client_name=client,
                                   context=context, version=version)
            self._admit(record)
            window = self._window_for(request, context)
            try:
                record.host = self._open_host(record, grant, window)
                offer = self._offer(window)
                record.window_ticket = offer.ticket if offer is not None else b""
            except BaseException:
                if window is not None and record.host is None:
                    window.close()
                raise
            if window is not None and self.isolation == "process":
                window.close()               # the worker and the door have their own copies
        except HarpError as exc:
            with self._lock:
                if record is not None:
                    self.sessions.pop(record.id, None)
                self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
            if record is not None:
                self.ledger.close(record.id)
            log.info("refused a session from %s (%s): %s", context.peer(), client, exc.message)
            return None, pb.HandshakeReply(error=error_message(exc),
                                           server_name=self.name).SerializeToString()
        log.info("session %s opened by %s (%s, %s) on device %d", record.id, context.peer(),
                 record.identity, client, grant.device_index)
        with self._lock:
            self.opened[record.device] = self.opened.get(record.device, 0) + 1
        return record, pb.HandshakeReply(
            version=version, session_id=record.id, device=facts_to_proto(record.host.info),
            chunk_size=self.chunk_size, server_name=self.name, shared_memory=offer,
            data_channel=self._offer_data(request, context, record)).SerializeToString()

    def _offer_data(self, request: Any, context: grpc.ServicerContext,
                    record: SessionRecord) -> pb.DataChannel | None:
        """A data channel for a TCP session that can take one."""
        if not request.data_channel or self._data_tickets is None or record.host is None:
            return None
        peer = context.peer()
        if not peer.startswith(("ipv4:", "ipv6:")):
            return None
        # Every listener has the same port, so the client dials the host it reached the
        # stream at; any listener's ticket book will do, as long as it is that one's.
        ticket = self._data_tickets.offer((record.identity.name, record.host.attach_data))
        record.data_ticket = ticket
        return pb.DataChannel(port=self.data_port, ticket=ticket)

    def _window_for(self, request: Any, context: grpc.ServicerContext) -> SharedWindow | None:
        """A shared-memory window, for a client that asks for one on a unix socket."""
        if not (request.shared_memory and self.doors and context.peer().startswith("unix:")):
            return None
        try:
            return SharedWindow.create()
        except OSError as exc:
            log.warning("no shared-memory window for a same-host session: %s", exc)
            return None

    def _offer(self, window: SharedWindow | None) -> pb.SharedMemory | None:
        if window is None:
            return None
        door = self.doors[0]
        try:
            ticket = door.offer(window.fds())
        except OSError as exc:                   # out of file descriptors: take the stream
            log.warning("cannot offer a shared-memory window: %s", exc)
            return None
        return pb.SharedMemory(door=door.path, ticket=ticket, slot_size=window.slot_size,
                               slots=window.slots)

    def _open_host(self, record: SessionRecord, grant: Grant,
                   window: SharedWindow | None = None) -> SessionHost:
        quota = grant.memory_quota or None
        if self.isolation == "thread":
            account = self.ledger.open(record.id, grant.device_index, quota=quota,
                                       lease=grant.lease_id)
            gate = self.arbiters[grant.device_index].local_gate(record.id, grant.share)
            device = self.backend.open(grant.device_index, memory_quota=quota,
                                       trust_client_code=self.trust_client_code,
                                       tenancy=Tenancy(account, gate))
            if self.wrap_device is not None:
                device = self.wrap_device(device, record.id)
            return ThreadHost(record.id, device, self.chunk_size, self.turns, window, gate)
        assert self.workers is not None and self.control is not None
        self.ledger.open(record.id, grant.device_index, quota=quota, lease=grant.lease_id)
        worker = self.workers.take()
        host = WorkerHost(record.id, worker, self.control, self.turns)
        try:
            host.open({"session": record.id, "device": grant.device_index, "quota": quota,
                       "trust": self.trust_client_code}, grant.device_index, grant.share,
                      window=window)
        except BaseException:
            host.dispose()
            worker.kill()
            raise
        return host

