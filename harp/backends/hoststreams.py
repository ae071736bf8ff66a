"""Host streams and events: in-order queues run by a few threads, real timestamps.

A session's streams share a small pool of threads (`Executor`, at most
`THREADS`), so a session with 256 streams still has a handful of threads. A
stream runs its operations in order on whichever pool thread takes it; two
streams' work overlaps when two threads are free. An event wait does not hold
a thread: a stream whose next operation waits on an event that is not done
yet is parked, and the event's completion puts it back in line. Since a wait
only ever waits on recordings issued before it, every queue drains.

The bytes of writes queued behind busy work are bounded per session
(`MAX_QUEUED_BYTES`): a write beyond it waits for the queues to catch up.

A kernel known to be short whose stream is idle need not be queued at all: it
runs in the thread that issues it (`StreamQueue.run_now`), which saves the
hand-off to a pool thread, almost half of a noop launch's CPU in a session
(`benchmarks/session_launch.py`). Under a compute gate such kernels form a run
that lasts until the issuing thread settles (the server's sessions do after each
batch of calls and before any other call, and the executor ends it before
anything queues or waits, or when a launch is refused), charged then as a pool
thread's run is. Such a run starts only if the gate admits it without waiting
(`ComputeGate.try_enter`: the device is the session's and nobody has asked for
it, or its short kernels may run beside the holder's, `harp.server.fairshare`),
and ends early when someone waits and its slice is over, or when it is curbed.
A session that must wait for the gate queues its kernels, and its issuing
thread goes on (made to wait there, the sessions of a busy device did their
whole batches' work holding it, and their share of launches spread to 0.25-1 of
each other's).
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any, Callable

OnError = Callable[[BaseException, str, int], None]

#: Most pool threads one session's streams use.
THREADS = max(2, min(4, os.cpu_count() or 2))
#: Operations a thread runs from one stream before it gives the others a turn.
BURST = 64
#: Most bytes of write payloads one session may have queued behind busy streams.
MAX_QUEUED_BYTES = 64 << 20


class Recording:
    """One recording of an event: done once its stream reaches it, with the time it did."""

    __slots__ = ("done", "time_ns", "_waiters", "_lock")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.time_ns = 0
        self._waiters: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def complete(self) -> None:
        self.time_ns = time.perf_counter_ns()
        with self._lock:
            self.done.set()
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()

    def when_done(self, wake: Callable[[], None]) -> bool:
        """Call `wake` once the recording completes; False (and no call) if it already has."""
        with self._lock:
            if self.done.is_set():
                return False
            self._waiters.append(wake)
            return True


class _Wait:
    """A queued wait on a recording (runs no code: it parks the stream until done)."""
    __slots__ = ("recording",)

    def __init__(self, recording: Recording) -> None:
        self.recording = recording


class Executor:
    """The pool of threads that runs one session's streams, and its queued-bytes bound."""

    def __init__(self, name: str, on_error: OnError, *, threads: int = THREADS,
                 gate: Any = None) -> None:
        self.name = name
        self._on_error = on_error
        #: The session's compute gate (`harp.tenancy.ComputeGate`), held while kernels run:
        #: taken once for a run of kernels and given back when the run ends or the gate
        #: asks for it (`wants_back`), so a trivial kernel does not pay for it each time.
        self.gate = gate
        self._on_idle = gate.quiet if gate is not None else None
        self._max = threads
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque[StreamQueue] = deque()
        self._threads = 0
        self._idle_threads = 0
        self._cancelled = False
        self._queued_bytes = 0
        self._space = threading.Condition(threading.Lock())
        self._streams: list[StreamQueue] = []
        #: A run of kernels the issuing thread ran itself (`StreamQueue.run_now`), admitted
        #: by the gate (holding it, or beside its holder): [process CPU ns when it began
        #: (own process), the kernels' wall ns, when it began (ns)]. Only the issuing
        #: thread touches it.
        self._inline: list | None = None
        #: The issuing thread settles at the end of what it issues (the server's sessions
        #: do, after each batch of calls): only then may kernels run in it under a gate.
        self._settles = False

    # -- queues ------------------------------------------------------------------------
    def stream(self, label: str) -> "StreamQueue":
        queue = StreamQueue(self, label)
        self._streams.append(queue)
        return queue

    def _schedule(self, stream: "StreamQueue") -> None:
        """Put a stream in line (call with `_cond` held)."""
        self._ready.append(stream)
        if self._idle_threads:
            self._cond.notify()
        elif self._threads < self._max:
            self._threads += 1
            threading.Thread(target=self._run, name=f"{self.name}-{self._threads}",
                             daemon=True).start()

    def wake(self, stream: "StreamQueue") -> None:
        with self._cond:
            if not self._cancelled:
                self._schedule(stream)

    def settle(self) -> None:
        """The issuing thread has issued all it has for now. A caller that calls this after
        each batch of calls, and before any call that may block, lets kernels run in it
        under a gate (`StreamQueue.run_now`); one that never does keeps them in the pool,
        where a run ends when its stream runs dry."""
        self._settles = True
        self.end_run()

    def end_run(self) -> None:
        """End a run of kernels the issuing thread ran itself (in that thread: before it
        queues or waits, or settles): tell the gate it is over (`exit`), charged the
        kernels' wall time (the run's whole time if someone waits and that has reached
        the slice; in a process of the session's own, no more than the CPU time the
        process used meanwhile, as `_used`), and say the session is quiet unless the pool
        has work."""
        run, self._inline = self._inline, None
        if run is None:
            return
        gate = self.gate
        used = run[1]
        held = time.perf_counter_ns() - run[2]
        if gate.wants_back(held):
            # Someone waits and the run has held the gate for a slice: charged the time it
            # held it (its launches' work between kernels too), so `exit` lets go at once.
            used = held
        if gate.own_process:
            used = min(used, time.process_time_ns() - run[0])
        gate.exit(used)
        if self._idle_threads == self._threads and not self._ready:
            gate.quiet()

    # -- the queued-bytes bound ----------------------------------------------------------
    def hold_bytes(self, nbytes: int) -> None:
        """Count `nbytes` of a queued write, waiting while the session is over its bound."""
        with self._space:
            while self._queued_bytes and self._queued_bytes + nbytes > MAX_QUEUED_BYTES \
                    and not self._cancelled:
                self._space.wait(0.5)
            self._queued_bytes += nbytes

    def drop_bytes(self, nbytes: int) -> None:
        with self._space:
            self._queued_bytes -= nbytes
            self._space.notify_all()

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    # -- lifetime ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Drop every queued operation; an operation already running finishes on its own."""
        with self._cond:
            self._cancelled = True
            self._ready.clear()
            self._cond.notify_all()
            streams = list(self._streams)
            for stream in streams:           # queued, parked or running: drop what waits
                stream._drop()
        with self._space:
            self._space.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._ready and not self._cancelled:
                    self._idle_threads += 1
                    if self._idle_threads == self._threads and self._on_idle is not None:
                        try:
                            self._on_idle()
                        except Exception:
                            pass
                    cond.wait()
                    self._idle_threads -= 1
                if self._cancelled:
                    self._threads -= 1
                    return
                stream = self._ready.popleft()
            stream._run_burst()


class StreamQueue:
    """One stream: operations in order, run on its session's `Executor`."""

    def __init__(self, executor: Executor, label: str) -> None:
        self.executor = executor
        self.label = label
        self._ops: deque = deque()
        self._scheduled = False          # in line, running, or parked on an event
        # Each counter has one writer (the issuing thread; the pool thread running the
        # stream), so the GIL keeps them consistent without a lock.
        self._submitted = 0
        self._completed = 0
        self._drained = threading.Condition(threading.Lock())
        self._waiters = 0                # threads in drain()

    @property
    def idle(self) -> bool:
        """Nothing queued or running: work issued now may run at once, in the caller."""
        return self._completed == self._submitted

    def submit(self, call: str, seq: int, op: Callable[..., Any], *args: Any,
               nbytes: int = 0, kernel: bool = False) -> None:
        """Queue `op(*args)`; if it raises, the error is recorded against (call, seq).
        `nbytes` of payload it keeps count against the session's queued-bytes bound.

        The executor's lock is taken only when the stream has to be put in line: appending
        to the deque is atomic, and the thread running the stream checks it once more after
        it lets go (see `_run_burst`)."""
        ex = self.executor
        if ex._inline is not None:
            ex.end_run()                 # the pool's kernels take the gate in their turn
        if nbytes:
            ex.hold_bytes(nbytes)
        if ex._cancelled:
            if nbytes:
                ex.drop_bytes(nbytes)
            return
        self._submitted += 1
        self._ops.append((call, seq, op, args, nbytes, kernel))
        if not self._scheduled:
            self._put_in_line()

    def run_now(self, call: str, seq: int, op: Callable[..., Any], *args: Any) -> int:
        """Run kernel `op(*args)` here, in the issuing thread, if it can start at once: the
        stream has nothing queued or running and the session's compute gate admits it
        without waiting. Returns the nanoseconds it ran, or -1 (nothing run: `submit` it).

        A queued kernel costs a hand-off to a pool thread (a deque, a lock, a wake-up),
        for a trivial kernel most of its launch (`HostDevice._launch` decides which are).
        What it raises is recorded against (call, seq), as from a pool thread. Under a
        compute gate, kernels run this way form a run that lasts until the issuing
        thread settles (`Executor.settle`), or until its slice is over while someone
        waits, or it is curbed (then the kernel is queued, and the pool waits its turn)."""
        ex = self.executor
        if self._completed != self._submitted or ex._cancelled:
            return -1
        gate = ex.gate
        run = None
        if gate is not None:
            if not ex._settles:
                return -1
            run = ex._inline
            if run is not None and (gate.curbed or
                                    gate.wants_back(time.perf_counter_ns() - run[2])):
                ex.end_run()
                return -1
            if run is None:
                if not gate.try_enter():
                    return -1
                ex._inline = run = [time.process_time_ns() if gate.own_process else 0, 0,
                                    time.perf_counter_ns()]
        start = time.perf_counter_ns()
        try:
            op(*args)
        except Exception as exc:    # reported at the session's next sync call
            ex._on_error(exc, call, seq)
        ran = time.perf_counter_ns() - start
        if run is not None:
            run[1] += ran
            if run[1] >= gate.run_charge_ns:
                ex.end_run()             # charged now; the next kernel is admitted anew
        return ran

    def _put_in_line(self) -> None:
        ex = self.executor
        with ex._cond:
            if not self._scheduled and not ex._cancelled:
                self._scheduled = True
                ex._schedule(self)

    def wait_for(self, call: str, seq: int, recording: Recording) -> None:
        """Queue a wait: later operations run once `recording` is done."""
        self.submit(call, seq, _Wait, recording)

    def drain(self) -> None:
        """Block until every operation queued so far has run (or the session is closed)."""
        if self.executor._inline is not None:
            self.executor.end_run()
        if self.idle:
            return
        target = self._submitted
        with self._drained:
            self._waiters += 1
            try:
                while self._completed < target and not self.executor.cancelled:
                    self._drained.wait(0.5)
            finally:
                self._waiters -= 1

    def _drop(self) -> None:
        dropped = 0
        while self._ops:
            nbytes = self._ops.popleft()[4]
            dropped += nbytes
            self._completed += 1
        if dropped:
            self.executor.drop_bytes(dropped)
        with self._drained:
            self._drained.notify_all()

    def _run_burst(self) -> None:
        """Run up to BURST operations (in a pool thread), then park, requeue or stop."""
        gate = self.executor.gate
        held = [0, 0]                 # when the gate was entered (ns; 0: not held), CPU then
        try:
            self._burst(gate, held)
        finally:
            if held[0]:
                gate.exit(_used(gate, held))

    def _burst(self, gate: Any, held: list) -> None:
        ex = self.executor
        ops = self._ops
        for _ in range(BURST):
            if ex._cancelled:
                return
            if not ops:
                with ex._cond:
                    self._scheduled = False
                if ops:                              # one came while we let go: run on
                    self._put_in_line()
                return
            call, seq, op, args, nbytes, kernel = ops[0]
            if op is _Wait:
                if args[0].when_done(lambda: ex.wake(self)):
                    return                           # parked: the recording wakes us
                ops.popleft()
                self._finish(0)
                continue
            if gate is not None:
                if kernel and not held[0]:
                    gate.enter()
                    held[0] = time.perf_counter_ns()
                    if gate.own_process:
                        held[1] = time.process_time_ns()
                elif held[0] and (not kernel or gate.wants_back(
                        time.perf_counter_ns() - held[0])):
                    gate.exit(_used(gate, held))
                    held[0] = 0
                    continue                         # enter again for the kernel, in turn
            ops.popleft()
            try:
                op(*args)
            except BaseException as exc:  # reported at the session's next sync call
                ex._on_error(exc, call, seq)
            finally:
                self._finish(nbytes)
        with ex._cond:                               # a burst done: let other streams in
            if ops and not ex._cancelled:
                ex._schedule(self)
            else:
                self._scheduled = False
        if ops and not self._scheduled:
            self._put_in_line()

    def _finish(self, nbytes: int) -> None:
        self._completed += 1
        if nbytes:
            self.executor.drop_bytes(nbytes)
        if self._completed == self._submitted and self._waiters:
            with self._drained:
                self._drained.notify_all()


def _used(gate: Any, held: list) -> int:
    """The device time of a run of kernels that entered the gate at `held`: its wall time,
    or, in a process of the session's own, no more than the CPU time the process used
    meanwhile. A host device is the CPU: time the run spent descheduled on a loaded host
    is not the session's use, and charged as such it would send the session to the back
    of the line for work it never got to do (one run charged 300 µs per noop kernel left
    a session 1/40 of its peers' launches with 64 sessions on 2 cores)."""
    wall = time.perf_counter_ns() - held[0]
    if gate.own_process:
        return min(wall, time.process_time_ns() - held[1])
    return wall
