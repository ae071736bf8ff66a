"""Streams and events of the cpu backend: a worker thread per stream, real timestamps.

Each stream runs its operations in order on its own thread, so work on two
streams overlaps, and an event wait really blocks one stream on another.
"""
from __future__ import annotations

import threading
import time
from queue import SimpleQueue
from typing import Any, Callable

OnError = Callable[[BaseException, str, int], None]


class StreamWorker:
    """An in-order queue of operations drained by one thread (started on first use)."""

    def __init__(self, name: str, on_error: OnError) -> None:
        self.name = name
        self._queue: SimpleQueue = SimpleQueue()
        self._on_error = on_error
        self._thread: threading.Thread | None = None
        # Each counter has one writer (the issuing thread, the worker), so the
        # GIL keeps them consistent without a lock.
        self._submitted = 0
        self._completed = 0
        self._cancelled = False

    @property
    def idle(self) -> bool:
        """Nothing queued or running: work issued now may run at once, in the caller."""
        return self._completed == self._submitted

    def submit(self, call: str, seq: int, op: Callable[..., Any], *args: Any) -> None:
        """Queue `op(*args)`; if it raises, the error is recorded against (call, seq)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._submitted += 1
        self._queue.put((call, seq, op, args))

    def drain(self) -> None:
        """Block until every operation queued so far has run."""
        if self._thread is None or self.idle:
            return
        done = threading.Event()
        self.submit("", 0, done.set)
        done.wait()

    def stop(self) -> None:
        """End the thread, dropping queued work: a closing session's pending calls are void,
        and a client that queued a great deal must not hold its memory for as long."""
        if self._thread is not None:
            self._cancelled = True
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            call, seq, op, args = item
            if self._cancelled:
                self._completed += 1
                continue
            try:
                op(*args)
            except BaseException as exc:  # reported at the session's next sync call
                self._on_error(exc, call, seq)
            finally:
                self._completed += 1


class Recording:
    """One recording of an event: done once its stream reaches it, with the time it did."""

    __slots__ = ("done", "time_ns")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.time_ns = 0

    def complete(self) -> None:
        self.time_ns = time.perf_counter_ns()
        self.done.set()
