"""A thread pool for gRPC services that gives its threads back when they are idle.

gRPC's synchronous server runs each session's handler on a thread of the
executor it is given for the session's whole life. `ThreadPoolExecutor` keeps
every thread it ever started, so a burst of 60 sessions left 60 idle threads
(and their heaps) in the server for good. Here a thread that has had nothing to
do for `idle_s` exits.
"""
from __future__ import annotations

import queue
import threading
from concurrent import futures
from typing import Any, Callable


class ElasticExecutor(futures.Executor):
    """At most `max_workers` threads, started on demand, ended after `idle_s` idle."""

    def __init__(self, max_workers: int, *, idle_s: float = 10.0,
                 thread_name_prefix: str = "harp-worker") -> None:
        self._max = max_workers
        self._idle_s = idle_s
        self._prefix = thread_name_prefix
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0               # threads waiting for work
        self._queued = 0             # work items not yet taken by a thread
        self._shutdown = False
        self._count = 0

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.put((future, fn, args, kwargs))
            self._queued += 1
            # Each waiting item needs a thread of its own: gRPC's handlers hold theirs for a
            # session's life, so an idle thread already promised to an earlier item is none.
            if self._idle < self._queued and self._threads < self._max:
                self._threads += 1
                self._count += 1
                threading.Thread(target=self._run, name=f"{self._prefix}_{self._count}",
                                 daemon=True).start()
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                item = self._work.get(timeout=self._idle_s)
            except queue.Empty:
                item = None
            with self._lock:
                self._idle -= 1
                if item is None:
                    if self._work.empty() or self._shutdown:
                        self._threads -= 1
                        return
                    continue
                if item is not _STOP:
                    self._queued -= 1
            if item is _STOP:
                with self._lock:
                    self._threads -= 1
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args, kwargs, item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = self._threads
        for _ in range(threads):
            self._work.put(_STOP)

    @property
    def threads(self) -> int:
        return self._threads


_STOP = object()
