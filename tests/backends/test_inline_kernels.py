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
from harp.server.fairshare import DeviceArbiter
from harp.tenancy import ComputeGate


class _Gate(ComputeGate):
    """A gate that admits at once, counting what happens to it."""

    def __init__(self, own_process: bool = False) -> None:
        self.own_process = own_process
        self.back = False
        self.entered = self.idled = 0
        self.charged: list[int] = []

    def enter(self) -> None:
        self.entered += 1

    def exit(self, device_ns: int) -> None:
        self.charged.append(device_ns)

    def idle(self) -> None:
        self.idled += 1

    def wants_back(self, running_ns: int = 0) -> bool:
        return self.back


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


def test_a_run_whose_slice_is_over_gives_the_gate_back_and_waits_its_turn_again():
    gate = _Gate()
    ex, stream, _ = _executor(gate)
    ex.settle()
    assert stream.run_now("launch", 1, lambda: None) >= 0
    gate.back = True                      # someone waits and the slice is used
    assert stream.run_now("launch", 2, lambda: None) >= 0
    assert len(gate.charged) == 1 and gate.entered == 2      # given back, entered again
    ex.cancel()


def test_queueing_work_ends_the_run_first():
    gate = _Gate()
    ex, stream, _ = _executor(gate)
    ex.settle()
    assert stream.run_now("launch", 1, lambda: None) >= 0
    stream.submit("launch", 2, lambda: None, kernel=True)
    assert len(gate.charged) >= 1         # the run was charged before the pool's kernel
    stream.drain()
    ex.cancel()


def test_a_descheduled_run_in_its_own_process_is_charged_no_more_than_its_cpu():
    gate = _Gate(own_process=True)
    ex, stream, _ = _executor(gate)
    ex.settle()
    assert stream.run_now("launch", 1, lambda: time.sleep(0.2)) >= 0.2e9
    ex.settle()
    # (the test's process may run other threads meanwhile: far from 0.2 s all the same)
    assert gate.charged[0] < 0.1e9
    ex.cancel()


def test_two_sessions_on_one_arbiter_take_turns_with_inline_runs():
    arbiter = DeviceArbiter()
    a, b = arbiter.local_gate("a", 1.0), arbiter.local_gate("b", 1.0)
    ex_a, stream_a, _ = _executor(a)
    ex_b, stream_b, _ = _executor(b)
    ex_a.settle()
    ex_b.settle()
    ran: list = []
    assert stream_a.run_now("launch", 1, lambda: ran.append("a")) >= 0   # a has the device
    b_issuer = threading.Thread(
        target=lambda: stream_b.run_now("launch", 1, lambda: ran.append("b")))
    b_issuer.start()
    b_issuer.join(0.3)
    assert b_issuer.is_alive() and ran == ["a"]   # b waits its turn: a's run holds it...
    ex_a.settle()                                 # ...until a has issued all it had
    b_issuer.join(5)
    assert not b_issuer.is_alive() and ran == ["a", "b"], "b never got the device"
    ex_b.settle()
    ex_a.cancel()
    ex_b.cancel()


def test_a_session_closed_while_its_issuer_waits_for_the_gate_runs_nothing_more():
    arbiter = DeviceArbiter()
    a, b = arbiter.local_gate("a", 1.0), arbiter.local_gate("b", 1.0)
    b.enter()                                      # b holds the device
    ex_a, stream_a, _ = _executor(a)
    ex_a.settle()
    ran: list = []
    got: list = []
    issuer = threading.Thread(
        target=lambda: got.append(stream_a.run_now("launch", 1, lambda: ran.append(1))))
    issuer.start()
    issuer.join(0.3)
    assert issuer.is_alive()                       # waiting for b to let go
    ex_a.cancel()                                  # the session closes, as a device does:
    a.close()                                      # queues dropped, then its gate
    issuer.join(5)
    assert not issuer.is_alive() and got == [-1] and ran == []
    b.exit(1000)


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


def test_a_kernel_runs_inline_once_it_is_known_short(noop):
    dev, fn, kernel, threads = noop
    me = threading.get_ident()
    dev.launch(fn, 1, 1, [])               # first run: in the pool, timed
    dev.synchronize()
    assert threads[-1] != me and 0 <= kernel.last_ns < host.INLINE_NS
    dev.launch(fn, 1, 1, [])
    assert threads[-1] == me               # run by the time launch returned, here
    dev.launch(fn, 8, 32, [])              # more threads than it was timed with: pool
    dev.synchronize()
    assert threads[-1] != me


def test_a_kernel_that_ran_long_goes_back_to_the_pool(noop):
    dev, fn, kernel, threads = noop
    dev.launch(fn, 1, 1, [])
    dev.synchronize()
    kernel.last_ns = host.INLINE_NS        # as if its last run took that long
    dev.launch(fn, 1, 1, [])
    dev.synchronize()
    assert threads[-1] != threading.get_ident()


def test_an_inline_kernel_that_fails_is_reported_at_the_next_sync(noop):
    dev, fn, kernel, threads = noop
    dev.launch(fn, 1, 1, [])
    dev.synchronize()

    def broken(*args):
        raise RuntimeError("kernel fault")
    kernel.run = broken
    dev.launch(fn, 1, 1, [])               # inline: raises nothing here
    with pytest.raises(HarpError) as err:
        dev.synchronize()
    assert err.value.call == "launch"


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
    try:
        fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
        dev.settle()
        dev.launch(fn, 1, 1, [])
        dev.synchronize()                          # noop is known short now
        s = dev.stream()
        big = dev.alloc(256 << 20)
        e1, e2 = dev.event(), dev.event()
        dev.record(e1, s)
        dev.fill(big, 1, stream=s)                 # keeps s busy a while...
        dev.launch(fn, 1, 1, [], stream=s)         # ...before its kernel wants the gate
        dev.record(e2, s)
        dev.launch(fn, 1, 1, [])                   # inline: a's run opens
        b_in = threading.Thread(target=lambda: (gate_b.enter(), gate_b.exit(1000),
                                                gate_b.idle()))
        b_in.start()
        result: list = []
        waiter = threading.Thread(target=lambda: result.append(dev.elapsed(e1, e2)))
        waiter.start()
        waiter.join(20)
        assert not waiter.is_alive(), "elapsed waited on a kernel that waited on its run"
        assert result and result[0] >= 0
        b_in.join(10)
    finally:
        dev.close()


class _ArbiterLink:
    def __init__(self, arbiter, sid):
        self.arbiter, self.sid = arbiter, sid

    def request(self):
        self.arbiter.request(self.sid)

    def release(self, used_ns, again):
        self.arbiter.release(self.sid, used_ns, again)

    def charge(self, used_ns):
        self.arbiter.charge(self.sid, used_ns)

    def leave(self):
        self.arbiter.leave(self.sid)
