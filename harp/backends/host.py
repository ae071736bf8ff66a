"""`HostDevice`: a `BackendDevice` whose memory is host memory and whose streams are host
threads (`hoststreams`).

The cpu backend is one; so is any device driven by a library that computes on
host arrays (ONNX Runtime's CPU provider). Such a backend writes only what its
kernels are: how a module loads, how a kernel is found, and how a launch's
arguments are checked and resolved; each function-table entry is a `HostKernel`
whose runner the streams call with (grid, block, shared_mem, resolved args).
"""
from __future__ import annotations

from threading import Event as Flag
from time import perf_counter_ns as time_ns
from typing import Any, Callable

import numpy as np

from ..errors import HarpError, OutOfMemoryError
from ..tenancy import ComputeGate, MemoryBroker
from ..types import DeviceInfo
from .base import BackendDevice
from .hoststreams import Executor, Recording, StreamQueue

Runner = Callable[[tuple[int, int, int], tuple[int, int, int], int, list], None]


#: A kernel whose last run took less than this (and whose launch is no larger) runs in the
#: issuing thread when its stream is idle (`StreamQueue.run_now`): about this long, the
#: session's other streams wait for it to be issued. (A kernel whose run time depends on
#: something other than its threads, an ONNX model's inputs, may be misjudged once: the
#: run that took long sends its next launches to the pool.)
INLINE_NS = 20_000
#: A kernel not run yet is taken for a short one when its launch has at most this many
#: threads: its first run is inline too (timed, as every inline run is). Under a compute
#: gate, a first run in the pool needed the device to itself, and a session's first
#: launch then waited its turn behind every session that had one: with 64 sessions
#: starting at once, the last began 1-2 s after the first, at 0.12-0.33 of their
#: launches. Without a gate (`local:cpu`), the launches issued while a first run waited
#: for a pool thread (the issuing thread keeps the GIL for up to 5 ms, a couple of
#: thousand noops) queued behind it, kept the stream busy, and so went to the pool until
#: the next synchronize: 9,000-18,000 of 20,000 noops ran inline, and a run took
#: 2.3-6.3 µs a launch instead of 1.7-2.6. A kernel whose time does not follow its
#: threads (a catalog gemm's follows its m, n, k) may be misjudged: then a launch waits
#: for its run, for up to two runs per function handle (`HostKernel.ran_inline`); under
#: a gate each is charged as it ends, and the session is curbed once that puts it a
#: slice ahead (`harp.server.fairshare`).
FIRST_INLINE_THREADS = 256


class HostKernel:
    """A function-table entry of a host device: the catalog kernel (or None) and its runner,
    and how long it took for how many threads (which launches may run inline).

    `last_ns`, what the choice reads, is the shorter of its last two inline runs: a
    kernel goes back to the pool once two in a row took `INLINE_NS` or more. One alone
    may be the host taking the CPU away mid-run (a noop's wall time reached 300 µs with
    64 sessions on 2 cores), or a first run's cold start; a run in the pool is timed
    alone (a kernel there is not known to be short)."""

    __slots__ = ("kernel", "run", "name", "last_ns", "ran_ns", "last_threads")

    def __init__(self, kernel: Any, run: Runner, name: str) -> None:
        self.kernel, self.run, self.name = kernel, run, name
        self.last_ns = -1            # not run yet: unknown
        self.ran_ns = 0              # its latest inline run (none yet: presumed short)
        self.last_threads = 0

    def ran_inline(self, ran_ns: int, threads: int) -> None:
        """An inline run of `threads` threads took `ran_ns`."""
        self.last_ns, self.ran_ns = min(ran_ns, self.ran_ns), ran_ns
        self.last_threads = threads

    def timed_run(self, grid: tuple[int, int, int], block: tuple[int, int, int],
                  shared_mem: int, args: list) -> None:
        """`run`, its time kept (a queued launch of a kernel not known to be short)."""
        start = time_ns()
        try:
            self.run(grid, block, shared_mem, args)
        finally:
            self.last_ns = self.ran_ns = time_ns() - start
            self.last_threads = _threads(grid, block)


def _threads(grid: tuple[int, int, int], block: tuple[int, int, int]) -> int:
    return grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2]


class HostEvent:
    """An event: its latest recording, or None while it has never been recorded."""

    __slots__ = ("recording",)

    def __init__(self) -> None:
        self.recording: Recording | None = None


def host_memory(nbytes: int) -> np.ndarray:
    """`nbytes` of zeroed host memory (fresh pages: no tenant sees another's bytes), or
    `OutOfMemoryError` when the host has none."""
    try:
        return np.zeros(nbytes, dtype=np.uint8)
    except MemoryError:
        raise OutOfMemoryError(f"host could not provide {nbytes} bytes") from None


class HostDevice(BackendDevice):
    """Host-memory buffers (uint8 arrays), host-thread streams, events with real timestamps.

    Kernel runs hold the session's `ComputeGate` and are charged their run time. Close
    drops queued work; an operation already running finishes on its own thread, and its
    memory stays referenced until then, so nothing is reused under it.
    """

    def __init__(self, info: DeviceInfo, memory: MemoryBroker, *, name: str, card: Any = None,
                 compute: ComputeGate | None = None, trust_client_code: bool = False) -> None:
        self._executor = Executor(name, self._defer, gate=compute)
        super().__init__(info, memory, card=card, compute=compute,
                         trust_client_code=trust_client_code)

    def _open(self) -> None:
        self._streams[0] = self._executor.stream("default")

    # -- memory ------------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> np.ndarray:
        return host_memory(nbytes)

    def _store(self, stream: StreamQueue, mem: np.ndarray, offset: int, view: memoryview,
               seq: int) -> None:
        span = mem[offset:offset + view.nbytes]
        if stream.idle:
            # Nothing is ahead of it on the stream: store now, in the caller's thread
            # (one copy, no hand-off to the worker).
            span[:] = np.frombuffer(view, np.uint8)
            return
        # bytes are immutable: keep a reference; anything else is copied now,
        # because the caller may reuse its buffer as soon as we return.
        src = np.frombuffer(view, np.uint8) if isinstance(view.obj, bytes) else \
            np.frombuffer(view, np.uint8).copy()
        stream.submit("write", seq, span.__setitem__, slice(None), src, nbytes=view.nbytes)

    def _fetch(self, stream: StreamQueue, mem: np.ndarray, offset: int, nbytes: int,
               dst: np.ndarray | None) -> bytes | None:
        span = mem[offset:offset + nbytes]
        if dst is not None:
            self._in_order(stream, np.copyto, dst, span)
            return None
        got: list[bytes] = []
        self._in_order(stream, lambda: got.append(span.tobytes()))
        return got[0]

    def _copy(self, stream: StreamQueue, dst: np.ndarray, dst_offset: int, src: np.ndarray,
              src_offset: int, nbytes: int, seq: int) -> None:
        stream.submit("copy", seq, np.copyto, dst[dst_offset:dst_offset + nbytes],
                      src[src_offset:src_offset + nbytes])

    def _fill(self, stream: StreamQueue, mem: np.ndarray, offset: int, nbytes: int, value: int,
              seq: int) -> None:
        stream.submit("fill", seq, mem[offset:offset + nbytes].fill, value)

    def _in_order(self, stream: StreamQueue, op: Any, *args: Any) -> None:
        """Run `op` in order on `stream` and wait for it; raise what it raised.

        On an idle stream `op` runs here at once: nothing is ahead of it, and the round
        trip through the worker thread is the cost of a sync call.
        """
        if stream.idle:
            op(*args)
            return
        failure: list[BaseException] = []
        done = Flag()

        def run() -> None:
            try:
                op(*args)
            except BaseException as exc:  # raised in the caller below
                failure.append(exc)
            finally:
                done.set()
        stream.submit("sync", 0, run)
        while not done.wait(0.5):
            if self._executor.cancelled:
                raise HarpError("the device session is closed")
        if failure:
            raise failure[0]

    # -- kernels -------------------------------------------------------------------------
    def _launch(self, stream: StreamQueue, target: HostKernel, prepared: Any,
                grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int,
                seq: int) -> None:
        threads = _threads(grid, block)
        last = target.last_ns
        if (0 <= last < INLINE_NS and threads <= target.last_threads) or \
                (last < 0 and threads <= FIRST_INLINE_THREADS):
            ran = stream.run_now("launch", seq, target.run, grid, block, shared_mem, prepared)
            if ran >= 0:
                target.ran_inline(ran, threads)
                return
            stream.submit("launch", seq, target.run if last >= 0 else target.timed_run,
                          grid, block, shared_mem, prepared, kernel=True)
            return
        stream.submit("launch", seq, target.timed_run, grid, block, shared_mem, prepared,
                      kernel=True)

    def settle(self) -> None:
        self._executor.settle()

    def _launch_refused(self) -> None:
        self._executor.end_run()

    # -- order -----------------------------------------------------------------------------
    def _new_stream(self) -> StreamQueue:
        return self._executor.stream(f"s{len(self._streams)}")

    def _new_event(self) -> HostEvent:
        return HostEvent()

    def _record(self, event: HostEvent, stream: StreamQueue, seq: int) -> None:
        recording = Recording()
        event.recording = recording
        stream.submit("record", seq, recording.complete)

    def _recorded(self, event: HostEvent) -> bool:
        return event.recording is not None

    def _wait_event(self, stream: StreamQueue, event: HostEvent, seq: int) -> None:
        stream.wait_for("wait", seq, event.recording)

    def _sync_stream(self, stream: StreamQueue) -> None:
        stream.drain()

    def _elapsed_ms(self, start: HostEvent, end: HostEvent) -> float:
        self._executor.end_run()  # a kernel queued before the recording may need the gate
        recordings = [start.recording, end.recording]
        for r in recordings:
            while not r.done.wait(0.5):
                if self._executor.cancelled:
                    raise HarpError("the device session is closed")
        return (recordings[1].time_ns - recordings[0].time_ns) / 1e6

    def _shutdown(self) -> None:
        self._executor.cancel()
