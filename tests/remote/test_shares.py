"""Compute shares, enforced across worker processes on one cpu device.

Shares come from the session's grant (a lease token's `share`); here an
authorizer reads them from the handshake so the test needs no scheduler.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import harp
from harp.server import Grant

from ..conftest import Pool


def _share_from_name(request):
    return Grant(device_index=request.device_index,
                 share=float(request.client_name.split("=")[1]))


@pytest.fixture(params=["process", "thread"])
def share_pool(tmp_path, request):
    pool = Pool(tmp_path, authorizer=_share_from_name, isolation=request.param)
    yield pool
    pool.stop()


def _saturate(dev, seconds, m=320):
    """Keep the device busy with gemms for `seconds`: batches on two streams in turn, each
    waited for only once the other is queued, so work is always waiting on the device."""
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = dev.function(lib, "gemm_f64")
    buf = dev.alloc(m * m * 8)
    args = [buf, buf, buf, np.int64(m), np.int64(m), np.int64(m), np.float64(1), np.float64(0)]
    streams = [dev.stream(), dev.stream()]
    stop = time.monotonic() + seconds
    turn = 0
    while time.monotonic() < stop:
        for _ in range(8):
            dev.launch(gemm, 1, 1, args, stream=streams[turn])
        turn ^= 1
        dev.synchronize(streams[turn])
    dev.synchronize()


def _device_time(pool, dev):
    return next(s["device_time_s"] for s in pool.server.session_stats()
                if s["session"] == dev.session_id)


@pytest.mark.slow      # 10 s of two saturating sessions: in the serial step, not beside other tests
# Process isolation, the default, only: with thread isolation the two sessions' kernels,
# their clients and the server share one interpreter, kernels are charged wall time with
# their waits for it, and one CI run measured a ratio of 2.06 (16 s of device time in 10 s:
# each session's two streams run at once, each charged); thread isolation does not isolate
# tenants and is not what shares are for.
@pytest.mark.parametrize("share_pool", ["process"], indirect=True)
def test_two_busy_sessions_get_device_time_by_their_shares(share_pool):
    """Shares 0.75 and 0.25, both saturating the device for 10 s: device time 3:1 (+-20%)."""
    a = share_pool.connect(client_name="share=0.75")
    b = share_pool.connect(client_name="share=0.25")
    threads = [threading.Thread(target=_saturate, args=(d, 10.0)) for d in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    time.sleep(0.3)                                 # the last charges reach the arbiter
    ta, tb = _device_time(share_pool, a), _device_time(share_pool, b)
    a.close()
    b.close()
    print(f"device time: share 0.75 {ta:.2f} s, share 0.25 {tb:.2f} s, ratio {ta / tb:.2f}")
    assert 2.4 <= ta / tb <= 3.6, (ta, tb)


def test_a_session_alone_gets_the_whole_device(share_pool):
    """Work-conserving: a session of share 0.25 whose neighbour is idle is not held back."""
    busy = share_pool.connect(client_name="share=0.25")
    idle = share_pool.connect(client_name="share=0.75")
    idle.synchronize()
    t0 = time.monotonic()
    _saturate(busy, 3.0)
    wall = time.monotonic() - t0
    time.sleep(0.3)
    used = _device_time(share_pool, busy)
    busy.close()
    idle.close()
    print(f"alone: {used:.2f} s of device time in {wall:.2f} s")
    assert used >= 0.6 * wall                        # held to its share, it would get 0.25


def test_short_kernels_beside_a_busy_session_are_curbed_and_wait_their_turn(share_pool):
    """Session b's noop kernels run in its issuing thread beside a's gemms, without taking
    the device, until b is a slice ahead of a: then the arbiter curbs it (a message to
    b's worker, or a call to its gate), b's next kernel waits for the device in line, and
    b's turn lifts the curb. A session that ignored its curbs would have none of those
    turns: it would run on beside, curbed again at each charge."""
    a = share_pool.connect(client_name="share=0.5")
    b = share_pool.connect(client_name="share=0.5")
    arbiter = share_pool.server.arbiters[0]
    arbiter.policy.slice_ns = 1     # b is curbed as soon as it gets ahead of a at all
    stop = threading.Event()

    def busy():
        lib = a.load_module(harp.CATALOG_IMAGE, "catalog")
        gemm = a.function(lib, "gemm_f64")
        m = 96                      # a millisecond or so each: in the pool, with the device
        buf = a.alloc(m * m * 8)
        args = [buf, buf, buf, np.int64(m), np.int64(m), np.int64(m), np.float64(1),
                np.float64(0)]
        while not stop.is_set():
            for _ in range(4):
                a.launch(gemm, 1, 1, args)
            a.synchronize()
    t = threading.Thread(target=busy)
    t.start()
    try:
        noop = b.function(b.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
        deadline = time.monotonic() + 60
        launched = 0
        while time.monotonic() < deadline and arbiter.turns(b.session_id)[1] < 8:
            for _ in range(256):
                b.launch(noop, 1, 1, [])
            b.synchronize()
            launched += 256
        turns, curbs, late = arbiter.turns(b.session_id)
        row = next(r for r in share_pool.server.session_stats()
                   if r["session"] == b.session_id)
    finally:
        stop.set()
        t.join(30)
    print(f"b: {launched} launches, curbed {curbs} times ({late} charges while curbed), "
          f"{turns} turns")
    assert curbs >= 8, "b was hardly ever curbed"
    assert turns >= curbs // 3, "b's curbs did not send its kernels to wait for the device"
    assert (row["device_turns"], row["curbs"]) == (turns, curbs)     # what operators see
    b.synchronize()                 # nothing was lost on the way
    a.synchronize()
    a.close()
    b.close()
