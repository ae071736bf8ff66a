"""A fork server for session workers: a clean, single-threaded process that forks them.

A pool server runs gRPC threads, and CUDA cannot be used in a process forked
from one that initialised it, so workers are not forked from the server. The
server starts this small process once (`python -m harp.server.forkserver`),
which imports HARP and the served backend's modules and nothing else happens
in it: no threads, no device. Each request (a pickled spec and the worker's
two socket ends, passed as file descriptors) is answered with a fork; the
child becomes the worker (`harp.server.worker.main`), the fork server tells
the pool server its pid, and later how it exited, so a client can be told
"the worker was killed by SIGKILL". The fork server exits when the pool
server's end of its socket closes, and its workers die with it (each asks the
kernel for SIGKILL when its parent goes).

Written for this purpose rather than with `multiprocessing`'s fork server,
which re-imports the parent's main module in every child and brings a
resource tracker of its own.
"""
from __future__ import annotations

import gc
import importlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

_HEADER = struct.Struct("<I")
# messages from the fork server
SPAWNED, EXITED = 1, 2


def _send(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    body = pickle.dumps(obj)
    data = _HEADER.pack(len(body)) + body
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def main() -> None:
    """The fork server process: `python -m harp.server.forkserver FD MODULE...`."""
    fd = int(sys.argv[1])
    for module in sys.argv[2:]:
        try:
            importlib.import_module(module)
        except Exception as exc:        # a preload is only an optimisation
            print(f"harp fork server: could not preload {module}: {exc}", file=sys.stderr)
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What is imported by now lives as long as every worker: keep it out of the cyclic
    # collector's passes (and its pages shared with the children, untouched by it).
    gc.collect()
    gc.freeze()
    children: set[int] = set()
    buffer = b""
    pending_fds: list[int] = []
    while True:
        ready, _, _ = select.select([sock], [], [], 0.2)
        _reap(sock, children)
        if not ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            return                                      # the pool server has gone
        buffer += data
        pending_fds += fds
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if len(buffer) < _HEADER.size + size:
                break
            request = pickle.loads(buffer[_HEADER.size:_HEADER.size + size])
            buffer = buffer[_HEADER.size + size:]
            fds_now, pending_fds = pending_fds[:2], pending_fds[2:]
            pid = os.fork()
            if pid == 0:                                # the child: a worker
                try:
                    sock.close()
                    for f in pending_fds:                # other workers' ends: not ours
                        os.close(f)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    from . import worker
                    worker.main(socket.socket(fileno=fds_now[0]),
                                socket.socket(fileno=fds_now[1]), request["spec"])
                finally:
                    os._exit(70)
            for f in fds_now:
                os.close(f)
            children.add(pid)
            try:
                _send(sock, (SPAWNED, request["id"], pid))
            except OSError:
                return                                  # the pool server has gone


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            _send(sock, (EXITED, pid, code))
        except OSError:
            return


class ForkServer:
    """The pool server's handle on its fork server."""

    def __init__(self, preload: list[str]) -> None:
        parent, child = socket.socketpair()
        modules = ["harp.server.worker", *preload]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harp.server.forkserver", str(child.fileno()), *modules],
            pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
            start_new_session=False)
        child.close()
        self._sock = parent
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._next = 0
        self._pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, name="harp-forkserver", daemon=True)
        self._reader.start()

    def spawn(self, spec: dict, data: socket.socket, ctl: socket.socket,
              timeout: float = 30.0) -> int:
        """Fork a worker with these socket ends; returns its pid."""
        with self._lock:
            self._next += 1
            rid = self._next
            _send(self._sock, {"id": rid, "spec": spec}, [data.fileno(), ctl.fileno()])
        with self._cond:
            if not self._cond.wait_for(lambda: rid in self._pids or self.process.poll() is not None,
                                       timeout):
                raise OSError("the fork server did not answer")
            if rid not in self._pids:
                raise OSError(f"the fork server exited with status {self.process.returncode}")
            return self._pids.pop(rid)

    def exitcode(self, pid: int, wait: float = 0.0) -> int | None:
        """How worker `pid` exited (negative: the signal that killed it), or None if alive."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self.exits, wait)
            return self.exits.get(pid)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += data
            while len(buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer)
                if len(buffer) < _HEADER.size + size:
                    break
                message = pickle.loads(buffer[_HEADER.size:_HEADER.size + size])
                buffer = buffer[_HEADER.size + size:]
                with self._cond:
                    if message[0] == SPAWNED:
                        self._pids[message[1]] = message[2]
                    else:
                        self.exits[message[1]] = message[2]
                        if len(self.exits) > 4096:          # forget the oldest
                            for old in list(self.exits)[:1024]:
                                del self.exits[old]
                    self._cond.notify_all()

    def stop(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    main()
