"""Bulk bytes take turns: a permit per core the pool server runs on, given in arrival order.

Every session's handler thread encrypts and decrypts its own data channel
(`datachannel`), and bulk bytes cost the pool server far more CPU than anything
else it does (about 0.7 ms per MiB on the development VM: the TLS cipher and the
kernel's copy). With more sessions moving bytes than cores, which thread went
next was left to the GIL and the OS scheduler, and neither is fair: in some runs
of 64 sessions writing flat out on one core, the least served session got
0.72-0.79 of the bytes of the most served (in others 0.93-0.98, on the same code).
Here each slot's worth of a write (`receive_into`) and of a large read's payload
(`send_from`) first takes a permit of the server's `Turnstile`; a permit given back
goes straight to the longest waiting thread, so sessions take turns a slot at a
time (0.89-0.98 in every run; `benchmarks/bench.py --sections sessions`).

A holder that waits on its client (one that stops halfway through a write, or
does not read its read's payload) holds up the others for at most `STALL_S`: the
first in line watches the holders and takes over a permit held that long, and
the stalled thread goes on without one. A holder also goes to the back of the
line after `TURN_S` while others wait (a client that sends tiny TLS records costs
far more CPU per byte than one that sends full ones).
"""
from __future__ import annotations

import collections
import itertools
import os
import threading
import time
from typing import Any

#: How long a thread may keep a permit while others wait, in seconds (a 1 MiB slot
#: takes about a millisecond to decrypt).
TURN_S = 0.002
#: `send_from` sends in pieces of this many bytes, and may end its turn between two.
SEND_PIECE = 256 * 1024
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
    __slots__ = ("wake", "grant", "first")

    def __init__(self, first: bool) -> None:
        self.wake = threading.Semaphore(0)  # released with a grant, or when it comes first
        self.grant = 0
        #: First in line: the one that watches the holders for a stall.
        self.first = first


class Turnstile:
    """`permits` holders at a time; the others wait in line and are served in order.

    `enter` returns a grant, which `leave` takes back. `leave` hands the permit to the
    first in line directly (it is never free for a thread that did not wait to take
    first), so a thread that leaves and enters again goes to the back of the line. The
    first in line watches the holders: a grant held for `stall_s` while it waits is
    revoked, the permit is its, and the revoked holder's `leave` does nothing. The rest
    of the line sleeps until its turn comes (no timed wake-ups).
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
            waiter.wake.acquire(timeout=self.stall_s if waiter.first else None)
            with self._lock:
                if waiter.grant:
                    return waiter.grant
                if waiter.first and self._held:
                    oldest = min(self._held, key=self._held.__getitem__)
                    if time.monotonic() - self._held[oldest] >= self.stall_s:
                        del self._held[oldest]
                        self.revoked += 1
                        self._admit()
                        return waiter.grant

    def leave(self, grant: int) -> None:
        """Give `grant`'s permit back, to the first in line if any; a revoked grant's
        permit has gone on already."""
        with self._lock:
            if self._held.pop(grant, None) is None:
                return
            if self.line:
                self.handoffs += 1
                self._admit()
            else:
                self._free += 1

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
            nxt.first = True
            nxt.wake.release()          # to start watching

    def _give(self) -> int:
        grant = next(self._grants)
        self._held[grant] = time.monotonic()
        return grant


class _Turn:
    """One thread's permit of `turns` while it moves a slot's bytes, piece by piece."""

    __slots__ = ("turns", "grant", "since")

    def __init__(self, turns: Turnstile) -> None:
        self.turns = turns
        self.grant = turns.enter()
        self.since = time.monotonic()

    def between_pieces(self) -> None:
        """After `TURN_S` with others waiting: to the back of the line."""
        if self.turns.line and time.monotonic() - self.since > TURN_S:
            self.turns.leave(self.grant)
            self.grant = self.turns.enter()
            self.since = time.monotonic()

    def end(self) -> None:
        self.turns.leave(self.grant)


def receive_into(sock: Any, view: memoryview, turns: Turnstile) -> None:
    """Fill `view` from `sock` (a TLS data channel), holding a permit of `turns`.

    The holder goes to the back of the line after `TURN_S` if others wait; one that
    waits for its client longer than `turns.stall_s` loses its permit to the first in
    line. `ConnectionError` if the peer closes before `view` is full; each read is
    bounded by the socket's own timeout.
    """
    got, n = 0, len(view)
    if n == 0:
        return
    turn = _Turn(turns)
    try:
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionError(f"the data channel closed after {got} of {n} bytes")
            got += k
            turn.between_pieces()
    finally:
        turn.end()


def send_from(sock: Any, view: memoryview, turns: Turnstile) -> None:
    """Send `view` on `sock` (a TLS data channel), holding a permit of `turns`: in pieces
    of `SEND_PIECE`, going to the back of the line between two after `TURN_S` if others
    wait. A client that does not read loses the permit after `turns.stall_s`."""
    n = len(view)
    if n == 0:
        return
    turn = _Turn(turns)
    try:
        for pos in range(0, n, SEND_PIECE):
            sock.sendall(view[pos:pos + SEND_PIECE])
            turn.between_pieces()
    finally:
        turn.end()
