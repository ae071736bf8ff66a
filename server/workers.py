"""The pool server's worker processes: started ahead, handed out one per session.

Workers are forked by a fork server (`forkserver.py`), a clean interpreter
that imported HARP and the served backend before it forked anything and that
never touched a device (CUDA must not be initialised before a fork), so a
worker starts in a few milliseconds and owes nothing to the server's gRPC
threads. `WorkerPool` keeps `warm` of them ready, so connecting does not wait
for one; a worker serves one session and exits, giving all its memory back to
the operating system.

`ControlLoop` is one thread that answers every worker's control channel: memory
reservations against the server's `Ledger`, and compute-share turns from each
device's `DeviceArbiter`.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from typing import Callable

from harp.errors import BackendError, HarpError, ProtocolError
from harp.proto.codec import error_to_bytes
from harp.shm import require_sealed
from harp.tenancy import Ledger

from . import counters, ipc
from .counters import SharedCounts
from .fairshare import DeviceArbiter
from .forkserver import ForkServer

log = logging.getLogger("harp.server")


def describe_exit(exitcode: int | None) -> str:
    """How a worker ended, in words ("was killed by SIGKILL", "exited with status 3")."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        what = "crashed" if -exitcode in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL,
                                          signal.SIGFPE, signal.SIGABRT) else "was killed"
        return f"{what} by {name}"
    return f"exited with status {exitcode}"


class WorkerProcess:
    """The server's end of one worker: its process, channels, payload rings and counts."""

    def __init__(self, forks: ForkServer, data: ipc.Channel, ctl: ipc.Channel,
                 writes: ipc.SlotRing, reads: ipc.SlotRing, pid: int,
                 counts: SharedCounts) -> None:
        self.forks, self.data, self.ctl = forks, data, ctl
        self.writes, self.reads = writes, reads
        self.pid = pid
        #: The session's counts, as the worker last published them (`counters`).
        self.counts = counts

    def alive(self) -> bool:
        return self.forks.exitcode(self.pid) is None

    def exitcode(self, wait: float = 1.0) -> int | None:
        return self.forks.exitcode(self.pid, wait)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def dispose(self) -> None:
        """Close our ends and reap the process (in the background)."""
        for thing in (self.data, self.ctl, self.writes, self.reads, self.counts):
            try:
                thing.close()
            except Exception:
                pass
        threading.Thread(target=self._reap, name="harp-reap-worker", daemon=True).start()

    def _reap(self) -> None:
        if self.exitcode(5.0) is None:
            self.kill()


class WorkerPool:
    """Warm workers for one backend, and the way to get one more."""

    def __init__(self, backend: str, options: dict, *, chunk_size: int, warm: int = 4,
                 wrap: Callable | None = None, preload: list[str] | None = None) -> None:
        self.spec = {"backend": backend, "options": options, "chunk_size": chunk_size,
                     "wrap": wrap}
        self.warm = max(0, warm)
        self.forks = ForkServer(preload or [])
        self._ready: deque[WorkerProcess] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._starting = 0
        self._refill: threading.Thread | None = None
        self._last_take = 0.0
        self.started = 0

    def start(self) -> None:
        self._refill = threading.Thread(target=self._refill_loop, name="harp-warm-workers",
                                        daemon=True)
        self._refill.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            ready, self._ready = list(self._ready), deque()
            self._cond.notify_all()
        for worker in ready:
            worker.kill()
            worker.dispose()
        self.forks.stop()

    def take(self, timeout: float = 30.0) -> WorkerProcess:
        """A ready worker: a warm one, else a new one started now."""
        with self._cond:
            self._last_take = time.monotonic()
            if self._ready:
                worker = self._ready.popleft()
                self._cond.notify_all()          # the refill thread starts a replacement
                if worker.alive():
                    return worker
                worker.dispose()
            self._cond.notify_all()
        return self.spawn(timeout)

    def spawn(self, timeout: float = 30.0) -> WorkerProcess:
        """Start one worker and wait until it is ready."""
        if self._stopping:
            raise BackendError("the pool server is stopping")
        parent_data, child_data = socket.socketpair()
        parent_ctl, child_ctl = socket.socketpair()
        try:
            pid = self.forks.spawn(self.spec, child_data, child_ctl, timeout)
        except OSError as exc:
            parent_data.close()
            parent_ctl.close()
            raise BackendError(f"cannot start a session worker process: {exc}") from None
        finally:
            child_data.close()
            child_ctl.close()
        self.started += 1
        data, ctl = ipc.Channel(parent_data), ipc.Channel(parent_ctl, buffered=False)
        parent_data.settimeout(timeout)
        try:
            kind, _, fds = data.recv_fds(3)
        except OSError:
            kind, fds = 0, []
        finally:
            parent_data.settimeout(None)
        if kind != ipc.READY or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            code = self.forks.exitcode(pid, 1.0)
            if code is None:
                os.kill(pid, signal.SIGKILL)
            data.close()
            ctl.close()
            why = describe_exit(code) if code is not None else "did not start in time"
            raise BackendError(f"a session worker process {why}")
        chunk = self.spec["chunk_size"]
        try:       # a worker that could shrink what we map could crash this process
            for fd, size, what in ((fds[0], chunk * ipc.SLOTS, "its write ring"),
                                   (fds[1], chunk * ipc.SLOTS, "its read ring"),
                                   (fds[2], counters.SIZE, "its counts")):
                require_sealed(fd, size, what)
        except ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            os.kill(pid, signal.SIGKILL)
            data.close()
            ctl.close()
            raise BackendError(f"a session worker process sent unusable shared memory: "
                               f"{exc.message}") from None
        return WorkerProcess(self.forks, data, ctl, ipc.SlotRing(fds[0], chunk),
                             ipc.SlotRing(fds[1], chunk), pid, SharedCounts(fds[2]))

    #: A replacement is started this long after a worker is taken (at once when fewer than
    #: half are left), so its start-up does not compete for the CPU with the session just
    #: opened.
    REFILL_DELAY_S = 0.25

    def _refill_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and len(self._ready) >= self.warm:
                    self._cond.wait()
                if self._stopping:
                    return
                wait = self._last_take + self.REFILL_DELAY_S - time.monotonic()
                if len(self._ready) * 2 >= self.warm and wait > 0:   # half left: not yet
                    self._cond.wait(wait)
                    continue
            try:
                worker = self.spawn()
            except Exception as exc:   # keep trying, slowly: the next session starts its own
                log.warning("could not start a warm session worker: %s", exc)
                time.sleep(1.0)
                continue
            with self._cond:
                if self._stopping:
                    worker.kill()
                    worker.dispose()
                    return
                self._ready.append(worker)

    @property
    def ready(self) -> int:
        return len(self._ready)


class ControlLoop:
    """Answers every worker's control channel, on one thread."""

    def __init__(self, ledger: Ledger, arbiters: dict[int, DeviceArbiter],
                 on_gone: Callable[[str, bytes | None], None] | None = None) -> None:
        self.ledger = ledger
        self.arbiters = arbiters
        #: Called (off this thread) with the session id, and the error record a worker sent
        #: with `FAIL` (else None), when a worker fails or its control channel closes.
        self.on_gone = on_gone
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._members: dict[str, tuple[ipc.Channel, int]] = {}
        self._thread = threading.Thread(target=self._loop, name="harp-control", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def add(self, sid: str, channel: ipc.Channel, device: int, share: float) -> None:
        """Serve a worker's control channel for session `sid` on `device`."""
        arbiter = self.arbiters[device]
        arbiter.join(sid, share, lambda: self._send(channel, ipc.GRANT),
                     lambda: self._send(channel, ipc.REVOKE),
                     lambda: self._send(channel, ipc.CURB))
        with self._lock:
            self._members[sid] = (channel, device)
            # epoll may be changed while another thread waits in it; the loop skips
            # keys that went away between its wait and its look-up.
            self._selector.register(channel.sock, selectors.EVENT_READ, (sid, channel))

    def remove(self, sid: str) -> None:
        """Stop serving session `sid` (before its channel is closed)."""
        with self._lock:
            member = self._members.pop(sid, None)
            if member is not None:
                self._unregister(member[0])
        if member is not None:
            self.arbiters[member[1]].leave(sid)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    @staticmethod
    def _send(channel: ipc.Channel, kind: int, body: bytes = b"") -> None:
        try:
            channel.send(kind, body)
        except OSError:
            pass      # the worker is gone; its session ends through the data channel

    def _loop(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(1.0):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                sid, channel = key.data
                try:
                    kind, body = channel.recv()
                except (OSError, ValueError):
                    kind, body = 0, b""
                if kind == 0:
                    with self._lock:
                        self._unregister(channel)
                        member = self._members.get(sid)
                    if member is not None and self.on_gone is not None:
                        threading.Thread(target=self.on_gone, args=(sid, None), daemon=True,
                                         name="harp-worker-gone").start()
                    continue
                if kind == ipc.FAIL and self.on_gone is not None:
                    threading.Thread(target=self.on_gone, args=(sid, body), daemon=True,
                                     name="harp-worker-failed").start()
                    continue
                try:
                    self._handle(sid, channel, kind, body)
                except Exception:
                    log.exception("control message %d of session %s", kind, sid)

    def _unregister(self, channel: ipc.Channel) -> None:
        try:
            self._selector.unregister(channel.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _handle(self, sid: str, channel: ipc.Channel, kind: int, body: bytes) -> None:
        with self._lock:
            member = self._members.get(sid)
        if member is None:
            return
        device = member[1]
        if kind == ipc.RESERVE:
            rid, nbytes = ipc.unpack(body)
            try:
                self.ledger.reserve(sid, int(nbytes))
                answer = [rid, None, None]
            except HarpError as exc:
                answer = [rid, error_to_bytes(exc), None]
            self._send(channel, ipc.RESULT, ipc.pack(answer))
        elif kind == ipc.RELEASE:
            self.ledger.release(sid, int(ipc.unpack(body)))
        elif kind == ipc.MEMINFO:
            (rid,) = ipc.unpack(body)
            info = self.ledger.mem_info(sid)
            self._send(channel, ipc.RESULT, ipc.pack([rid, None, [info.free, info.total]]))
        elif kind == ipc.REQUEST:
            self.arbiters[device].request(sid)
        elif kind == ipc.YIELD:
            used, again = ipc.unpack(body)
            # Device time is the worker's own measure; a negative one would buy it turns.
            self.arbiters[device].release(sid, max(0, int(used)), bool(again))
        elif kind == ipc.CHARGE:
            used, beside = ipc.unpack(body)
            self.arbiters[device].charge(sid, max(0, int(used)), bool(beside))

