"""Streams, events and host staging of the cuda backend.

Each HARP stream is a non-blocking CUDA stream (`cupy.cuda.Stream(non_blocking=True)`),
the default HARP stream included, so no session's work is ever serialised behind
the legacy NULL stream or behind another session. A `StreamState` remembers
whether work was issued since the stream was last known idle, and the first
kernel launched since then: a kernel fault is reported (CUDA reports it only at
a later synchronisation) as a failure of that launch.

Host data moves through pinned buffers (`Staging`): a write copies the caller's
bytes into pinned memory, which is what lets it return at once while the
transfer itself is an asynchronous copy ordered on its stream; the pinned block
is reused only after a fence recorded behind the copy has passed. A read copies
device memory into pinned memory on its stream and from there into `out`, or
into the `bytes` it returns.

Not run on a GPU yet: written against CuPy's documented API (see device.py).
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from .card import CudaCard

MiB = 1 << 20
#: Writes and large reads move in pinned chunks of this size, overlapping host copies and DMA.
CHUNK = 8 * MiB
#: Pinned bytes one session may have in flight in writes before a write waits for the oldest.
INFLIGHT_LIMIT = 64 * MiB
#: A read without `out` up to this size goes through one pinned block: one host copy.
SINGLE_READ_MAX = 64 * MiB
#: Chunks of a large read in flight at once.
READ_WINDOW = 4


class StreamState:
    """A session's CUDA stream and what the session knows about its work."""

    __slots__ = ("stream", "dirty", "first_launch")

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.dirty = False                               # work issued since last known idle
        self.first_launch: tuple[int, str] | None = None  # (seq, kernel) of the first such launch

    def issued(self) -> None:
        self.dirty = True

    def launched(self, seq: int, name: str) -> None:
        self.dirty = True
        if self.first_launch is None:
            self.first_launch = (seq, name)

    def idle(self) -> None:
        """Everything issued on the stream so far has completed."""
        self.dirty = False
        self.first_launch = None


class EventState:
    """A session's CUDA event (timing enabled) and whether it has been recorded."""

    __slots__ = ("event", "recorded")

    def __init__(self, event: Any) -> None:
        self.event = event
        self.recorded = False


class Staging:
    """Pinned host buffers between a session's host data and its device memory."""

    def __init__(self, card: CudaCard) -> None:
        self.card = card
        self.rt = card.rt
        self.h2d = getattr(card.rt, "memcpyHostToDevice", 1)
        self.d2h = getattr(card.rt, "memcpyDeviceToHost", 2)
        self._inflight: deque[tuple[Any, Any, int]] = deque()   # (fence, pinned block, bytes)
        self._inflight_bytes = 0

    # -- writes ----------------------------------------------------------------------
    def upload(self, stream: StreamState, dst: int, view: memoryview) -> None:
        """Queue host->device copies of `view` to device address `dst` on `stream`.

        Returns once `view` has been copied into pinned memory (the caller may reuse it);
        the device copies run in order on the stream. Call with the device current.
        """
        src = np.frombuffer(view, np.uint8)
        n, pos = src.size, 0
        while pos < n:
            size = min(CHUNK, n - pos)
            self._make_room(size)
            block = self.card.pinned(size)
            np.frombuffer(block, np.uint8, size)[:] = src[pos:pos + size]
            self.rt.memcpyAsync(dst + pos, block.ptr, size, self.h2d, stream.stream.ptr)
            self._inflight.append((self.card.fence(stream.stream), block, size))
            self._inflight_bytes += size
            pos += size
        stream.issued()

    def _make_room(self, size: int) -> None:
        self.reap()
        while self._inflight and self._inflight_bytes + size > INFLIGHT_LIMIT:
            fence, block, nbytes = self._inflight.popleft()
            fence.synchronize()            # the oldest copy: raises if the GPU failed
            self._inflight_bytes -= nbytes
            self.card.recycle([fence])
            del block

    def reap(self) -> None:
        """Reuse pinned blocks whose copies have completed (oldest first)."""
        done = []
        while self._inflight and self.card.event_done(self._inflight[0][0]):
            fence, block, nbytes = self._inflight.popleft()
            self._inflight_bytes -= nbytes
            done.append(fence)
        self.card.recycle(done)

    def retire_all(self) -> None:
        """The session is closing without waiting: each pinned block goes back to the pool
        once the copy that reads or fills it has passed its fence."""
        for fence, block, _ in self._inflight:
            self.card.retire(block, 0, [fence])
        self._inflight.clear()
        self._inflight_bytes = 0

    def forget(self) -> None:
        """Drop the bookkeeping (every stream has been synchronised, or the session is over)."""
        self.card.recycle([fence for fence, _, _ in self._inflight])
        self._inflight.clear()
        self._inflight_bytes = 0

    # -- reads -----------------------------------------------------------------------
    def download(self, stream: StreamState, src: int, nbytes: int,
                 out: np.ndarray | None) -> bytes | None:
        """Copy `nbytes` at device address `src` to the host, ordered after earlier work on
        `stream`, and wait for it. Fills `out` (a flat uint8 array) and returns None, or
        returns new `bytes`. CUDA failures propagate as CuPy exceptions. Call with the
        device current."""
        if out is None and nbytes <= SINGLE_READ_MAX:
            block = self.card.pinned(nbytes)
            self.rt.memcpyAsync(block.ptr, src, nbytes, self.d2h, stream.stream.ptr)
            stream.stream.synchronize()
            stream.idle()
            return np.frombuffer(block, np.uint8, nbytes).tobytes()
        target = out if out is not None else np.empty(nbytes, np.uint8)
        window: deque[tuple[int, int, Any, Any]] = deque()
        pos = 0
        while pos < nbytes or window:
            while pos < nbytes and len(window) < READ_WINDOW:
                size = min(CHUNK, nbytes - pos)
                block = self.card.pinned(size)
                self.rt.memcpyAsync(block.ptr, src + pos, size, self.d2h, stream.stream.ptr)
                window.append((pos, size, block, self.card.fence(stream.stream)))
                pos += size
            at, size, block, fence = window.popleft()
            fence.synchronize()
            target[at:at + size] = np.frombuffer(block, np.uint8, size)
            self.card.recycle([fence])
        stream.idle()
        return None if out is not None else target.tobytes()
