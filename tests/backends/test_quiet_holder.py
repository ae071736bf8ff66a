"""A session that launched and then went quiet must not keep the device from the others.

On a device whose launches only queue work (a GPU, an OpenCL queue), the launching
thread holds the compute gate just while it queues a kernel. A tenant that launched once
and then did nothing held the device for good: every other session's next launch waited
for a grant that never came. Two sessions share one arbiter here, as on a pool server.
"""
from __future__ import annotations

import threading

import pytest

import harp
from harp.server.fairshare import DeviceArbiter
from harp.tenancy import Tenancy
from stand_ins import backend_or_skip, emulated_cupy


def _backend(name: str):
    if name == "cuda-emulated":
        return backend_or_skip("cuda", memory="64MiB", cupy=emulated_cupy())
    return backend_or_skip(name, memory="64MiB")


@pytest.mark.parametrize("name", ["cuda-emulated", "opencl"])
def test_a_quiet_holder_gives_the_device_to_a_waiting_session(name):
    backend = _backend(name)
    arbiter = DeviceArbiter()
    devices = []
    for sid in ("quiet", "busy"):
        gate = arbiter.local_gate(sid, 0.5)
        devices.append(backend.open(0, tenancy=Tenancy(
            backend.local_memory(0, 64 << 20, None), gate)))
    quiet, busy = devices
    try:
        noop = quiet.function(quiet.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
        quiet.launch(noop, 1, 1, [])          # takes the device, then does nothing more
        assert arbiter.policy.holder == "quiet"

        done = threading.Event()

        def launch_on_busy() -> None:
            fn = busy.function(busy.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
            busy.launch(fn, 1, 1, [])
            busy.synchronize()
            done.set()

        thread = threading.Thread(target=launch_on_busy, daemon=True)
        thread.start()
        assert done.wait(30), "the waiting session never got the device"
        quiet.synchronize()                    # and the quiet one still works
    finally:
        for dev in devices:
            dev.close()
