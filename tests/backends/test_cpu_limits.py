"""Payloads queued behind busy streams are bounded per session (the cpu backend)."""
from __future__ import annotations

import threading
import time

import numpy as np

import harp
from harp.backends.hoststreams import MAX_QUEUED_BYTES


def _busy(dev, stream, seconds_of_gemm=40):
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = dev.function(lib, "gemm_f64")
    m = 1024
    buf = dev.alloc(m * m * 8)
    for _ in range(seconds_of_gemm):
        dev.launch(gemm, 1, 1, [buf, buf, buf, np.int64(m), np.int64(m), np.int64(m),
                                np.float64(1), np.float64(0)], stream=stream)


def test_writes_queued_behind_work_wait_once_the_bound_is_reached():
    with harp.connect("local:cpu", memory="1GiB") as dev:
        s = dev.stream()
        target = dev.alloc(128 << 20)
        _busy(dev, s)
        highest = [0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                highest[0] = max(highest[0], dev._executor.queued_bytes)
                time.sleep(0.001)
        watcher = threading.Thread(target=watch)
        watcher.start()
        chunk = 64 << 10
        for i in range((128 << 20) // chunk):       # 128 MiB of small writes behind the gemms
            dev.write(target, i * chunk, np.full(chunk, i % 251, np.uint8), stream=s)
        dev.synchronize()
        done.set()
        watcher.join()
        assert 0 < highest[0] <= MAX_QUEUED_BYTES
        got = np.frombuffer(dev.read(target, 0, 128 << 20), np.uint8)
        assert all(got[i * chunk] == i % 251 for i in range(0, (128 << 20) // chunk, 97))


def test_a_closed_session_drops_its_queued_payload():
    dev = harp.connect("local:cpu", memory="1GiB")
    s = dev.stream()
    target = dev.alloc(32 << 20)
    _busy(dev, s)
    for i in range(256):
        dev.write(target, i * (64 << 10), np.ones(64 << 10, np.uint8), stream=s)
    assert dev._executor.queued_bytes > 0
    dev.close()
    assert dev._executor.queued_bytes == 0
