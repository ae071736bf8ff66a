"""The pool server's gRPC service: one bidirectional stream per session.

The handler reads the handshake, opens a session on the backend device, then
feeds decoded call records to `Session` and streams its replies back. Whatever
ends the stream (a clean close, a crashed client, a broken connection, a
malformed frame), the session's resources are freed in `finally`.
"""
from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from harp import wire
from harp.backends import Backend
from harp.errors import HarpError, LeaseError, ProtocolError
from harp.proto import session_pb2 as pb
from harp.transport import serve, server_options

from .session import ChunkSink, Session

log = logging.getLogger("harp.server")

#: Seconds a new stream may take to send its handshake.
HANDSHAKE_TIMEOUT_S = 10.0


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


class PoolServer:
    """Serves the devices of one backend to sessions over gRPC."""

    def __init__(self, backend: Backend, *, name: str = "", trust_client_code: bool = False,
                 authorizer: Authorizer = open_authorizer, chunk_size: int = wire.CHUNK_SIZE,
                 max_sessions: int = 64,
                 wrap_device: Callable[[Any, str], Any] | None = None) -> None:
        self.backend = backend
        self.name = name or f"harp-pool@{os.uname().nodename}"
        self.trust_client_code = trust_client_code
        self.authorizer = authorizer
        self.chunk_size = chunk_size
        self.max_sessions = max_sessions
        #: Wraps each session's backend device, e.g. in a trace recorder (`--trace-dir`).
        self.wrap_device = wrap_device
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._reaper: threading.Thread | None = None
        self.addresses: list[str] = []

    # -- lifetime ----------------------------------------------------------------
    def start(self, listen: list[str], credentials: grpc.ServerCredentials | None) -> list[str]:
        """Listen on each address (port 0 picks one); `credentials=None` is plain text,
        allowed on loopback addresses only. Returns the bound addresses."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_sessions + 4,
                                                        thread_name_prefix="harp-session"),
                             options=server_options(),
                             maximum_concurrent_rpcs=self.max_sessions + 4)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "harp.v1.Session", {"Open": grpc.stream_stream_rpc_method_handler(self._serve)}),))
        bound = serve(server, listen, credentials, (wire.HEALTH_SERVICE,))
        self._server, self.addresses = server, bound
        self._reaper = threading.Thread(target=self._reap_loop, name="harp-lease-reaper",
                                        daemon=True)
        self._reaper.start()
        log.info("pool server %s serving %s on %s", self.name, self.backend.name, bound)
        return bound

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting, end every session and free what it held."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        with self._lock:
            sessions = list(self.sessions.values())
        for session in sessions:
            session.close()

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()

    # -- leases ------------------------------------------------------------------
    def lease_sessions(self) -> list[Session]:
        with self._lock:
            return [s for s in self.sessions.values() if s.lease_id]

    def set_lease_expiry(self, lease_id: str, expires_at: float) -> None:
        """What the scheduler says of a lease (renewed, ended, lost) reaches its sessions."""
        for session in self.lease_sessions():
            if session.lease_id == lease_id:
                session.expires_at = expires_at

    def _reap_loop(self) -> None:
        while not self._stopping.wait(0.2):
            now = time.time()
            for session in self.lease_sessions():
                if session.expires_at <= now and not session.closed and not session.ending:
                    session.ending = True       # one closer per session, off this thread
                    threading.Thread(target=self.end_session, name="harp-end-session",
                                     args=(session, f"lease {session.lease_id} is over"),
                                     daemon=True).start()

    def end_session(self, session: Session, why: str) -> None:
        """End a session from outside its stream: free its resources, then end the RPC."""
        log.info("ending session %s: %s", session.id, why)
        got = session.lock.acquire(timeout=1.0)
        try:
            session.close()
        finally:
            if got:
                session.lock.release()
        if session.context is not None:
            session.context.cancel()

    # -- one session -------------------------------------------------------------
    def _serve(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        session: Session | None = None
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
            session, reply = self._handshake(first, context)
            yield reply
            if session is None:
                return
            yield from self._run(session, frames)
        except (ProtocolError, LeaseError) as exc:
            log.warning("session %s ended: %s", session.id if session else "-", exc)
            yield wire.pack([0, wire.error_to_proto(exc), None])
        except grpc.RpcError:
            pass  # the client went away; clean up below
        except Exception:  # never let one session's bug take the server down
            log.exception("session %s failed", session.id if session else "-")
        finally:
            if session is not None:
                with self._lock:
                    self.sessions.pop(session.id, None)
                session.close()

    def _handshake(self, frame: bytes, context: grpc.ServicerContext) -> tuple[Session | None, bytes]:
        request = pb.HandshakeRequest()
        try:
            request.ParseFromString(frame)
        except Exception:
            raise ProtocolError("the first frame of a session must be a HandshakeRequest") from None
        try:
            version = wire.choose_version(request.versions.min, request.versions.max)
            grant = self.authorizer(request)
            self.backend.check_index(grant.device_index)
            with self._lock:
                if len(self.sessions) >= self.max_sessions:
                    raise HarpError(f"server {self.name} has its maximum of "
                                    f"{self.max_sessions} sessions")
            session_id = f"s{next(self._counter)}-{secrets.token_hex(4)}"
            device = self.backend.open(grant.device_index, memory_quota=grant.memory_quota or None,
                                       trust_client_code=self.trust_client_code)
            if self.wrap_device is not None:
                device = self.wrap_device(device, session_id)
        except HarpError as exc:
            log.info("refused a session from %s: %s", context.peer(), exc)
            error = pb.ErrorRecord()
            error.ParseFromString(wire.error_to_proto(exc))
            return None, pb.HandshakeReply(error=error, server_name=self.name).SerializeToString()
        session = Session(device, session_id, self.chunk_size)
        session.lease_id, session.expires_at = grant.lease_id, grant.expires_at
        session.context = context
        with self._lock:
            self.sessions[session_id] = session
        log.info("session %s opened by %s (%s) on device %d", session_id, context.peer(),
                 request.client_name, grant.device_index)
        return session, pb.HandshakeReply(
            version=version, session_id=session_id, device=wire.facts_to_proto(device.info),
            chunk_size=self.chunk_size, server_name=self.name).SerializeToString()

    def _run(self, session: Session, frames: Iterator[bytes]) -> Iterator[bytes]:
        """Execute each frame's calls under the session's lock, and send replies outside it,
        so a slow reader never keeps the lease reaper from ending the session."""
        sink: ChunkSink | None = None
        execute = session.execute
        for frame in frames:
            if session.expires_at <= time.time():
                raise LeaseError(f"lease {session.lease_id} is over; the session has ended")
            with session.lock:
                if session.closed:
                    return
                if sink is not None:
                    sink.feed(frame)
                    if sink.done:
                        sink = None
                    continue
                calls = wire.unpack_batch(frame)
            i, last = 0, len(calls) - 1
            while i <= last:
                reply = None
                with session.lock:
                    if session.closed:
                        return
                    while i <= last and reply is None:
                        result = execute(calls[i])
                        i += 1
                        if isinstance(result, ChunkSink):
                            if i <= last:
                                raise ProtocolError("a chunked write must end its batch")
                            sink = result
                        elif result is not None:
                            reply = result
                if reply is not None:
                    yield from self._reply_frames(session, reply)
            if session.closed:
                return

    @staticmethod
    def _reply_frames(session: Session, reply: Any) -> Iterator[bytes]:
        """A reply's frames; payload chunks are read from the device under the lock, one by one."""
        frames = reply.frames()
        yield next(frames)                      # the reply record: no device access
        while True:
            with session.lock:
                if session.closed:
                    return
                frame = next(frames, None)
            if frame is None:
                return
            yield frame
