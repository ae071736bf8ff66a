"""Bulk writes take turns: a permit per core the pool server runs on, given in arrival order.

Every session's handler thread decrypts its own data channel (`datachannel`), and
a write's bytes cost the pool server far more CPU than anything else it does
(about 0.7 ms per MiB on the development VM: the TLS cipher and the kernel's
copy). With more sessions writing than cores, which thread decrypted next was
left to the GIL and the OS scheduler, and neither is fair: in some runs of 64
sessions writing flat out on one core, the least served session got 0.72-0.79 of
the bytes of the most served (in others 0.93-0.98, on the same code). Here a
write's records (`receive_into`) are decrypted under a permit of the server's
`Turnstile`; a permit given back goes straight to the longest waiting thread, so
sessions take turns (0.93 in every run; `benchmarks/bench.py --sections sessions`).
A holder goes to the back of the line after `TURN_S` while others wait.

A client cannot hold the others up for long. A holder that waits on its client
while others wait (a write stopped halfway, bytes trickled a few at a time) loses
its permit to the first in line after `STALL_S`, and goes on without one; its
session is careful from then on: it takes a permit only once its client has sent
a whole record, and gives it back when the next one is not there while others
wait. A large read's payload is sent without a permit: a sender cannot tell,
without blocking, whether its client will take the next piece.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import os
import select
import socket
import struct
import termios
import threading
import time
from typing import Any

#: How long a thread may keep a permit while others wait, in seconds (a 1 MiB slot
#: takes about a millisecond to decrypt).
TURN_S = 0.002
#: A TLS record's most plaintext, and the least a record adds on the wire (header and
#: inner content type; the AEAD tag adds 8-16 more).
RECORD, RECORD_OVERHEAD = 16 * 1024, 6
#: A permit held this long, in seconds, while others wait, is taken from its holder and
#: given to the first in line (its holder is stalled on its client, or descheduled).
STALL_S = 0.010


def default_permits() -> int:
    """The cores this process may run on: as many receives at once as can make progress."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Waiter:
    __slots__ = ("wake", "grant", "first_since")

    def __init__(self, first: bool) -> None:
        self.wake = threading.Semaphore(0)  # released with a grant, or when it comes first
        self.grant = 0
        #: When it came first in line (0.0: not yet), from when on it watches the holders.
        self.first_since = time.monotonic() if first else 0.0


class Turnstile:
    """`permits` holders at a time; the others wait in line and are served in order.

    `enter` returns a grant, which `leave` takes back. `leave` hands the permit to the
    first in line directly (it is never free for a thread that did not wait to take
    first), so a thread that leaves and enters again goes to the back of the line. The
    first in line watches the holders: a grant held for `stall_s`, all of it while this
    thread was first, is revoked, the permit is its, and the revoked holder's `leave`
    does nothing. The rest of the line sleeps until its turn comes.
    """

    def __init__(self, permits: int | None = None, stall_s: float = STALL_S) -> None:
        self.permits = default_permits() if permits is None else permits
        if self.permits < 1:
            raise ValueError(f"a turnstile needs at least one permit, not {self.permits}")
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._free = self.permits
        self._grants = itertools.count(1)
        #: The grants held now, and when each was given.
        self._held: dict[int, float] = {}
        #: The waiting threads, first in line first.
        self.line: collections.deque[_Waiter] = collections.deque()
        #: Permits given to a waiting thread, and grants revoked (figures for tests).
        self.handoffs = self.revoked = 0

    def enter(self) -> int:
        """A grant: a permit, taken at once or after waiting in line."""
        with self._lock:
            if self._free and not self.line:
                self._free -= 1
                return self._give()
            waiter = _Waiter(first=not self.line)
            self.line.append(waiter)
        while True:
            with self._lock:
                if waiter.grant:
                    return waiter.grant
                timeout = None
                if waiter.first_since and self._held:
                    # stalled: held stall_s, all of it while this thread was first in line
                    oldest = min(self._held, key=self._held.__getitem__)
                    due = max(self._held[oldest], waiter.first_since) + self.stall_s
                    now = time.monotonic()
                    if now >= due:
                        del self._held[oldest]
                        self.revoked += 1
                        self._admit()
                        return waiter.grant
                    timeout = max(due - now, 0.0005)
            waiter.wake.acquire(timeout=timeout)

    def leave(self, grant: int) -> bool:
        """Give `grant`'s permit back, to the first in line if any; False if the grant
        was revoked (its permit has gone on already)."""
        with self._lock:
            if self._held.pop(grant, None) is None:
                return False
            if self.line:
                self.handoffs += 1
                self._admit()
            else:
                self._free += 1
            return True

    def waiting(self) -> int:
        """Threads in line now."""
        return len(self.line)

    def _admit(self) -> None:
        """The first in line gets a grant; the next one becomes first (held: `_lock`)."""
        waiter = self.line.popleft()
        waiter.grant = self._give()
        waiter.wake.release()
        if self.line:
            nxt = self.line[0]
            nxt.first_since = time.monotonic()
            nxt.wake.release()          # to start watching

    def _give(self) -> int:
        grant = next(self._grants)
        self._held[grant] = time.monotonic()
        return grant


def _queued(sock: Any) -> int:
    """Bytes the kernel holds for `sock`, not read yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def _record_there(sock: Any, left: int) -> bool:
    """Whether the next TLS record of `left` bytes still to come can be read without
    waiting for the client: decrypted bytes are buffered, or the kernel holds a whole
    record's worth. (A record carries at most `RECORD` bytes and at least
    `RECORD_OVERHEAD` more on the wire, so the bound is one the client's bytes reach.)"""
    return sock.pending() > 0 or \
        _queued(sock) >= min(RECORD, left) + RECORD_OVERHEAD


def _wait_for_record(sock: Any, left: int, seconds: float | None) -> bool:
    """Wait, at most `seconds`, until `_record_there`; the kernel wakes this thread only
    once that many bytes are in (`SO_RCVLOWAT`), so a client that trickles costs one
    wake-up, not one per byte. True also when the wait ends for another reason (the
    peer closed, an error): the read that follows says which; False on a timeout."""
    if _record_there(sock, left):
        return True
    # Where the low-water mark cannot be set, the poll wakes at the first byte and the
    # permit may be taken before the record is whole: a revocation bounds that. Putting
    # it back fails only on a socket already closed, which the read that follows reports.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT,
                        min(RECORD, left) + RECORD_OVERHEAD)
    try:
        poller = select.poll()          # not select(): a busy server's descriptors pass 1024
        poller.register(sock, select.POLLIN)
        events = poller.poll(None if seconds is None else seconds * 1000)
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    return bool(events) or _record_there(sock, left)


class _Turn:
    """One thread's permit of `turns` while it decrypts a run of records."""

    __slots__ = ("turns", "grant", "since")

    def __init__(self, turns: Turnstile) -> None:
        self.turns = turns
        self.grant = turns.enter()
        self.since = time.monotonic()

    def over(self) -> bool:
        """Held `TURN_S`, and others wait."""
        return bool(self.turns.line) and time.monotonic() - self.since > TURN_S

    def end(self) -> bool:
        """Give the permit back; False if it had been taken over (a stall)."""
        return self.turns.leave(self.grant)


def receive_into(sock: Any, view: memoryview, turns: Turnstile, careful: bool = False) -> bool:
    """Fill `view` from `sock` (a TLS data channel), taking turns at the decryption;
    returns whether the session must be `careful` from now on.

    A holder reads its records blocking, and goes to the back of the line after
    `TURN_S` if others wait. One that waits on its client while others wait loses its
    permit after `turns.stall_s`; from then on its session is careful (the caller
    passes the flag back in): it takes a permit only once a whole record of its
    client's is in (`_wait_for_record`), and gives it back when the next one is not
    while others wait, so a client that stalls or trickles costs the others at most
    one `stall_s`. Careful is not the default: with 64 sessions writing flat out it
    cut fairness from 0.93 to 0.38-0.55 (a session whose client refilled its socket
    late lost its place in line again and again). `ConnectionError` if the peer closes
    before `view` is full; each read and each wait is bounded by the socket's timeout.
    """
    got, n = 0, len(view)
    line = turns.line
    turn = None
    try:
        while got < n:
            left = n - got
            if turn is None:
                if careful and not _wait_for_record(sock, left, sock.gettimeout()):
                    raise TimeoutError(f"the data channel sent no whole record for "
                                       f"{sock.gettimeout():g} s ({got} of {n} bytes)")
                turn = _Turn(turns)
            elif careful and line and not _record_there(sock, left):
                turn.end()                            # others wait, and ours is slow
                turn = None
                continue
            k = sock.recv_into(view[got:], left)
            if k == 0:
                raise ConnectionError(f"the data channel closed after {got} of {n} bytes")
            got += k
            if turn.over():                           # others wait: to the back of the line
                careful = not turn.end() or careful
                turn = None
    finally:
        if turn is not None:
            careful = not turn.end() or careful
    return careful
