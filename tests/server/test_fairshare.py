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


def test_an_idle_session_cannot_bank_the_time_it_did_not_use():
    policy = FairShare()
    policy.join("a", 0.5)
    policy.join("b", 0.5)
    policy.request("a")
    for _ in range(100):                                # a alone for 100 slices
        policy.release("a", SLICE_NS, again=True)
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
