"""Messages between the pool server process and a session's worker process.

Two unix socket pairs join a worker to the server: the *data* channel carries
the session's frames, unchanged (a client's batch frame is relayed as it came,
a reply frame goes back as the client will get it: `REPLY` when it is all,
`REPLY_MORE` when a read's payload follows, chunk by chunk, the last one
`RCHUNK_LAST`; `REPLY_DRAINED` when the call drained the device, see
`harp.server.hosts.WorkerHost`), and notes about payload chunks that lie in shared memory
(`SlotRing`); the *control* channel carries
the worker's memory reservations and compute-share turns, and the server's
order to end the session. Each message is a 5-byte header (body length, kind)
and a body; bodies of control messages are msgpack.

Payload bytes never cross a socket: each direction has a ring of chunk-sized
slots in a memfd that both processes map, so a 256 MiB write costs the server
one copy per chunk (out of gRPC's bytes into the slot), as it would cost it
to hand the bytes to a backend in its own process.
"""
from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
from typing import Any

import msgpack

from harp.shm import sealed_memfd

HEADER = struct.Struct("<IB")

# data channel, server -> worker
OPEN, FRAME, CHUNK, READ_FREE, CLOSE, SYNCED = 1, 2, 3, 4, 5, 6
# data channel, worker -> server
READY, OPENED, OPEN_FAILED, REPLY, REPLY_MORE, RCHUNK, RCHUNK_LAST, WRITE_FREE, END, CLOSED = \
    10, 11, 12, 13, 14, 15, 16, 17, 18, 19
REPLY_DRAINED = 20
# control channel, worker -> server
RESERVE, RELEASE, MEMINFO, REQUEST, YIELD, CHARGE, FAIL = 30, 31, 32, 33, 34, 35, 36
# control channel, server -> worker
RESULT, GRANT, REVOKE, STOP, CURB = 40, 41, 42, 43, 44

#: Slots per direction and ring.
SLOTS = 4

pack = msgpack.Packer(use_bin_type=True).pack


def unpack(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False)


class Channel:
    """One end of a socket that carries framed messages; `send` may be called from any
    thread, `recv` from one. A channel read after `select` must be unbuffered
    (`buffered=False`), or messages read ahead would wait unseen in the buffer."""

    def __init__(self, sock: socket.socket, buffered: bool = True) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._reader = sock.makefile("rb", buffering=1 << 16) if buffered else None

    def send(self, kind: int, body: Any = b"") -> None:
        header = HEADER.pack(len(body), kind)
        with self._send_lock:
            if len(body) <= 4096:
                self.sock.sendall(header + body)
            else:
                _sendall_parts(self.sock, [header, body])

    def send_two(self, kind: int, body: bytes, kind2: int, body2: bytes) -> None:
        """Two messages in one system call."""
        parts = [HEADER.pack(len(body), kind), body, HEADER.pack(len(body2), kind2), body2]
        with self._send_lock:
            if len(body) + len(body2) <= 4096:
                self.sock.sendall(b"".join(parts))
            else:
                _sendall_parts(self.sock, parts)

    def send_fds(self, kind: int, body: bytes, fds: list[int]) -> None:
        with self._send_lock:
            socket.send_fds(self.sock, [HEADER.pack(len(body), kind) + body], fds)

    def recv(self) -> tuple[int, bytes]:
        """The next message; `(0, b"")` when the other side has gone."""
        read = self._reader.read if self._reader is not None else self._read_exact
        header = read(HEADER.size)
        if len(header) < HEADER.size:
            return 0, b""
        size, kind = HEADER.unpack(header)
        body = read(size) if size else b""
        if len(body) < size:
            return 0, b""
        return kind, body

    def _read_exact(self, n: int) -> bytes:
        data = self.sock.recv(n, socket.MSG_WAITALL)
        while 0 < len(data) < n:
            more = self.sock.recv(n - len(data), socket.MSG_WAITALL)
            if not more:
                break
            data += more
        return data

    def recv_fds(self, nfds: int) -> tuple[int, bytes, list[int]]:
        """A message sent with `send_fds` (call before any `recv`: no read-ahead yet)."""
        header, fds, _, _ = socket.recv_fds(self.sock, HEADER.size, nfds)
        if 0 < len(header) < HEADER.size:
            header += self._read_exact(HEADER.size - len(header))
        if len(header) < HEADER.size:
            return 0, b"", fds
        size, kind = HEADER.unpack(header)
        body = self._read_exact(size) if size else b""
        if len(body) < size:
            return 0, b"", fds
        return kind, body, fds

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not None:
            self._reader.close()
        self.sock.close()


def _sendall_parts(sock: socket.socket, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


class SlotRing:
    """Chunk-sized slots of shared memory, for one direction of payload.

    The producer takes a free slot (waiting while all are in use), fills it and names
    it in a message; the consumer copies it out and gives it back with another."""

    def __init__(self, fd: int, slot_size: int, slots: int = SLOTS) -> None:
        self.fd = fd
        self.slot_size = slot_size
        self.slots = slots
        self.map = mmap.mmap(fd, slot_size * slots)
        self.view = memoryview(self.map)
        self._free = list(range(slots))
        self._cond = threading.Condition()
        self._closed = False

    @classmethod
    def create(cls, name: str, slot_size: int, slots: int = SLOTS, *,
               prefault: bool = False) -> "SlotRing":
        """A new ring (the server maps it too); with `prefault`, its pages made now.

        A memfd's page is allocated and zeroed by the first write to it, in whichever
        process writes it. For a worker's write ring that would be the pool server's
        relay, the one process every session shares: with 64 new sessions writing 1 MiB
        chunks, zeroing their rings' pages was 28% of the relay's CPU (`perf`). The
        worker that creates it, while warm, writes every page once instead (fallocate
        would not do: shmem still zeroes a page at its first fault). Its read ring it
        writes first itself."""
        ring = cls(sealed_memfd(name, slot_size * slots), slot_size, slots)
        if prefault:
            for page in range(0, slot_size * slots, mmap.PAGESIZE):
                ring.map[page] = 0
        return ring

    def slot(self, index: int, nbytes: int | None = None) -> memoryview:
        start = index * self.slot_size
        return self.view[start:start + (self.slot_size if nbytes is None else nbytes)]

    def take(self, timeout: float | None = None) -> int | None:
        """A free slot's index, or None when closed (or after `timeout`)."""
        with self._cond:
            while not self._free and not self._closed:
                if not self._cond.wait(timeout):
                    return None
            return None if self._closed else self._free.pop()

    def take_now(self) -> int | None:
        with self._cond:
            return self._free.pop() if self._free else None

    def give_back(self, index: int) -> None:
        with self._cond:
            if 0 <= index < self.slots and index not in self._free:
                self._free.append(index)
                self._cond.notify()

    def close(self) -> None:
        """Stop handing out slots and let go of the memory (once: closing a file descriptor
        twice could close a number the process has since given to another file)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            self.view.release()
            self.map.close()
        except (BufferError, ValueError):
            pass      # a slot view still in use elsewhere; the mapping goes with the process
        try:
            os.close(fd)
        except OSError:
            pass
