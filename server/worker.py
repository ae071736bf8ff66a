"""A session's worker process: its backend device, its calls, nothing of anyone else's.

The pool server keeps gRPC, mutual TLS, admission and the relay; each session
runs here, in a process of its own (a CUDA context of its own on a GPU), so
a session's memory, its faults and whatever a kernel does to the process end
with it. The server starts workers ahead (`WorkerPool`, from a fork server
that has imported the backend but touched no device), hands one a session
with an `OPEN` message, relays the client's frames to it unchanged
(`harp.server.ipc`), and relays its replies back.

In the worker, `Session` runs the calls on the backend device opened with a
`Tenancy` whose memory broker and compute gate are the server's ledger and
arbiter, reached over the control channel: the worker holds no quota of its
own, so a worker that dies or lies cannot take more than its lease allows.

The worker works in an empty directory of its own, ignores SIGINT (Ctrl-C
reaches the whole process group; the server ends its sessions itself) and
exits when the server's end of either channel closes.
"""
from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from typing import Any

from harp import wire
from harp.errors import HarpError, InternalError, ProtocolError
from harp.proto.codec import error_from_bytes, error_to_bytes
from harp.protocol import ServerProtocol
from harp.shm import SharedWindow
from harp.tenancy import MemoryBroker, Tenancy
from harp.types import MemInfo

from . import ipc
from .counters import SharedCounts
from .fairshare import GateLink, SessionGate
from .session import Reply, Session

log = logging.getLogger("harp.server.worker")


def main(data_sock: socket.socket, ctl_sock: socket.socket, spec: dict) -> None:
    """The worker process's entry point (run by `multiprocessing` in a forked child)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    home = tempfile.mkdtemp(prefix="harp-worker-")
    os.chdir(home)
    code = 0
    try:
        Worker(data_sock, ctl_sock, spec).run()
    except BaseException:              # a bug: the server tells the client, we just go
        log.exception("worker failed")
        code = 70
    finally:
        # The session is over and its client has its answer: what is left (the directory,
        # the process's teardown) must not take the server's core from the next session.
        try:
            os.nice(19)
        except OSError:
            pass
        shutil.rmtree(home, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent goes (Linux)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)        # PR_SET_PDEATHSIG
    except Exception:
        pass


class Worker:
    """One worker: ready, then one session, then gone."""

    def __init__(self, data_sock: socket.socket, ctl_sock: socket.socket, spec: dict) -> None:
        self.data = ipc.Channel(data_sock)
        self.ctl = ipc.Channel(ctl_sock, buffered=False)
        self.spec = spec
        chunk = spec.get("chunk_size", wire.CHUNK_SIZE)
        self.writes = ipc.SlotRing.create("harp-write", chunk,   # server fills, we drain
                                          prefault=True)
        self.reads = ipc.SlotRing.create("harp-read", chunk)     # we fill, server drains
        self.counts = SharedCounts.create()                      # we write, server reads
        self.session: Session | None = None
        self.protocol = ServerProtocol()
        self.gate: SessionGate | None = None
        self.broker = _Broker(self.ctl)

    def run(self) -> None:
        self.data.send_fds(ipc.READY, ipc.pack({"pid": os.getpid()}),
                           [self.writes.fd, self.reads.fd, self.counts.fd])
        from harp.backends import load_backend
        backend = load_backend(self.spec["backend"], **self.spec.get("options", {}))
        # started while warm, so that opening a session costs only the open
        threading.Thread(target=self._control_loop, name="harp-worker-control",
                         daemon=True).start()
        if getattr(backend, "rehearse", False) and self.spec.get("wrap") is None:
            _rehearse(backend, self.writes.slot_size)
        kind, body, fds = self.data.recv_fds(3)     # a warm worker waits here
        if kind != ipc.OPEN:
            return
        self._open(backend, ipc.unpack(body), fds)
        if self.session is not None:
            self._serve()

    # -- opening -------------------------------------------------------------------
    def _open(self, backend: Any, request: dict, fds: list[int]) -> None:
        sid = request["session"]
        window = None
        try:
            if fds:                                  # the session's shared-memory window
                slot_size, slots = request["window"]
                window = SharedWindow.attach(fds, slot_size, slots, client=False)
            gate = None
            if request.get("gated", True):
                gate = self.gate = SessionGate(_GateLink(self.ctl), own_process=True)
            device = backend.open(request["device"], memory_quota=request.get("quota"),
                                  trust_client_code=bool(request.get("trust")),
                                  tenancy=Tenancy(self.broker, gate))
            wrap = self.spec.get("wrap")
            if wrap is not None:
                device = wrap(device, sid)
        except HarpError as exc:
            self.data.send(ipc.OPEN_FAILED, error_to_bytes(exc))
            return
        except Exception as exc:
            self.data.send(ipc.OPEN_FAILED, error_to_bytes(InternalError(
                f"the session's worker could not open the device: {type(exc).__name__}: {exc}")))
            return
        self.session = Session(device, sid, self.writes.slot_size, window)
        gc.freeze()         # the session's long-lived objects: out of the collector's passes
        self.data.send(ipc.OPENED, ipc.pack(device.info.to_dict()))

    # -- the session ---------------------------------------------------------------
    def _serve(self) -> None:
        session, protocol, data = self.session, self.protocol, self.data
        assert session is not None
        # A device wrapped (a trace recorder) must see every call: no syncs answered without it.
        drains = self.spec.get("wrap") is None
        try:
            while True:
                kind, body = data.recv()
                if kind == ipc.FRAME:
                    reply = session.handle(protocol.receive(body))
                    self._publish()                     # before the client hears of it
                    if reply is not None and reply.error is None and reply.payload is None \
                            and drains and session.drained():
                        data.send(ipc.REPLY_DRAINED, ServerProtocol.reply(reply.seq, None,
                                                                         reply.result))
                        continue
                elif kind == ipc.CHUNK:
                    slot, n = ipc.unpack(body)
                    try:
                        reply = session.handle(protocol.receive_payload(self.writes.slot(slot, n)))
                    finally:
                        data.send(ipc.WRITE_FREE, ipc.pack(slot))
                elif kind == ipc.READ_FREE:
                    self.reads.give_back(ipc.unpack(body))
                    continue
                elif kind == ipc.SYNCED:
                    session.synchronized_elsewhere(ipc.unpack(body))
                    continue
                elif kind == ipc.CLOSE:             # the client went away
                    session.close()
                    self._publish()
                    data.send(ipc.CLOSED)
                    return
                else:                               # the server has gone
                    return
                if reply is not None:
                    self._send_reply(reply)
                if session.closed:
                    self._publish()
                    data.send(ipc.CLOSED)
                    return
        except ProtocolError as exc:
            record = error_to_bytes(exc)
            self.ctl.send(ipc.FAIL, record)           # heard at once, if the server waits
            data.send(ipc.END, record)                # for the client's next frame; or here
        except (BrokenPipeError, ConnectionError, OSError):
            pass
        finally:
            session.close()

    def _publish(self) -> None:
        """The session's counts, where the server reads them (`counters.SharedCounts`)."""
        gate = self.gate
        self.counts.publish(self.session, gate.device_ns if gate is not None else 0)

    def _send_reply(self, reply: Reply) -> None:
        """`REPLY`, or `REPLY_MORE` and a large read's payload chunk by chunk (the last one
        `RCHUNK_LAST`), through the read slots."""
        err = error_to_bytes(reply.error) if reply.error is not None else None
        plan = reply.payload if err is None else None
        frame = ServerProtocol.reply(reply.seq, err, reply.result)
        if plan is None:
            self.data.send(ipc.REPLY, frame)
            return
        self.data.send(ipc.REPLY_MORE, frame)
        first, plan.first = plan.first, b""
        pos = self._send_chunk(lambda out: _copy_into(out, first), len(first) >= plan.nbytes)
        while pos < plan.nbytes:
            start = pos
            pos += self._send_chunk(lambda out: plan.read_into(start, out),
                                    min(self.reads.slot_size, plan.nbytes - pos) >=
                                    plan.nbytes - pos)

    def _send_chunk(self, fill: Any, last: bool) -> int:
        slot = self.reads.take_now()
        while slot is None:                         # every slot is with the server: wait
            kind, body = self.data.recv()
            if kind == ipc.READ_FREE:
                self.reads.give_back(ipc.unpack(body))
                slot = self.reads.take_now()
            elif kind in (0, ipc.CLOSE):
                raise ConnectionError("the server ended the session during a read")
            else:
                raise ProtocolError("the client sent a frame during a read's payload")
        n = fill(self.reads.slot(slot))
        self.data.send(ipc.RCHUNK_LAST if last else ipc.RCHUNK, ipc.pack([slot, n]))
        return n

    # -- the control channel -------------------------------------------------------
    def _control_loop(self) -> None:
        ctl = self.ctl
        while True:
            try:
                kind, body = ctl.recv()
            except OSError:                  # reset by a server that went: as if closed
                kind, body = 0, b""
            if kind == ipc.RESULT:
                self.broker.answer(ipc.unpack(body))
            elif kind == ipc.GRANT and self.gate is not None:
                self.gate.granted()
            elif kind == ipc.REVOKE and self.gate is not None:
                self.gate.revoked()
            elif kind == ipc.CURB and self.gate is not None:
                self.gate.curb()
            elif kind in (0, ipc.STOP):
                # The server ends the session (a lease that is over), or has gone: close
                # what we can (a trace is flushed) and leave at once.
                if self.session is not None:
                    try:
                        self.session.close()
                        self._publish()
                    except Exception:
                        pass
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)


def _rehearse(backend: Any, slot_size: int) -> None:
    """A throwaway session while warm: open device 0 on an account of the backend's own,
    answer a synchronize, close. The real session's open, first call and reply then run
    on pages this process has already touched (in a fork, a first touch is a
    copy-on-write fault): the open then costs about a fifth of the CPU time it costs cold
    (`benchmarks/worker_open.py`). Nothing of it is left, and it reaches no one: its
    memory account is its own (and it runs no kernel, so it needs no compute gate), and
    the session it will serve is unknown yet."""
    try:
        device = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 0, None)))
        session = Session(device, "rehearsal", slot_size)
        try:
            ipc.pack(device.info.to_dict())
            reply = session.handle(ServerProtocol().receive(
                wire.batch_frame([[wire.SYNCHRONIZE, 1, None]], True)))
            if reply is not None:
                session.drained()
                ServerProtocol.reply(reply.seq, None, reply.result)
        finally:
            session.close()
    except Exception as exc:           # only a lost head start: the real open will tell
        log.debug("the warm worker's rehearsal failed: %s", exc)


def _copy_into(out: memoryview, data: bytes) -> int:
    out[:len(data)] = data
    return len(data)


class _Broker(MemoryBroker):
    """The session's memory account, kept by the server (one request per reservation)."""

    def __init__(self, ctl: ipc.Channel) -> None:
        self.ctl = ctl
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, list] = {}

    def _ask(self, kind: int, args: list) -> Any:
        rid = next(self._ids)
        slot: list = [threading.Event(), None]
        with self._lock:
            self._waiting[rid] = slot
        self.ctl.send(kind, ipc.pack([rid, *args]))
        if not slot[0].wait(60):
            raise InternalError("the pool server did not answer a memory request")
        error, value = slot[1]
        if error is not None:
            raise error_from_bytes(error)
        return value

    def answer(self, message: list) -> None:
        rid, error, value = message
        with self._lock:
            slot = self._waiting.pop(rid, None)
        if slot is not None:
            slot[1] = (error, value)
            slot[0].set()

    def reserve(self, nbytes: int) -> None:
        if nbytes:
            self._ask(ipc.RESERVE, [nbytes])

    def release(self, nbytes: int) -> None:
        if nbytes:
            self.ctl.send(ipc.RELEASE, ipc.pack(nbytes))

    def mem_info(self) -> MemInfo:
        free, total = self._ask(ipc.MEMINFO, [])
        return MemInfo(free=free, total=total)


class _GateLink(GateLink):
    def __init__(self, ctl: ipc.Channel) -> None:
        self.ctl = ctl

    def request(self) -> None:
        self.ctl.send(ipc.REQUEST)

    def release(self, used_ns: int, again: bool) -> None:
        self.ctl.send(ipc.YIELD, ipc.pack([used_ns, again]))

    def charge(self, used_ns: int, beside: bool) -> None:
        self.ctl.send(ipc.CHARGE, ipc.pack([used_ns, beside]))

    def leave(self) -> None:
        pass      # the server sees the session end

