"""Shared memory between a client and its session on the same host: the bulk data window.

When a client reaches its pool server over a unix socket, bulk payload need
not cross a socket at all. The server makes each such session a *window*: a
sealed memfd (its size can never change, so neither side can make the other
fault by truncating it) holding two rings of chunk-sized slots, one per
direction, and two eventfds, one to wake each side. The client gets the three
file descriptors through the server's door (`harp.server.door`), once, with a
one-time ticket from the handshake; control stays on the session's stream.

Both rings are used strictly in order (chunk *i* of a transfer lies in slot
*i* mod `slots`), so a slot's state word is all either side needs:

- write ring, client -> device: the client waits for slot *k* to be `FREE`,
  copies a chunk in, sets its size, marks it `FULL` and wakes the executor;
  the executor hands the chunk to the backend (which has consumed it when it
  returns), marks the slot `FREE` and wakes the client.
- read ring, device -> client: the executor waits for `FREE`, reads a chunk of
  device memory into the slot, sets its size and marks it `FULL` (or `FAILED`:
  no data, the call's reply says why); the client copies it out and frees it.

The window is the client's own memory as much as the server's: a client that
scribbles on it can spoil only its own transfers. Everything the executor
reads from it (a state, a size) is checked, and a wrong one ends the session
with `ProtocolError`. Waits poll their eventfd with a short timeout and ask
`alive()` in between, so a peer that is gone never leaves the other waiting.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
from typing import Callable

import numpy as np

from .errors import ProtocolError, TransportError

#: Slot states.
FREE, FULL, FAILED = 0, 1, 2
#: Bytes before the first slot: the state and size words of every slot.
HEADER = 4096
#: Slot size and count per direction that a server offers by default (4 x 4 MiB).
SLOT_SIZE = 4 << 20
SLOTS = 4
#: Largest window either side accepts (a server's offer beyond it is refused).
MAX_SLOT_SIZE = 64 << 20
MAX_SLOTS = 64
#: Bytes of a door ticket.
TICKET_BYTES = 32
#: Seconds between checks of `alive()` while waiting.
POLL_S = 0.25

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of `size` zero bytes, sealed at that size: whoever else maps it can rely on
    every page staying there (a shrunk file faults its readers with SIGBUS)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def require_sealed(fd: int, size: int, what: str) -> None:
    """Raise `ProtocolError` unless memfd `fd`, made by another process, is sealed at
    `size` bytes: one that could still shrink would let that process crash this one."""
    try:
        sealed = fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS == _SEALS
        actual = os.fstat(fd).st_size
    except OSError as exc:
        raise ProtocolError(f"{what} is not a sealable memory file: {exc}") from None
    if not sealed:
        raise ProtocolError(f"{what} is not sealed at its size")
    if actual != size:
        raise ProtocolError(f"{what} is {actual} bytes, not {size}")


def window_bytes(slot_size: int, slots: int) -> int:
    """The size of a window's memfd: the header and both rings."""
    return HEADER + 2 * slots * slot_size


class SharedWindow:
    """One session's window, as either side maps it (see the module docstring).

    `wake_client` is the eventfd the executor writes to wake the client,
    `wake_executor` the one the client writes; each side waits on its own.
    """

    def __init__(self, fd: int, wake_client: int, wake_executor: int, slot_size: int,
                 slots: int, *, client: bool) -> None:
        if not (0 < slots <= MAX_SLOTS and 0 < slot_size <= MAX_SLOT_SIZE
                and slot_size % 4096 == 0):
            raise ProtocolError(f"a shared-memory window of {slots} slots of {slot_size} bytes "
                                "is out of bounds")
        size = window_bytes(slot_size, slots)
        if os.fstat(fd).st_size != size:
            raise ProtocolError(f"the shared-memory window is {os.fstat(fd).st_size} bytes, "
                                f"not {size}")
        self.fd, self.wake_client, self.wake_executor = fd, wake_client, wake_executor
        self.slot_size, self.slots = slot_size, slots
        self.client = client
        self._map = mmap.mmap(fd, size)
        self._view = memoryview(self._map)
        self._words = self._view[:HEADER].cast("Q")   # [write states | read states | sizes]
        self._wait_fd = wake_client if client else wake_executor
        self._wake_fd = wake_executor if client else wake_client
        self._poll = select.poll()
        self._poll.register(self._wait_fd, select.POLLIN)
        self.write_pos = 0           # next write-ring slot, by chunk count
        self.read_pos = 0            # next read-ring slot
        self.closed = False          # set by either side's owner: waits end at once
        self._released = False

    # -- making and passing --------------------------------------------------------
    @classmethod
    def create(cls, slot_size: int = SLOT_SIZE, slots: int = SLOTS) -> "SharedWindow":
        """A new window (the executor's side), its memfd sealed at its size."""
        fd = sealed_memfd("harp-window", window_bytes(slot_size, slots))
        try:
            wake_client = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            wake_executor = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, wake_client, wake_executor, slot_size, slots, client=False)

    @classmethod
    def attach(cls, fds: list[int], slot_size: int, slots: int, *,
               client: bool) -> "SharedWindow":
        """Map a window received as file descriptors `[memfd, wake_client, wake_executor]`.

        A client checks that the memfd is sealed, so the server cannot shrink it under it."""
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"a shared-memory window is 3 file descriptors, got {len(fds)}")
        try:
            if client:
                require_sealed(fds[0], window_bytes(slot_size, slots), "the shared-memory window")
            for fd in fds[1:]:
                os.set_blocking(fd, False)
            return cls(fds[0], fds[1], fds[2], slot_size, slots, client=client)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def fds(self) -> list[int]:
        return [self.fd, self.wake_client, self.wake_executor]

    # -- slots ---------------------------------------------------------------------
    def _write_slot(self, index: int) -> memoryview:
        start = HEADER + index * self.slot_size
        return self._view[start:start + self.slot_size]

    def _read_slot(self, index: int) -> memoryview:
        start = HEADER + (self.slots + index) * self.slot_size
        return self._view[start:start + self.slot_size]

    def _state(self, word: int) -> int:
        return self._words[word]

    def _set(self, word: int, value: int) -> None:
        self._words[word] = value

    def _size_word(self, index: int) -> int:
        return 2 * self.slots + index             # the write ring's sizes, then the read's

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass                 # the counter is full: the other side has wakes pending

    def _wait(self, ready: Callable[[], bool], alive: Callable[[], bool], what: str) -> None:
        """Wait until `ready()`, asking `alive()` between polls."""
        while not ready():
            if self.closed or not alive():
                raise TransportError(f"{what}: the other side of the shared memory is gone")
            if self._poll.poll(POLL_S * 1000):
                try:
                    os.eventfd_read(self._wait_fd)
                except BlockingIOError:
                    pass

    # -- the client's side ---------------------------------------------------------
    def put(self, chunk: memoryview, alive: Callable[[], bool]) -> None:
        """Client: copy one chunk of a write into the next write slot and hand it over."""
        k = self.write_pos % self.slots
        self._wait(lambda: self._words[k] == FREE, alive, "write")
        n = len(chunk)
        _copy(self._write_slot(k)[:n], chunk)
        self._words[self._size_word(k)] = n
        self._words[k] = FULL
        self.write_pos += 1
        self._wake()

    def take(self, out: memoryview, alive: Callable[[], bool]) -> int:
        """Client: copy the next read chunk into `out`; returns its size, or -1 when the
        executor marked it `FAILED` (the call's reply says why)."""
        k = self.read_pos % self.slots
        word = self.slots + k
        self._wait(lambda: self._words[word] != FREE, alive, "read")
        self.read_pos += 1
        state = self._words[word]
        n = self._words[self._size_word(self.slots + k)] if state == FULL else -1
        if state == FULL:
            if not 0 < n <= min(len(out), self.slot_size):
                raise ProtocolError(f"the server put a read chunk of {n} bytes where at most "
                                    f"{len(out)} were due")
            _copy(out[:n], self._read_slot(k)[:n])
        elif state != FAILED:
            raise ProtocolError(f"read slot {k} is in state {state}")
        self._words[word] = FREE
        self._wake()
        return n

    # -- the executor's side -------------------------------------------------------
    def receive(self, left: int, alive: Callable[[], bool]) -> memoryview:
        """Executor: the next chunk of a write (at most `left` bytes), once the client has
        put it; call `done` when it has been consumed."""
        k = self.write_pos % self.slots
        self._wait(lambda: self._words[k] == FULL, alive, "write")
        n = self._words[self._size_word(k)]
        if not 0 < n <= min(left, self.slot_size):
            raise ProtocolError(f"a shared-memory write chunk of {n} bytes where at most "
                                f"{min(left, self.slot_size)} were due")
        return self._write_slot(k)[:n]

    def done(self) -> None:
        """Executor: the chunk `receive` returned is consumed; its slot is the client's."""
        k = self.write_pos % self.slots
        self.write_pos += 1
        self._words[k] = FREE
        self._wake()

    def produce(self, fill: Callable[[memoryview], int], alive: Callable[[], bool]) -> int:
        """Executor: wait for the next read slot, let `fill` write a chunk into it (it
        returns how many bytes) and hand it to the client."""
        k = self.read_pos % self.slots
        word = self.slots + k
        self._wait(lambda: self._words[word] == FREE, alive, "read")
        n = fill(self._read_slot(k))
        self._words[self._size_word(self.slots + k)] = n
        self._words[word] = FULL
        self.read_pos += 1
        self._wake()
        return n

    def fail(self, alive: Callable[[], bool]) -> None:
        """Executor: the read has failed; the next slot says so (its reply says why)."""
        k = self.read_pos % self.slots
        word = self.slots + k
        self._wait(lambda: self._words[word] == FREE, alive, "read")
        self._words[word] = FAILED
        self.read_pos += 1
        self._wake()

    def close(self) -> None:
        """Unmap and close the descriptors (once)."""
        self.closed = True
        if self._released:
            return
        self._released = True
        try:
            self._words.release()
            self._view.release()
            self._map.close()
        except (BufferError, ValueError):
            pass             # a slot view still in use; the mapping goes with the process
        for fd in (self.fd, self.wake_client, self.wake_executor):
            try:
                os.close(fd)
            except OSError:
                pass


def _copy(dst: memoryview, src: memoryview) -> None:
    """Copy bytes without holding the GIL (numpy releases it for large copies), so the
    other side's copy in another thread of this process runs at the same time."""
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


def close_all(fds: list[int]) -> None:
    """Close file descriptors, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def pick_up(door: str, ticket: bytes, timeout: float = 2.0) -> list[int]:
    """The client's side of a server's door: show `ticket`, get the window's descriptors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(door)
        conn.sendall(ticket)
        msg, fds, _, _ = socket.recv_fds(conn, 1, 8)
        if msg != b"\x01" or not fds:
            close_all(fds)
            raise OSError(f"the door at {door} did not take the session's ticket")
        return fds
