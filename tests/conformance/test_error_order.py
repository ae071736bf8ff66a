"""Deferred errors surface in the same order, with the same names, on every device."""
from __future__ import annotations

import time

import numpy as np
import pytest

import harp


def test_a_refused_sync_call_raises_earlier_failures_first(device):
    buf = device.alloc(16)                      # 1
    device.free(buf)                            # 2
    device.alloc(1 << 50)                       # 3: fails, deferred
    with pytest.raises(harp.HarpError) as info:
        device.read(buf, 0, 8)                  # 4: a freed buffer, but #3 comes first
    assert (info.value.call, info.value.seq) == ("alloc", 3)
    device.synchronize()                        # nothing left over
    device.alloc(1 << 50)                       # 6
    with pytest.raises(harp.HarpError) as info:
        device.synchronize(harp.Stream(12345))  # 7: a forged stream
    assert (info.value.call, info.value.seq) == ("alloc", 6)


def test_close_drops_queued_work_and_frees_at_once(device):
    """The one close rule of every device: close does not wait for queued work; it drops
    what has not started, and the session's calls end. (On a GPU, work already handed to
    the device may finish after close; its memory is reused only after it.)"""
    if str(device.info.extra.get("cupy_version", "")).endswith("harp.emulation"):
        pytest.skip("the host stand-in for CuPy runs each kernel when it is launched: its work "
                    "waits in front of the close, not in a device queue that close can drop")
    s = device.stream()
    ev = device.event()
    other = device.stream()
    lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = device.function(lib, "gemm_f64")
    m = 512                                     # 1000 gemms: several seconds of work
    a = device.alloc(m * m * 8)
    device.record(ev, other)
    issued = time.monotonic()
    for _ in range(1000):                       # about 5 s of queued work on the cpu device;
        device.launch(gemm, 1, 1, [a, a, a, np.int64(m), np.int64(m), np.int64(m),
                                   np.float64(1), np.float64(0)], stream=s)
        if time.monotonic() - issued > 1.0:     # a device that runs launches as they come
            break                               # (an emulation) has no queue to speak of
    t0 = time.monotonic()
    device.close()
    assert time.monotonic() - t0 < 1.5          # not run: dropped
