"""Short kernels on an idle stream run in the issuing thread (`StreamQueue.run_now`), and
what that does to order, errors and the compute gate.

A queued kernel costs a hand-off to a pool thread; a host device runs a kernel it knows
to be short (its last run under `host.INLINE_NS`, no more threads than then) in the
thread that issued it when nothing is ahead of it on its stream. Under a compute gate
such kernels form a run that holds the gate until the issuing thread settles, and is
charged then.
"""
from __future__ import annotations

import threading
import time

import pytest

import harp
from harp.backends import host
from harp.backends.cpu import CpuBackend
from harp.backends.hoststreams import Executor
from harp.errors import HarpError
from harp.server.fairshare import SLICE_NS, DeviceArbiter
from harp.tenancy import ComputeGate


class _Gate(ComputeGate):
    """A gate that is ours unless `free` is cleared, counting what happens to it in `log`."""

    def __init__(self, own_process: bool = False, log: list | None = None) -> None:
        self.own_process = own_process
        self.free = True
        self.back = False
        self.entered = self.idled = 0
        self.charged: list[int] = []
        self.log = log if log is not None else []

    def enter(self) -> None:
        self.entered += 1

    def try_enter(self) -> bool:
        if self.free:
            self.entered += 1
        return self.free

    def exit(self, device_ns: int) -> None:
        self.charged.append(device_ns)
        self.log.append("exit")

    def idle(self) -> None:
        self.idled += 1

    def wants_back(self, running_ns: int = 0) -> bool:
        return self.back


def _settled(gate):
    """An executor under `gate` whose caller settles, and its default stream."""
    ex, stream, _ = _executor(gate)
    ex.settle()
    return ex, stream


def _executor(gate=None):
    errors: list = []
    ex = Executor("inline", lambda exc, call, seq: errors.append((call, seq, exc)), gate=gate)
    return ex, ex.stream("s0"), errors


def test_an_idle_stream_runs_the_kernel_in_the_caller_and_reports_its_error():
    ex, stream, errors = _executor()
    ran_in: list = []
    assert stream.run_now("launch", 1, lambda: ran_in.append(threading.get_ident())) >= 0
    assert ran_in == [threading.get_ident()]

    def fails():
        raise ValueError("kernel fault")
    assert stream.run_now("launch", 2, fails) >= 0
    assert [(c, s, type(e)) for c, s, e in errors] == [("launch", 2, ValueError)]
    ex.cancel()


def test_a_stream_with_work_queued_keeps_its_order():
    ex, stream, _ = _executor()
    release = threading.Event()
    order: list = []
    stream.submit("launch", 1, lambda: (release.wait(10), order.append(1)), kernel=True)
    assert stream.run_now("launch", 2, lambda: order.append(2)) == -1     # not now
    stream.submit("launch", 2, lambda: order.append(2), kernel=True)
    release.set()
    stream.drain()
    assert order == [1, 2]
    ex.cancel()


def test_under_a_gate_nothing_runs_inline_until_the_caller_settles():
    gate = _Gate()
    gate.run_charge_ns = 10**12           # (no run ends for its length here)
    ex, stream, _ = _executor(gate)
    assert stream.run_now("launch", 1, lambda: None) == -1    # nobody would give it back
    ex.settle()                                               # a caller that settles
    for seq in (2, 3, 4):
        assert stream.run_now("launch", seq, lambda: time.sleep(0.001)) >= 0
    assert gate.entered == 1 and gate.charged == []           # one run, still held
    ex.settle()
    assert len(gate.charged) == 1 and gate.charged[0] >= 3_000_000
    assert gate.idled == 1                                    # nothing queued: idle
    ex.cancel()


def test_a_run_is_charged_and_admitted_again_once_its_kernels_took_run_charge_ns():
    gate = _Gate()                        # run_charge_ns: 1 ms
    ex, stream = _settled(gate)
    assert stream.run_now("launch", 1, lambda: None) >= 0
    assert gate.charged == []             # a short run goes on...
    assert stream.run_now("launch", 2, lambda: time.sleep(0.001)) >= 0
    assert len(gate.charged) == 1 and gate.charged[0] >= 1_000_000   # ...a long one ends
    assert stream.run_now("launch", 3, lambda: None) >= 0
    assert gate.entered == 2              # the next kernel was admitted anew
    ex.cancel()


def test_a_gate_that_is_not_free_or_wants_the_device_back_sends_kernels_to_the_pool():
    gate = _Gate()
    ex, stream = _settled(gate)
    gate.free = False
    assert stream.run_now("launch", 1, lambda: None) == -1 and gate.entered == 0
    gate.free = True
    assert stream.run_now("launch", 2, lambda: None) >= 0
    gate.back = True                      # someone waits and the slice is used
    assert stream.run_now("launch", 3, lambda: None) == -1
    assert len(gate.charged) == 1         # the run ended: charged and given back
    ex.cancel()


def test_a_run_that_held_the_gate_past_its_slice_while_someone_waits_is_charged_its_time():
    gate = _Gate()
    ex, stream = _settled(gate)
    assert stream.run_now("launch", 1, lambda: None) >= 0
    time.sleep(0.05)                      # the launch work between kernels
    ex.settle()
    assert gate.charged[-1] < 0.05e9      # nobody waited: its kernels' time
    assert stream.run_now("launch", 2, lambda: None) >= 0
    time.sleep(0.05)
    gate.back = True                      # someone waits, and the slice is over
    ex.settle()
    assert gate.charged[-1] >= 0.05e9     # the time it held the gate
    ex.cancel()


def test_queueing_work_ends_the_run_first():
    gate = _Gate()
    ex, stream = _settled(gate)
    assert stream.run_now("launch", 1, lambda: None) >= 0
    release = threading.Event()
    stream.submit("launch", 2, lambda: release.wait(10), kernel=True)
    assert ex._inline is None and len(gate.charged) == 1    # ended before it was queued
    release.set()
    stream.drain()
    ex.cancel()


def test_a_descheduled_run_in_its_own_process_is_charged_no_more_than_its_cpu():
    gate = _Gate(own_process=True)
    ex, stream = _settled(gate)
    assert stream.run_now("launch", 1, lambda: time.sleep(0.2)) >= 0.2e9
    ex.settle()
    # (the test's process may run other threads meanwhile: far from 0.2 s all the same)
    assert gate.charged[0] < 0.1e9
    ex.cancel()


def _gated(arbiter, sid, slice_ns):
    from harp.server.fairshare import SessionGate
    gate = SessionGate(_ArbiterLink(arbiter, sid), slice_ns=slice_ns)
    arbiter.join(sid, 1.0, gate.granted, gate.revoked)
    return gate


def _holding_inline(gate):
    """An executor on `gate` whose issuing thread holds it with an open inline run."""
    ex, stream = _settled(gate)
    other, release = ex.stream("s1"), threading.Event()
    other.submit("launch", 1, release.wait, kernel=True)     # the pool takes the gate...
    deadline = time.monotonic() + 5
    while not gate._holding and time.monotonic() < deadline:
        time.sleep(0.001)
    assert stream.run_now("launch", 2, lambda: None) >= 0    # ...so a run here holds it
    release.set()
    while not other.idle and time.monotonic() < deadline:   # (not drain: it ends the run)
        time.sleep(0.001)
    time.sleep(0.05)                       # the pool went quiet; the run keeps the gate
    assert gate._holding
    return ex, stream


def _waits(b):
    """`b.enter()` in a thread of its own; the event is set once it got in."""
    entered = threading.Event()

    def kernel():
        b.enter()
        entered.set()
        b.exit(1000)
    t = threading.Thread(target=kernel)
    t.start()
    return t, entered


@pytest.mark.parametrize("how", ["settles", "slice over"])
def test_two_sessions_on_one_arbiter_take_turns_with_inline_runs(how):
    arbiter = DeviceArbiter()
    a = _gated(arbiter, "a", 10**12 if how == "settles" else 50_000_000)
    b = arbiter.local_gate("b", 1.0)
    ex_a, stream_a = _holding_inline(a)
    t, entered = _waits(b)
    assert not entered.wait(0.1)           # a's run holds the device...
    if how == "settles":
        assert stream_a.run_now("launch", 3, lambda: None) >= 0   # (no slice is over)
        ex_a.settle()                      # ...until a has issued all it had
    else:
        time.sleep(0.1)                    # ...until a has held it for its slice (wall
        assert stream_a.run_now("launch", 3, lambda: None) == -1  # time): then queued
    assert entered.wait(5), "b never got the device"
    t.join()
    assert a._running == 0 and b._running == 0
    ex_a.cancel()


# -- the host device's choice --------------------------------------------------------------

@pytest.fixture
def noop():
    dev = CpuBackend().open(0)
    fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
    kernel = dev._functions[fn.id]
    threads: list = []
    run = kernel.run

    def recording(*args):
        threads.append(threading.get_ident())
        run(*args)
    kernel.run = recording
    yield dev, fn, kernel, threads
    dev.close()


def test_a_large_first_launch_is_timed_in_the_pool_then_runs_inline_if_it_was_short(noop):
    dev, fn, kernel, threads = noop
    me = threading.get_ident()
    big = host.FIRST_INLINE_THREADS + 1
    dev.launch(fn, big, 1, [])             # first run, and a large one: in the pool, timed
    dev.synchronize()
    assert threads[-1] != me and kernel.last_ns >= 0 and kernel.last_threads == big
    kernel.last_ns = 0                     # short (a loaded host may make a noop slow)
    dev.launch(fn, big, 1, [])
    assert threads[-1] == me               # run by the time launch returned, here
    dev.launch(fn, big, 2, [])             # more threads than it was timed with: pool
    dev.synchronize()
    assert threads[-1] != me and kernel.last_threads == 2 * big


def test_without_a_gate_a_small_first_launch_runs_inline_and_so_do_the_next(noop):
    dev, fn, kernel, threads = noop
    me = threading.get_ident()
    dev.launch(fn, 1, 1, [])              # never run, and small: here, timed
    assert threads == [me] and kernel.last_ns >= 0 and kernel.last_threads == 1
    kernel.last_ns = 0                     # short (a loaded host may make a noop slow)
    for _ in range(1000):                  # no first run queued ahead of them: here too
        dev.launch(fn, 1, 1, [])
    dev.synchronize()
    assert len(threads) == 1001
    assert sum(t != me for t in threads) <= 20      # (two runs slowed in a row: the pool)


def test_under_a_gate_a_small_first_launch_runs_inline_and_is_timed():
    from harp.tenancy import Tenancy
    backend = CpuBackend()
    gate = DeviceArbiter().local_gate("a", 1.0)
    dev = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 1 << 30, None), gate))
    try:
        fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
        kernel = dev._functions[fn.id]
        ran: list = []
        run = kernel.run
        kernel.run = lambda *args: (ran.append(threading.get_ident()), run(*args))
        dev.settle()                       # as a server's session does
        assert kernel.last_ns < 0          # never run
        dev.launch(fn, 2, 3, [])
        assert ran == [threading.get_ident()] and kernel.last_ns >= 0
        assert kernel.last_threads == 6 and not gate._holding      # beside: not taken
        dev.launch(fn, host.FIRST_INLINE_THREADS, 2, [])  # more threads than timed: pool
        dev.synchronize()
        assert ran[-1] != threading.get_ident()
    finally:
        dev.close()


def test_a_kernel_that_ran_long_goes_back_to_the_pool(noop):
    dev, fn, kernel, threads = noop
    dev.launch(fn, 1, 1, [])
    dev.synchronize()
    kernel.last_ns = host.INLINE_NS        # as if its last runs took that long
    dev.launch(fn, 1, 1, [])
    dev.synchronize()
    assert threads[-1] != threading.get_ident()


def test_a_kernel_goes_back_to_the_pool_after_two_long_inline_runs_in_a_row():
    kernel = host.HostKernel(None, lambda *a: None, "k")
    kernel.ran_inline(100_000, 1)          # cold, or the host took the CPU away
    assert kernel.last_ns == 0             # still short: one long run may be the host's
    kernel.ran_inline(1_000, 1)
    kernel.ran_inline(host.INLINE_NS, 1)
    assert kernel.last_ns == 1_000
    kernel.ran_inline(host.INLINE_NS * 2, 1)
    assert kernel.last_ns >= host.INLINE_NS   # two in a row: the pool


def test_an_inline_kernel_that_fails_is_reported_at_the_next_sync(noop):
    dev, fn, kernel, threads = noop
    dev.launch(fn, 1, 1, [])
    dev.synchronize()
    kernel.last_ns = 0

    def broken(*args):
        raise RuntimeError("kernel fault")
    kernel.run = broken
    dev.launch(fn, 1, 1, [])               # inline: raises nothing here
    with pytest.raises(HarpError) as err:
        dev.synchronize()
    assert err.value.call == "launch"


def test_ctrl_c_in_an_inline_kernel_reaches_the_caller(noop):
    dev, fn, kernel, threads = noop
    dev.launch(fn, 1, 1, [])
    dev.synchronize()
    kernel.last_ns = 0

    def interrupted(*args):
        raise KeyboardInterrupt
    kernel.run = interrupted
    with pytest.raises(KeyboardInterrupt):
        dev.launch(fn, 1, 1, [])


def test_waiting_for_an_event_ends_the_run_a_queued_kernel_needs_the_gate_from():
    # Session a: a kernel queued on stream s behind a long fill, an event recorded after
    # it, then an inline run on the default stream, then `elapsed` on that event. Session
    # b asks for the device meanwhile, and a's slice is used: s's kernel may run only once
    # a's run is over. Were the run still open while `elapsed` waits, neither would move.
    from harp.server.fairshare import SessionGate
    from harp.tenancy import Tenancy
    arbiter = DeviceArbiter()
    gate_a = SessionGate(_ArbiterLink(arbiter, "a"), slice_ns=1)
    arbiter.join("a", 1.0, gate_a.granted, gate_a.revoked)
    gate_b = arbiter.local_gate("b", 1.0)
    backend = CpuBackend()
    dev = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 1 << 30, None), gate_a))
    watchdog = threading.Timer(20, dev.close)      # a hang becomes a failure, not a stall
    try:
        fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
        dev.settle()
        dev.launch(fn, 1, 1, [])
        dev.synchronize()
        dev._functions[fn.id].last_ns = 0          # noop counts as short
        s = dev.stream()
        big = dev.alloc(256 << 20)
        e1, e2 = dev.event(), dev.event()
        dev.record(e1, s)
        dev.fill(big, 1, stream=s)                 # keeps s busy a while...
        dev.launch(fn, 1, 1, [], stream=s)         # ...before its kernel wants the gate
        dev.record(e2, s)
        dev.launch(fn, 1, 1, [])                   # inline: a's run opens
        assert dev._executor._inline is not None
        b_in = threading.Thread(target=lambda: (gate_b.enter(), gate_b.exit(1000),
                                                gate_b.idle()))
        b_in.start()
        watchdog.start()
        assert dev.elapsed(e1, e2) >= 0
        b_in.join(10)
        assert not b_in.is_alive()
    finally:
        watchdog.cancel()
        dev.close()


# -- the server's session settles ----------------------------------------------------------

def test_a_session_settles_after_its_batch_and_before_a_call_that_may_wait():
    from harp import wire
    from harp.protocol import ServerProtocol
    from harp.server.session import Session
    from harp.tenancy import Tenancy
    log: list = []
    gate = _Gate(log=log)
    backend = CpuBackend()
    dev = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 1 << 30, None), gate))
    alloc = dev.alloc

    def logged_alloc(nbytes):
        log.append("alloc")
        return alloc(nbytes)
    dev.alloc = logged_alloc
    session, protocol = Session(dev, "s", 1 << 20), ServerProtocol()
    seq = iter(range(1, 100))

    def batch(*calls):
        sync = calls[-1][0] == wire.SYNCHRONIZE
        return session.handle(protocol.receive(wire.batch_frame(list(calls), sync)))
    batch([wire.LOAD_MODULE, next(seq), 1, "catalog", harp.CATALOG_IMAGE],
          [wire.FUNCTION, next(seq), 2, 1, "noop"],
          [wire.LAUNCH, next(seq), 2, [1, 1, 1], [1, 1, 1], 0, 0, []],
          [wire.SYNCHRONIZE, next(seq), None])
    for kernel in dev._functions.values():
        kernel.last_ns = 0                          # noop counts as short
    ex = dev._executor
    deadline = time.monotonic() + 10                # the warm-up's pool thread lets go
    while ex._idle_threads != ex._threads and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    log.clear()
    batch([wire.LAUNCH, next(seq), 2, [1, 1, 1], [1, 1, 1], 0, 0, []],
          [wire.LAUNCH, next(seq), 2, [1, 1, 1], [1, 1, 1], 0, 0, []],
          [wire.ALLOC, next(seq), 3, 4096],
          [wire.LAUNCH, next(seq), 2, [1, 1, 1], [1, 1, 1], 0, 0, []])
    assert log == ["exit", "alloc", "exit"]         # the run ended before the alloc,
    assert dev._executor._inline is None            # and the next one with the batch
    # A launch refused by the session (an unknown function) or by the device (arguments
    # the kernel does not take) runs nothing, and ends the run: a batch of them cannot
    # hold the gate from a session that waits.
    for bad in ([wire.LAUNCH, 0, 99, [1, 1, 1], [1, 1, 1], 0, 0, []],
                [wire.LAUNCH, 0, 2, [1, 1, 1], [1, 1, 1], 0, 0, [[wire.ARG_SCALAR, 1, "int32"]]]):
        log.clear()
        first = [wire.LAUNCH, next(seq), 2, [1, 1, 1], [1, 1, 1], 0, 0, []]
        bad[1] = next(seq)
        batch(first, bad, [wire.LAUNCH, next(seq), 2, [1, 1, 1], [1, 1, 1], 0, 0, []])
        assert log == ["exit", "exit"], bad
    session.close()


def test_a_session_gate_admits_a_short_kernel_beside_the_holder_unless_curbed():
    arbiter = DeviceArbiter()
    a = arbiter.local_gate("a", 1.0)
    assert a.try_enter() and not a._holding          # beside: nobody's device taken
    a.exit(1000)
    b = arbiter.local_gate("b", 1.0)
    b.enter()                                        # b holds the device...
    assert a.try_enter()                             # ...a's short kernels run beside
    a.exit(1000)
    a.curb()                                         # a got ahead of b
    assert a.curbed and not a.try_enter()
    t, entered = _waits(a)                           # a's kernels wait in line now
    assert not entered.wait(0.1)
    b.exit(1000)
    b.idle()                                         # b is done: a's turn
    assert entered.wait(5)
    t.join()
    assert not a.curbed and a.try_enter()            # its turn came: the curb is lifted
    a.exit(1000)


def test_a_holder_admits_its_inline_run_only_while_nobody_waits():
    arbiter = DeviceArbiter()
    a = arbiter.local_gate("a", 1.0)
    a.enter()
    a.exit(1000)
    assert a._holding and a.try_enter()              # ours, nobody waits
    a.exit(1000)
    b = arbiter.local_gate("b", 1.0)
    t, entered = _waits(b)
    deadline = time.monotonic() + 5
    while not a._revoked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not a.try_enter()                         # b has asked for it back
    a.idle()
    assert entered.wait(5)
    t.join()


def test_short_kernels_beside_a_busy_holder_are_curbed_once_a_slice_ahead():
    """Session a runs short kernels inline while b holds the device with long ones: a's
    charges reach the arbiter as it goes, and once a is a slice of virtual time ahead of
    b its kernels go to the pool and wait for the device like b's."""
    arbiter = DeviceArbiter(slice_ns=5_000_000)
    a = arbiter.local_gate("a", 1.0)
    b = arbiter.local_gate("b", 1.0)
    b.enter()                                        # b's long kernel runs
    ex, stream = _settled(a)
    ran = 0
    while stream.run_now("launch", ran, lambda: time.sleep(0.001)) >= 0 and ran < 20:
        ran += 1                                     # a's short kernels, 1 ms or more
        ex.settle()                                  # a batch done: charged
    assert 1 <= ran <= 6 and a.curbed                # over 5 ms ahead of b: curbed
    assert arbiter.device_ns("a") > 5_000_000        # (a loaded host: fewer, longer runs)
    done = threading.Event()
    stream.submit("launch", 99, done.set, kernel=True)
    assert not done.wait(0.1)                        # in line behind b
    b.exit(20_000_000)                               # b's kernel took 20 ms
    b.idle()
    assert done.wait(5)                              # then a's turn
    assert arbiter.device_ns("a") >= 5_000_000
    ex.cancel()


class _ArbiterLink:
    def __init__(self, arbiter, sid):
        self.arbiter, self.sid = arbiter, sid

    def request(self):
        self.arbiter.request(self.sid)

    def release(self, used_ns, again):
        self.arbiter.release(self.sid, used_ns, again)

    def charge(self, used_ns, beside):
        self.arbiter.charge(self.sid, used_ns, beside)

    def leave(self):
        self.arbiter.leave(self.sid)


def test_a_long_kernel_run_beside_the_holder_is_charged_at_once_and_curbs_the_session():
    """A kernel misjudged short (a first run, or one whose time does not follow its
    threads) runs beside the holder's; it is charged as soon as it is done, not at the
    end of the batch, and the next kernel waits for the device."""
    arbiter = DeviceArbiter(slice_ns=5_000_000)
    h = arbiter.local_gate("h", 1.0)
    a = arbiter.local_gate("a", 1.0)
    h.enter()                                        # h's long kernel runs
    ex, stream = _settled(a)
    assert stream.run_now("launch", 1, lambda: time.sleep(0.02)) >= 0   # 20 ms, beside
    assert arbiter.device_ns("a") >= 20_000_000      # charged already, mid-batch
    assert a.curbed                                  # 4 slices ahead of h
    assert stream.run_now("launch", 2, lambda: None) == -1
    h.exit(1000)
    h.quiet()
    ex.cancel()
