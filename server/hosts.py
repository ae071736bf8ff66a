"""Where a session's calls run, as its gRPC handler sees it: a worker process, or this one.

The handler gives a `SessionHost` the client's frames as they come (`feed`,
on a reader thread of its own) and sends the client what `outgoing` yields,
until the session is over. Two hosts:

- `WorkerHost` (process isolation, the default): the session runs in a worker
  process (`harp.server.worker`); frames are relayed to it unchanged, payload
  chunks through shared memory, replies back.
- `ThreadHost` (thread isolation, development and benchmarks): the session
  runs here, in the reader thread, on a device of this process. It does not
  isolate tenants from each other.

Either way the host counts what passes (bytes, frames), knows whether a
reply is owed (the client's `BATCH_SYNC` frames), and can be ended from
outside (`end`): a lease that is over, an idle session, a stopping server;
`outgoing` then raises `SessionEnded` with the reason, which the handler
hands the client as the session's final error.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

from harp import wire
from harp.errors import DeviceError, HarpError, ProtocolError
from harp.proto.codec import error_from_bytes, error_to_bytes
from harp.protocol import ServerProtocol
from harp.types import DeviceInfo

from . import ipc
from .session import Reply, Session
from .workers import ControlLoop, WorkerProcess, describe_exit

TICK_S = ipc.TICK_S


class SessionEnded(Exception):
    """The session is over; `error` says why (the client gets it as the final error)."""

    def __init__(self, error: HarpError) -> None:
        super().__init__(str(error))
        self.error = error


class SessionHost:
    """What the handler needs of a session, wherever it runs."""

    info: DeviceInfo
    pid: int | None = None
    isolation = ""

    def __init__(self, sid: str) -> None:
        self.id = sid
        self.owed = 0                 # sync replies the client waits for
        self.last_activity = time.monotonic()
        self.ended: HarpError | None = None
        self.bytes_in = self.bytes_out = self.frames_in = self.replies = 0
        self.started = time.time()

    def _count_in(self, frame: bytes) -> None:
        self.frames_in += 1
        self.bytes_in += len(frame)
        self.last_activity = time.monotonic()
        if frame[0] == wire.BATCH_SYNC:
            self.owed += 1

    def feed(self, frame: bytes) -> None:
        raise NotImplementedError

    def client_gone(self) -> None:
        raise NotImplementedError

    def outgoing(self) -> Iterator[bytes]:
        raise NotImplementedError

    def end(self, error: HarpError) -> None:
        raise NotImplementedError

    def dispose(self) -> None:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        return self.owed > 0


# -- in this process -------------------------------------------------------------------

_DONE = ("done", b"", 0)


class ThreadHost(SessionHost):
    """A session on a device of this process (thread isolation)."""

    isolation = "thread"

    def __init__(self, sid: str, device: Any, chunk_size: int) -> None:
        super().__init__(sid)
        self.session = Session(device, sid, chunk_size)
        self.info = device.info
        self.protocol = ServerProtocol()
        self.lock = threading.Lock()
        self._out: queue.Queue = queue.Queue(maxsize=4)
        self._gone = False

    def feed(self, frame: bytes) -> None:
        self._count_in(frame)
        with self.lock:
            session = self.session
            if session.closed:
                return
            try:
                reply = session.handle(self.protocol.receive(frame))
            except ProtocolError as exc:
                self.end(exc)
                return
        if reply is not None:
            self._emit(reply)
        if session.closed and self.ended is None:
            self._put(_DONE)

    def _emit(self, reply: Reply) -> None:
        err = error_to_bytes(reply.error) if reply.error is not None else None
        plan = reply.payload if err is None else None
        self._put(("reply", ServerProtocol.reply(reply.seq, err, reply.result),
                   plan.nbytes if plan is not None else 0))
        if plan is not None:
            chunks = plan.chunks()
            while True:
                with self.lock:
                    if self.session.closed:
                        return
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                self._put(("payload", chunk, 0))

    def _put(self, item: tuple) -> None:
        while not self._gone and self.ended is None:
            try:
                self._out.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def client_gone(self) -> None:
        self._gone = True
        self._close_session()
        try:
            self._out.put_nowait(_DONE)
        except queue.Full:
            pass           # the handler sees `_gone` at its next wait

    def outgoing(self) -> Iterator[bytes]:
        payload_left = 0
        while True:
            try:
                kind, frame, follows = self._out.get(timeout=TICK_S)
            except queue.Empty:
                if self.ended is not None:
                    raise SessionEnded(self.ended)
                if self._gone:
                    return
                if self.owed and not payload_left:
                    yield wire.TICK
                continue
            if kind == "done":
                if self.ended is not None:
                    raise SessionEnded(self.ended)
                return
            if kind == "reply":
                self.owed -= 1
                self.replies += 1
                payload_left = follows
            else:
                payload_left -= len(frame)
            self.bytes_out += len(frame)
            yield frame

    def end(self, error: HarpError) -> None:
        if self.ended is None:
            self.ended = error
        self._close_session()
        try:
            self._out.put_nowait(_DONE)
        except queue.Full:
            pass           # the handler sees `ended` at its next wait

    def _close_session(self) -> None:
        # Not under `lock`: a call running in the reader thread may hold it for long; the
        # device's close cancels its queues, and the call returns.
        self.session.close()

    def dispose(self) -> None:
        self._gone = True
        self._close_session()


# -- in a worker process ---------------------------------------------------------------

class WorkerHost(SessionHost):
    """A session in a worker process of its own (process isolation)."""

    isolation = "process"

    def __init__(self, sid: str, worker: WorkerProcess, control: ControlLoop) -> None:
        super().__init__(sid)
        self.worker = worker
        self.control = control
        self.pid = worker.pid
        self._stopped = False
        self._killer: threading.Timer | None = None

    def open(self, request: dict, device: int, share: float, timeout: float = 60.0) -> None:
        """Open the session's device in the worker (or raise the worker's error)."""
        self.control.add(self.id, self.worker.ctl, device, share)
        self.worker.data.send(ipc.OPEN, ipc.pack(request))
        self.worker.data.sock.settimeout(timeout)
        try:
            kind, body = self.worker.data.recv()
        except OSError:
            kind, body = 0, b""
        finally:
            self.worker.data.sock.settimeout(None)
        if kind == ipc.OPENED:
            self.info = DeviceInfo.from_dict(ipc.unpack(body))
            return
        if kind == ipc.OPEN_FAILED:
            raise error_from_bytes(body)
        raise DeviceError(f"the session's worker process {describe_exit(self.worker.exitcode())}"
                          " while opening the device")

    def feed(self, frame: bytes) -> None:
        self._count_in(frame)
        worker = self.worker
        if frame[0] == wire.PAYLOAD:
            n = len(frame) - 1
            if n <= 0 or n > worker.writes.slot_size:
                self.end(ProtocolError(f"a payload frame of {n} bytes"))
                return
            slot = worker.writes.take()
            if slot is None:
                return                               # the session is over
            worker.writes.slot(slot, n)[:] = memoryview(frame)[1:]
            worker.data.send(ipc.CHUNK, ipc.pack([slot, n]))
        else:
            worker.data.send(ipc.FRAME, frame)

    def client_gone(self) -> None:
        try:
            self.worker.data.send(ipc.CLOSE)
        except OSError:
            pass

    def outgoing(self) -> Iterator[bytes]:
        worker = self.worker
        data, reads = worker.data, worker.reads
        while True:
            try:
                kind, body = data.recv()
            except (OSError, ValueError):
                kind, body = 0, b""
            if kind == ipc.REPLY:
                self.owed -= 1
                self.replies += 1
                self.bytes_out += len(body)
                yield body
            elif kind == ipc.RCHUNK:
                slot, n = ipc.unpack(body)
                chunk = bytes(reads.slot(slot, n))
                data.send(ipc.READ_FREE, ipc.pack(slot))
                self.bytes_out += n
                yield chunk
            elif kind == ipc.WRITE_FREE:
                worker.writes.give_back(ipc.unpack(body))
            elif kind == ipc.TICK:
                if self.owed:
                    yield wire.TICK
            elif kind == ipc.CLOSED:
                if self.ended is not None:
                    raise SessionEnded(self.ended)
                return
            elif kind == ipc.END:
                self.ended = self.ended or error_from_bytes(body)
                raise SessionEnded(self.ended)
            else:                                    # the worker has gone
                worker.writes.close()
                if self.ended is None:
                    self.ended = DeviceError(
                        f"the session's worker process {describe_exit(worker.exitcode())}; "
                        "the session is over (other sessions on the device go on)")
                raise SessionEnded(self.ended)

    def end(self, error: HarpError) -> None:
        """End the session from outside: the worker closes it and exits, or is killed."""
        if self.ended is None:
            self.ended = error
        if self._stopped:
            return
        self._stopped = True
        try:
            self.worker.ctl.send(ipc.STOP)
        except OSError:
            pass
        self._killer = threading.Timer(2.0, self.worker.kill)
        self._killer.daemon = True
        self._killer.start()

    def dispose(self) -> None:
        """Forget the worker: it exits once its session is closed (or is killed if not)."""
        self.control.remove(self.id)
        if not self._stopped and self.worker.alive():
            self.client_gone()
        self.worker.writes.close()
        self.worker.dispose()
