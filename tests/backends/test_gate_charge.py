"""What a host device charges a session's compute gate for a run of kernels: its wall
time, or, when the session has a process of its own, no more than the CPU time that
process used meanwhile (time descheduled on a loaded host is not the session's use)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harp.backends.hoststreams import Executor
from harp.tenancy import ComputeGate

ROOT = Path(__file__).resolve().parents[2]


class _Ledger(ComputeGate):
    """A gate that admits at once and writes down each charge."""

    def __init__(self, own_process: bool) -> None:
        self.own_process = own_process
        self.charged: list[int] = []

    def enter(self) -> None:
        pass

    def exit(self, device_ns: int) -> None:
        self.charged.append(device_ns)


def _charge_for(kernel, own_process: bool) -> int:
    gate = _Ledger(own_process)
    errors: list = []
    executor = Executor("charge", lambda exc, call, seq: errors.append(exc), gate=gate)
    stream = executor.stream("s0")
    stream.submit("launch", 1, kernel, kernel=True)
    stream.drain()
    executor.cancel()
    assert not errors
    return sum(gate.charged)


def _off_cpu():
    time.sleep(0.3)               # a kernel the host took off the CPU for 0.3 s


def _on_cpu():
    a = np.ones(1 << 16)
    t = time.perf_counter()
    while time.perf_counter() - t < 0.3:
        a += 1.0                  # 0.3 s of work on the CPU


def test_a_run_off_the_cpu_is_charged_its_wall_time_in_a_shared_process():
    assert _charge_for(_off_cpu, own_process=False) >= 0.3e9


def test_a_run_off_the_cpu_is_not_charged_in_a_process_of_its_own():
    # In a fresh process, as a worker is: this test's own process may have other tests'
    # threads still running, whose CPU time is this process's too.
    code = ("from tests.backends.test_gate_charge import _charge_for, _off_cpu; "
            "print(_charge_for(_off_cpu, own_process=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, check=True).stdout
    assert int(out) < 0.15e9


def test_a_run_on_the_cpu_is_charged_about_its_time_either_way():
    # at most its wall time; at least most of it unless this host starved the test itself
    for own in (False, True):
        charged = _charge_for(_on_cpu, own_process=own)
        assert 0.05e9 <= charged <= 0.6e9, (own, charged)
