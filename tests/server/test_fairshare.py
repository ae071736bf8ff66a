"""The fair-share policy on its own: who gets the device, in what proportion (no I/O)."""
from __future__ import annotations

import threading
import time

import pytest

from harp.server.fairshare import SLICE_NS, DeviceArbiter, FairShare


def _run(policy: FairShare, turns: int, busy=("a", "b")) -> None:
    for sid in busy:
        policy.request(sid)
    for _ in range(turns):
        holder = policy.holder
        policy.release(holder, SLICE_NS, again=holder in busy)


def test_busy_sessions_get_device_time_in_the_ratio_of_their_shares():
    policy = FairShare()
    policy.join("a", 0.75)
    policy.join("b", 0.25)
    _run(policy, 400)
    ratio = policy.device_ns("a") / policy.device_ns("b")
    assert ratio == pytest.approx(3.0, rel=0.05)


def test_three_sessions_follow_their_shares():
    policy = FairShare()
    for sid, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        policy.join(sid, share)
    _run(policy, 1000, busy=("a", "b", "c"))
    total = sum(policy.device_ns(s) for s in "abc")
    assert policy.device_ns("a") / total == pytest.approx(0.5, abs=0.02)
    assert policy.device_ns("c") / total == pytest.approx(0.2, abs=0.02)


def test_a_session_alone_keeps_the_device_without_being_asked_to_yield():
    policy = FairShare()
    policy.join("a", 0.1)
    policy.join("b", 0.9)
    assert policy.request("a") == [("grant", "a")]
    assert policy.holder == "a" and not policy.waiting     # nobody revokes it: work-conserving


def test_a_waiting_session_makes_the_holder_yield_once():
    policy = FairShare()
    policy.join("a", 0.5)
    policy.join("b", 0.5)
    policy.request("a")
    assert policy.request("b") == [("revoke", "a")]
    assert policy.request("b") == []                    # asked once
    assert policy.release("a", SLICE_NS, again=True)[0] == ("grant", "b")


def _busy_alone(busy: str, idle: str, slices: int = 100) -> FairShare:
    """Two sessions of equal shares; `busy` has had the device to itself for `slices`."""
    policy = FairShare()
    policy.join(busy, 0.5)
    policy.join(idle, 0.5)
    policy.request(busy)
    for _ in range(slices):
        policy.release(busy, SLICE_NS, again=True)
    return policy


def test_an_idle_session_cannot_bank_the_time_it_did_not_use():
    policy = _busy_alone("a", "b")                      # a alone for 100 slices
    before = policy.device_ns("b")
    _run(policy, 40)                                    # then both: alternating, not b x 100
    assert policy.device_ns("b") - before == pytest.approx(20 * SLICE_NS, abs=2 * SLICE_NS)


def test_a_session_that_leaves_hands_the_device_on():
    policy = FairShare()
    policy.join("a", 0.5)
    policy.join("b", 0.5)
    policy.request("a")
    policy.request("b")
    assert policy.leave("a") == [("grant", "b")]


def test_gates_in_one_process_take_turns_by_share():
    """Two threads saturating a device through `SessionGate`s of one arbiter."""
    arbiter = DeviceArbiter()
    gates = {"a": arbiter.local_gate("a", 0.75), "b": arbiter.local_gate("b", 0.25)}
    stop = time.monotonic() + 1.5

    def busy(gate):
        while time.monotonic() < stop:
            gate.enter()
            t0 = time.perf_counter_ns()
            while time.perf_counter_ns() - t0 < 1_000_000:   # a 1 ms "kernel"
                pass
            gate.exit(time.perf_counter_ns() - t0)
        gate.idle()
    threads = [threading.Thread(target=busy, args=(g,)) for g in gates.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    ratio = arbiter.device_ns("a") / max(1, arbiter.device_ns("b"))
    assert 2.2 <= ratio <= 3.8, ratio


# -- short kernels beside the holder's (`SessionGate.try_enter`) ----------------------------

def test_short_kernels_on_a_device_nobody_waits_for_are_never_curbed():
    policy = FairShare()
    policy.join("a", 0.1)
    for _ in range(100):
        assert policy.charge("a", SLICE_NS, beside=True) == []   # alone: work-conserving
    # ...and a session that asks now starts where a got to, not 100 slices behind it
    policy.join("b", 0.9)
    policy.request("b")
    assert policy.members["b"].vtime == pytest.approx(policy.members["a"].vtime)


def test_short_kernels_beside_a_holder_are_curbed_once_a_slice_ahead():
    policy = FairShare()
    policy.join("h", 0.5)
    policy.join("a", 0.5)
    policy.request("h")                                  # h holds the device
    charged = 0
    while not policy.charge("a", SLICE_NS // 10, beside=True):
        charged += SLICE_NS // 10
        assert charged <= SLICE_NS                       # a slice of device time, no more
    assert charged == SLICE_NS
    assert policy.charge("h", SLICE_NS) == []            # the holder is never curbed
    # a's share weighs its time as it does a holder's: 0.5 of h's virtual pace at 0.25
    policy.join("small", 0.25)
    policy.charge("small", SLICE_NS // 10, beside=True)
    assert policy.members["small"].vtime - policy.members["h"].vtime == \
        pytest.approx(SLICE_NS / 10 / 0.25)


def test_time_charged_as_the_holders_is_never_curbed_even_if_it_arrives_late():
    # a's charge for time it held the device may reach the arbiter after its yield
    policy = FairShare()
    policy.join("h", 0.5)
    policy.join("a", 0.5)
    policy.request("h")
    assert policy.charge("a", 100 * SLICE_NS, beside=False) == []
    assert policy.charge("a", 1, beside=True) == [("curb", "a")]   # beside, it is


def test_short_kernels_cannot_use_time_banked_while_idle():
    policy = _busy_alone("h", "a")                       # h alone for 100 slices
    # a starts from h's virtual time: a slice ahead of it, it is curbed
    assert policy.charge("a", SLICE_NS // 2, beside=True) == []
    assert policy.charge("a", SLICE_NS, beside=True) == [("curb", "a")]


def test_a_holder_that_comes_back_cannot_bank_the_time_others_ran_beside():
    """A host holder lets go once its kernels are done (`SessionGate.quiet`); when it asks
    again, it starts from where the sessions that ran meanwhile got to."""
    policy = FairShare()
    policy.join("h", 0.5)
    policy.join("a", 0.5)
    policy.request("h")
    policy.release("h", SLICE_NS)                        # h went quiet
    for _ in range(100):                                 # a ran 100 slices beside nobody
        assert policy.charge("a", SLICE_NS, beside=True) == []
    policy.request("h")
    assert policy.members["h"].vtime == pytest.approx(policy.members["a"].vtime)
    assert policy.charge("a", SLICE_NS // 2, beside=True) == []      # not curbed at once


def test_a_session_charged_beside_while_curbed_is_curbed_again_and_counted():
    policy = FairShare()
    policy.join("h", 0.5)
    policy.join("a", 0.5)
    policy.request("h")
    assert policy.charge("a", 2 * SLICE_NS, beside=True) == [("curb", "a")]
    assert policy.charge("a", 1000, beside=True) == [("curb", "a")]  # a late run's charge
    assert policy.turns("a") == (0, 2, 1)
    policy.request("a")
    policy.release("h", SLICE_NS)                        # a's turn lifts the curb
    assert policy.holder == "a" and not policy.members["a"].curbed


def test_a_curbed_session_waits_its_turn_in_line():
    arbiter = DeviceArbiter(slice_ns=1_000_000)
    h = arbiter.local_gate("h", 1.0)
    a = arbiter.local_gate("a", 1.0)
    h.enter()
    assert a.try_enter()
    a.exit(3_000_000)          # a's short kernels: 3 ms beside h, charged at once
    assert a.curbed and not a.try_enter()
    got = threading.Event()
    t = threading.Thread(target=lambda: (a.enter(), got.set(), a.exit(1000), a.idle()))
    t.start()
    assert not got.wait(0.1)   # h holds and has not had its slice
    h.exit(5_000_000)          # h's kernel: 5 ms, past a: a's turn
    h.idle()
    assert got.wait(5)
    t.join(5)
    assert not a.curbed


def test_a_session_in_line_runs_no_short_kernel_beside_the_holder():
    arbiter = DeviceArbiter()
    h = arbiter.local_gate("h", 0.9)
    a = arbiter.local_gate("a", 0.1)
    h.enter()
    got = threading.Event()
    t = threading.Thread(target=lambda: (a.enter(), got.set(), a.exit(1000), a.quiet()))
    t.start()                  # a queued kernel of a's waits for the device...
    deadline = time.monotonic() + 5
    while not a._requested and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not a.try_enter()   # ...and so do its short ones
    h.exit(1000)
    h.quiet()
    assert got.wait(5)
    t.join(5)
    assert a.try_enter()       # its turn came and went: beside again
    a.exit(1000)


def test_a_host_holder_lets_go_once_quiet_even_if_nobody_asked():
    arbiter = DeviceArbiter()
    h = arbiter.local_gate("h", 1.0)
    h.enter()
    h.exit(1000)
    h.idle()
    assert h._holding           # idle (a GPU's queue may still run its kernels): kept
    h.quiet()
    assert not h._holding and arbiter.policy.holder is None


def test_a_request_that_overtakes_its_sessions_own_release_is_not_lost():
    """One thread of a holder lets go; another asks again before the release has reached
    the arbiter (links send after the gate's lock is let go). The request finds the
    session still holding: it must count at the release, or the session waits forever."""
    policy = FairShare()
    policy.join("a", 0.5)
    assert policy.request("a") == [("grant", "a")]
    assert policy.request("a") == []                 # overtook the release below
    assert policy.release("a", 1000, again=False) == [("grant", "a")]


def test_a_gate_whose_request_overtakes_its_release_still_gets_the_device():
    arbiter = DeviceArbiter()
    held_back: list = []

    class _SlowRelease:
        def request(self):
            arbiter.request("a")

        def release(self, used_ns, again):
            held_back.append((used_ns, again))       # on its way, late

        def charge(self, used_ns, beside):
            arbiter.charge("a", used_ns, beside)

        def leave(self):
            arbiter.leave("a")
    from harp.server.fairshare import SessionGate
    gate = SessionGate(_SlowRelease())
    arbiter.join("a", 1.0, gate.granted, gate.revoked, gate.curb)
    gate.enter()
    gate.exit(1000)
    gate.quiet()                                     # lets go: the release is late...
    got = threading.Event()
    t = threading.Thread(target=lambda: (gate.enter(), got.set(), gate.exit(1000)))
    t.start()                                        # ...and a kernel asks meanwhile
    deadline = time.monotonic() + 5
    while not gate._requested and time.monotonic() < deadline:
        time.sleep(0.001)
    arbiter.release("a", *held_back.pop())           # the release arrives
    assert got.wait(5), "the session never got the device back"
    t.join(5)


def test_a_worker_cannot_buy_turns_with_negative_device_time():
    """Device time is the worker's own measure, sent on its control channel: the server
    takes a negative one as none."""
    import socket
    from harp.server import ipc
    from harp.server.workers import ControlLoop
    from harp.tenancy import Ledger
    arbiter = DeviceArbiter()
    loop = ControlLoop(Ledger(), {0: arbiter})
    ours, theirs = socket.socketpair()
    try:
        loop.add("w", ipc.Channel(ours), 0, 1.0)
        channel = ipc.Channel(ours)
        loop._handle("w", channel, ipc.CHARGE, ipc.pack([-10**12, True]))
        loop._handle("w", channel, ipc.YIELD, ipc.pack([-10**12, False]))
        assert arbiter.policy.members["w"].vtime >= 0
        assert arbiter.device_ns("w") == 0
    finally:
        loop.remove("w")
        ours.close()
        theirs.close()
