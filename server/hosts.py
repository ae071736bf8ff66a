"""Where a session's calls run, as its gRPC handler sees it: a worker process, or this one.

The handler reads the client's frames itself and gives each to its
`SessionHost`, whose `handle(frame)` yields what the client is to get back
(a sync call's reply, a large read's payload): one thread per session, and no
hand-off between threads on a round trip. Two hosts:

- `WorkerHost` (process isolation, the default): the session runs in a worker
  process (`harp.server.worker`); frames are relayed to it unchanged, payload
  chunks through shared memory, replies back.
- `ThreadHost` (thread isolation, development and benchmarks): the session
  runs here, in the handler's thread, on a device of this process. It does not
  isolate tenants from each other.

Either way the host counts what passes (bytes, frames), reports what the session
did (`counts`: calls, payload bytes, device time, failures by code), knows whether a
call is in progress, and can be ended from outside (`end`: a lease that is over, an
idle session, a stopping server, a worker that died); the handler then raises
`SessionEnded` with the reason, which reaches the client as the session's final
error (see `PoolServer.end_session`).
"""
from __future__ import annotations

import select
import threading
import time
from typing import Any, Callable, Iterator

import msgpack

from harp import wire
from harp.dataframes import FrameChannel, shut
from harp.errors import DeviceError, HarpError, ProtocolError, TransportError
from harp.proto.codec import error_from_bytes, error_to_bytes
from harp.protocol import External, ServerProtocol
from harp.shm import SharedWindow
from harp.types import DeviceInfo

from . import ipc
from .counters import Counts, session_counts
from .fairshare import SessionGate
from .session import Reply, Session
from .turnstile import Turnstile, receive_into
from .workers import ControlLoop, WorkerProcess, describe_exit


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

    def __init__(self, sid: str, turns: Turnstile) -> None:
        self.id = sid
        #: The pool server's turns at decrypting bulk bytes (shared by every session), and
        #: whether this session has been caught waiting on its client with one.
        self.turns = turns
        self._careful = False
        self.busy = False             # a frame is being handled (a call may be long)
        self.last_activity = time.monotonic()
        self.ended: HarpError | None = None
        self.done = False             # the session was closed by its client
        self.bytes_in = self.bytes_out = self.frames_in = self.replies = 0
        self.started = time.time()
        #: The session's data channel (`harp.server.datachannel`), once its client opened it.
        self.data: Any = None
        #: Whether the client's frames come on the data channel (`move_frames_to_data`).
        self.frames_on_data = False
        self._attaching = threading.Lock()     # held while the data channel is handed over

    def attach_data(self, sock: Any, accept: Callable[[], None] | None = None) -> bool:
        """Take the session's data channel (from the data listener); False if it is over.

        `accept` (the listener's yes to the client) runs before the socket becomes the
        session's: once it is, only the session's handler may touch it (two threads on one
        TLS connection corrupt its records)."""
        with self._attaching:
            if self.ended is not None or self.done or self.data is not None:
                return False
            if accept is not None:
                accept()
            self.data = sock
            return True

    def _data_now(self) -> Any:
        """The data channel, or None; an attach in progress is waited out (its yes may
        have reached the client, which then sends on the channel at once)."""
        with self._attaching:
            return self.data

    def move_frames_to_data(self) -> FrameChannel:
        """The client's frames, and the replies to them, travel on the data channel from
        now on (`wire.FRAMES_ON_DATA`); `ProtocolError` if the session has none."""
        sock = self._data_now()
        if self.ended is not None:
            raise SessionEnded(self.ended)
        if sock is None:
            raise ProtocolError("FRAMES_ON_DATA in a session without a data channel")
        self.frames_on_data = True
        return FrameChannel(sock)

    def stop_waiting(self) -> None:
        """Wake the handler if it waits for the client's next frame on the data channel."""
        self._interrupt_data()

    def _require_data(self) -> None:
        if self._data_now() is None:
            raise SessionEnded(ProtocolError("a data frame in a session without a data channel"))

    def _data_broken(self, exc: BaseException) -> SessionEnded:
        if self.ended is None:
            self.ended = TransportError(f"the session's data channel failed: {exc}")
        return SessionEnded(self.ended)

    def _interrupt_data(self) -> None:
        """Wake a transfer blocked on the data channel (the handler closes it later). An
        attach in progress is waited out: one that lands after `ended` was set would
        otherwise leave a channel nobody shuts."""
        with self._attaching:
            sock = self.data
        if sock is not None:
            shut(sock)

    def _close_data(self) -> None:
        sock, self.data = self.data, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _count_in(self, frame: bytes) -> None:
        self.frames_in += 1
        self.bytes_in += len(frame)
        self.last_activity = time.monotonic()

    def handle(self, frame: bytes) -> Iterator[bytes]:
        """Run one client frame; yields the frames the client gets back."""
        raise NotImplementedError

    def counts(self) -> Counts:
        """What the session has done so far (read when asked: a scrape, the session's end)."""
        raise NotImplementedError

    def end(self, error: HarpError) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """The client closed its side of the stream: close the session, and raise
        `SessionEnded` if it had failed meanwhile (an asynchronous protocol error)."""
        if self.ended is not None:
            raise SessionEnded(self.ended)

    def dispose(self) -> None:
        raise NotImplementedError


# -- in this process -------------------------------------------------------------------

class ThreadHost(SessionHost):
    """A session on a device of this process (thread isolation)."""

    isolation = "thread"

    def __init__(self, sid: str, device: Any, chunk_size: int, turns: Turnstile,
                 window: SharedWindow | None = None, gate: SessionGate | None = None) -> None:
        super().__init__(sid, turns)
        self.session = Session(device, sid, chunk_size, window)
        self.gate = gate
        self.info = device.info
        self.protocol = ServerProtocol()
        self.lock = threading.Lock()
        self._staging: memoryview | None = None

    def handle(self, frame: bytes) -> Iterator[bytes]:
        self._count_in(frame)
        session = self.session
        self.busy = True
        try:
            with self.lock:
                if self.ended is not None:
                    raise SessionEnded(self.ended)
                event = self.protocol.receive(frame)
                if type(event) is External:
                    reply = self._receive_data(event.nbytes)
                else:
                    reply = session.handle(event)
            if session.closed:
                self.done = True
        finally:
            self.busy = False
            self.last_activity = time.monotonic()
        if reply is not None:
            yield from self._frames(reply)

    def counts(self) -> Counts:
        return session_counts(self.session, self.gate.device_ns if self.gate is not None else 0)

    def _receive_data(self, nbytes: int) -> Reply | None:
        """The rest of a chunked write, from the data channel, a chunk at a time."""
        self._require_data()
        if self._staging is None:
            self._staging = memoryview(bytearray(self.session.chunk_size))
        reply, left = None, nbytes
        while left:
            view = self._staging[:min(left, len(self._staging))]
            try:
                self._careful = receive_into(self.data, view, self.turns, self._careful)
            except (OSError, ValueError) as exc:
                raise self._data_broken(exc) from None
            self.bytes_in += len(view)
            left -= len(view)
            reply = self.session.handle(self.protocol.receive_payload(view))
        return reply

    def _frames(self, reply: Reply) -> Iterator[bytes]:
        err = error_to_bytes(reply.error) if reply.error is not None else None
        frame = ServerProtocol.reply(reply.seq, err, reply.result)
        self.replies += 1
        self.bytes_out += len(frame)
        yield frame
        plan = reply.payload if err is None else None
        if plan is None:
            return
        chunks = plan.chunks()
        data = self._data_now()
        while True:
            with self.lock:                      # one chunk at a time: a slow reader holds
                if self.ended is not None:       # no more than that
                    raise SessionEnded(self.ended)
                chunk = next(chunks, None)
            if chunk is None:
                return
            self.bytes_out += len(chunk)
            if data is not None:
                try:
                    data.sendall(chunk)
                except (OSError, ValueError) as exc:
                    raise self._data_broken(exc) from None
            else:
                yield chunk

    def end(self, error: HarpError) -> None:
        if self.ended is None:
            self.ended = error
        # Not under `lock`: a call running in the handler may hold it for long; the
        # device's close cancels its queues, and the call returns.
        self.session.close()
        self._interrupt_data()

    def dispose(self) -> None:
        self.session.close()
        self._close_data()
        if self.session.window is not None:
            self.session.window.close()      # the handler is done with it: unmap


# -- in a worker process ---------------------------------------------------------------

class WorkerHost(SessionHost):
    """A session in a worker process of its own (process isolation)."""

    isolation = "process"

    def __init__(self, sid: str, worker: WorkerProcess, control: ControlLoop,
                 turns: Turnstile) -> None:
        super().__init__(sid, turns)
        self.worker = worker
        self.control = control
        self.pid = worker.pid
        self._stopped = False
        #: The seq of the call after which the worker said its device was drained, while no
        #: frame has been relayed since (0: not known to be drained); see `_answer_drained`.
        self._drained = 0
        #: A synchronize answered here that the worker is yet to hear of (0: none).
        self._synced = 0
        #: Calls answered here, which the worker does not count (`_answer_drained`).
        self.answered = 0

    def open(self, request: dict, device: int, share: float, timeout: float = 60.0,
             window: SharedWindow | None = None) -> None:
        """Open the session's device in the worker (or raise the worker's error), handing it
        the session's shared-memory window, if any."""
        self.control.add(self.id, self.worker.ctl, device, share)
        if window is not None:
            request = {**request, "window": [window.slot_size, window.slots]}
            self.worker.data.send_fds(ipc.OPEN, ipc.pack(request), window.fds())
        else:
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

    def handle(self, frame: bytes) -> Iterator[bytes]:
        self._count_in(frame)
        if self.ended is not None:
            raise SessionEnded(self.ended)
        worker = self.worker
        kind = frame[0]
        if self._drained and kind == wire.BATCH_SYNC:
            reply = self._answer_drained(frame)
            if reply is not None:
                yield reply
                return
        self._drained = 0
        try:
            if self._synced:
                seq, self._synced = self._synced, 0
                if kind != wire.PAYLOAD and kind != wire.DATA:
                    worker.data.send_two(ipc.SYNCED, ipc.pack(seq), ipc.FRAME, frame)
                    if kind == wire.BATCH_SYNC:
                        yield from self._sync_replies()
                    return
                worker.data.send(ipc.SYNCED, ipc.pack(seq))
            if kind == wire.DATA:
                self._relay_data(wire.data_frame_size(frame))
                return
            if kind == wire.PAYLOAD:
                n = len(frame) - 1
                if n <= 0 or n > worker.writes.slot_size:
                    raise SessionEnded(ProtocolError(f"a payload frame of {n} bytes"))
                slot = self._free_slot()
                worker.writes.slot(slot, n)[:] = memoryview(frame)[1:]
                worker.data.send(ipc.CHUNK, ipc.pack([slot, n]))
                return
            worker.data.send(ipc.FRAME, frame)
            if kind == wire.BATCH_SYNC:
                yield from self._sync_replies()
        except (OSError, ValueError):
            raise SessionEnded(self._why_gone()) from None

    def _sync_replies(self) -> Iterator[bytes]:
        self.busy = True
        try:
            yield from self._replies()
        finally:
            self.busy = False
            self.last_activity = time.monotonic()

    def _answer_drained(self, frame: bytes) -> bytes | None:
        """The reply to a frame that is only a whole-device synchronize, given here without
        a round trip to the worker, when it may be: the worker's last word was that the call
        it answered drained the device (everything before it done, its errors taken), no
        frame has gone to it since, so nothing can be queued, running or failed there, and it
        has not gone away (the fork server has not reported its exit, and its end of the
        channel has nothing to say: no stray message). Anything else (None) goes to the worker, which checks it in full."""
        try:
            calls = msgpack.unpackb(memoryview(frame)[1:], use_list=True, max_array_len=4,
                                    max_bin_len=0, max_str_len=0, max_map_len=0,
                                    max_ext_len=0)
        except Exception:
            return None
        if type(calls) is not list or len(calls) != 1:
            return None
        call = calls[0]
        if type(call) is not list or len(call) != 3 or call[0] != wire.SYNCHRONIZE \
                or call[2] is not None:
            return None
        seq = call[1]
        if type(seq) is not int or seq <= self._drained or not self.worker.alive() or \
                select.select([self.worker.data.sock], (), (), 0)[0]:
            return None
        self._drained = self._synced = seq
        self.replies += 1
        self.answered += 1
        reply = ServerProtocol.reply(seq, None, None)
        self.bytes_out += len(reply)
        self.last_activity = time.monotonic()
        return reply

    def counts(self) -> Counts:
        """The worker's counts as it last published them, with the calls answered here."""
        return self.worker.counts.read() + Counts(calls=self.answered)

    def _relay_data(self, nbytes: int) -> None:
        """A chunked write's bytes from the data channel straight into the worker's write
        slots (one copy, the decryption's own); the worker checks their count."""
        self._require_data()
        if nbytes <= 0:
            raise SessionEnded(ProtocolError("a data frame announces no bytes"))
        writes, left = self.worker.writes, nbytes
        while left > 0:
            slot = self._free_slot()
            n = min(left, writes.slot_size)
            try:
                self._careful = receive_into(self.data, writes.slot(slot, n), self.turns,
                                             self._careful)
            except (OSError, ValueError) as exc:
                writes.give_back(slot)
                raise self._data_broken(exc) from None
            self.worker.data.send(ipc.CHUNK, ipc.pack([slot, n]))
            self.bytes_in += n
            left -= n

    def _replies(self) -> Iterator[bytes]:
        """The worker's answer to a sync call: its reply, and a large read's payload."""
        data, reads = self.worker.data, self.worker.reads
        channel = None
        while True:
            kind, body = self._next(data)
            if kind == ipc.REPLY_DRAINED:
                self._drained = msgpack.unpackb(body)[0]
                kind = ipc.REPLY
            if kind == ipc.REPLY:
                self.replies += 1
                self.bytes_out += len(body)
                yield body
                return
            if kind == ipc.REPLY_MORE:               # a read whose payload follows
                self.replies += 1
                self.bytes_out += len(body)
                channel = self._data_now()
                yield body
            elif kind == ipc.RCHUNK or kind == ipc.RCHUNK_LAST:
                slot, n = ipc.unpack(body)
                self.bytes_out += n
                if channel is not None:             # from the slot to the socket, no copy
                    try:
                        channel.sendall(reads.slot(slot, n))
                    except (OSError, ValueError) as exc:
                        raise self._data_broken(exc) from None
                    finally:
                        data.send(ipc.READ_FREE, ipc.pack(slot))
                else:
                    chunk = bytes(reads.slot(slot, n))
                    data.send(ipc.READ_FREE, ipc.pack(slot))
                    yield chunk
                if kind == ipc.RCHUNK_LAST:
                    return
            elif kind == ipc.CLOSED:
                self.done = True
                return

    def _free_slot(self) -> int:
        """A write slot; while all are with the worker, take its word that one is free."""
        writes = self.worker.writes
        slot = writes.take_now()
        while slot is None:
            kind, _ = self._next(self.worker.data, frees=True)
            slot = writes.take_now()
            if kind == ipc.CLOSED:
                raise SessionEnded(self._why_gone())
        return slot

    def _next(self, data: ipc.Channel, frees: bool = False) -> tuple[int, bytes]:
        """The worker's next message of interest; a freed write slot is taken in passing
        (and is of interest itself with `frees`)."""
        while True:
            kind, body = data.recv()
            if kind == ipc.WRITE_FREE:
                self.worker.writes.give_back(ipc.unpack(body))
                if frees:
                    return kind, body
                continue
            if kind == ipc.END:
                self.ended = self.ended or error_from_bytes(body)
                raise SessionEnded(self.ended)
            if kind == 0:
                raise SessionEnded(self._why_gone())
            return kind, body

    def _why_gone(self) -> HarpError:
        if self.ended is None:
            self.ended = DeviceError(
                f"the session's worker process {describe_exit(self.worker.exitcode())}; "
                "the session is over (other sessions on the device go on)")
        return self.ended

    def finish(self) -> None:
        """Close the session and take the worker's last word: `CLOSED`, or `END` with the
        error of a frame it was relayed without a reply (a malformed batch)."""
        if self.ended is None and not self._stopped:
            try:
                self.worker.data.send(ipc.CLOSE)
                self.worker.data.sock.settimeout(2.0)
                try:
                    while True:
                        kind, body = self._next(self.worker.data)
                        if kind == ipc.CLOSED:
                            break
                finally:
                    self.worker.data.sock.settimeout(None)
            except SessionEnded:
                raise
            except (OSError, ValueError):
                pass
        super().finish()

    def end(self, error: HarpError) -> None:
        """End the session from outside: the worker closes it and exits, or is killed."""
        if self.ended is None:
            self.ended = error
        if self._stopped:
            return
        self._stopped = True
        self._interrupt_data()
        try:
            self.worker.ctl.send(ipc.STOP)
        except OSError:
            pass
        killer = threading.Timer(2.0, self.worker.kill)
        killer.daemon = True
        killer.start()

    def dispose(self) -> None:
        """Forget the worker: it exits once its session is closed (or is killed if not)."""
        self._stopped = True                 # from now on `end` has nothing to stop
        self._close_data()
        self.control.remove(self.id)
        if self.ended is None and self.worker.alive():
            try:
                self.worker.data.send(ipc.CLOSE)
            except OSError:
                pass
        self.worker.writes.close()
        self.worker.dispose()
