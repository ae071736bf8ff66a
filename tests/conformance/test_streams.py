"""Streams and events: in-order streams, cross-stream ordering, timing, synchronize."""
from __future__ import annotations

import time

import numpy as np
import pytest

import harp

MiB = 1 << 20
BIG = 64 * MiB


def _slow_work(device, catalog, stream, src, dst):
    """Slow-ish work on `stream` that ends with dst == src (a gemm and 64 MiB copies)."""
    device.fill(dst, 0x11, stream=stream)
    n = 320
    ab, c = device.alloc(2 * n * n * 4), device.alloc(n * n * 4)
    device.fill(ab, 0x3F, stream=stream)        # floats of about 0.747
    gemm = device.function(catalog, "gemm_f32")
    device.launch(gemm, (10, 10), (32, 32), [
        harp.BufferArg(c), harp.BufferArg(ab), harp.BufferArg(ab, n * n * 4),
        np.int64(n), np.int64(n), np.int64(n), np.float32(1), np.float32(0)], stream=stream)
    for _ in range(2):
        device.copy(dst, 0, src, 0, src.nbytes, stream=stream)
    return c


def _pattern_buffer(device, nbytes):
    data = (np.arange(nbytes // 4, dtype=np.uint32) * np.uint32(2654435761)).view(np.uint8)
    buf = device.alloc(nbytes)
    device.write(buf, 0, data)
    device.synchronize()
    return buf, data


def test_default_stream_runs_in_order(device):
    buf = device.alloc(4 * 100)
    for i in range(100):
        device.write(buf, 0, np.array([i] * 100, dtype=np.int32))
        device.write(buf, 4 * (i % 100), np.array([1000 + i], dtype=np.int32))
    got = np.frombuffer(device.read(buf, 0, 400), np.int32)
    expected = np.full(100, 99, np.int32)
    expected[99] = 1099
    np.testing.assert_array_equal(got, expected)


def test_one_stream_runs_in_order(device, catalog):
    s = device.stream()
    n = 256
    x, y = device.alloc(n * 4 + 8), device.alloc(n * 4 + 8)
    fill = device.function(catalog, "fill_i32")
    axpy = device.function(catalog, "axpy_i32")
    device.fill(x, 0, stream=s)
    device.launch(fill, 1, 64, [harp.BufferArg(x, 8), np.int32(1), np.int64(n)], stream=s)
    device.write(y, 8, np.zeros(n, np.int32), stream=s)
    expected = np.zeros(n, np.int64)
    for i in range(1, 31):
        device.launch(axpy, 1, 64, [harp.BufferArg(y, 8), harp.BufferArg(x, 8), np.int32(i),
                                    np.int64(n)], stream=s)
        expected += i
        if i % 10 == 0:   # writes interleaved with kernels
            device.write(y, 8, np.full(4, -5, np.int32), stream=s)
            expected[:4] = -5
    got = np.frombuffer(device.read(y, 8, n * 4, stream=s), np.int32)
    np.testing.assert_array_equal(got, expected)


def test_copies_and_fills_on_a_stream_run_in_order(device):
    s = device.stream()
    a, b = device.alloc(4096), device.alloc(4096)
    model_a, model_b = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
    device.fill(a, 0, stream=s)
    device.fill(b, 0, stream=s)
    for i in range(50):
        device.fill(a, i, i * 10, 100, stream=s)
        model_a[i * 10:i * 10 + 100] = i
        device.copy(b, i * 7, a, i * 13, 300, stream=s)
        model_b[i * 7:i * 7 + 300] = model_a[i * 13:i * 13 + 300]
    assert device.read(b, 0, 4096, stream=s) == model_b.tobytes()
    assert device.read(a, 0, 4096, stream=s) == model_a.tobytes()


def test_cross_stream_wait_on_event(device, catalog):
    src, data = _pattern_buffer(device, BIG)
    dst, dst2 = device.alloc(BIG), device.alloc(BIG)
    a, b = device.stream(), device.stream()
    done = device.event()
    _slow_work(device, catalog, a, src, dst)
    device.record(done, a)
    device.wait(b, done)
    # b: read and copy the result of a's work; both must see a's data
    device.copy(dst2, 0, dst, 0, BIG, stream=b)
    head = device.read(dst, 0, 4096, stream=b)
    assert head == data[:4096].tobytes()
    got = np.empty(BIG, np.uint8)
    device.read(dst2, 0, BIG, out=got, stream=b)
    assert np.array_equal(got, data)


def test_cross_stream_wait_orders_writes_from_b_after_a(device, catalog):
    src, data = _pattern_buffer(device, BIG)
    dst = device.alloc(BIG)
    a, b = device.stream(), device.stream()
    ev = device.event()
    _slow_work(device, catalog, a, src, dst)
    device.record(ev, a)
    device.wait(b, ev)
    device.write(dst, 0, b"written by b", stream=b)   # must land after a's copies
    device.synchronize()
    assert device.read(dst, 0, 12) == b"written by b"
    assert device.read(dst, 12, 4084) == data[12:4096].tobytes()


def test_wait_on_event_never_recorded_does_not_block(device):
    s = device.stream()
    ev = device.event()
    buf = device.alloc(8)
    device.wait(s, ev)
    device.write(buf, 0, b"12345678", stream=s)
    assert device.read(buf, 0, 8, stream=s) == b"12345678"


def test_wait_uses_latest_recording(device):
    a, b = device.stream(), device.stream()
    ev = device.event()
    buf = device.alloc(BIG)
    device.record(ev, a)
    device.fill(buf, 7, stream=a)
    device.fill(buf, 9, stream=a)
    device.record(ev, a)              # re-recorded after the fills
    device.wait(b, ev)
    assert device.read(buf, BIG - 4, 4, stream=b) == b"\x09" * 4


def test_elapsed_measures_work(device, catalog):
    src, _ = _pattern_buffer(device, BIG)
    dst = device.alloc(BIG)
    s = device.stream()
    e0, e1, e2 = device.event(), device.event(), device.event()
    t0 = time.perf_counter()
    device.record(e0, s)
    for _ in range(4):
        device.copy(dst, 0, src, 0, BIG, stream=s)
    device.record(e1, s)
    device.record(e2, s)
    device.synchronize(s)
    wall_ms = (time.perf_counter() - t0) * 1e3
    ms = device.elapsed(e0, e1)
    assert isinstance(ms, float)
    assert ms > 0
    assert ms <= wall_ms * 1.5 + 5
    # e1 and e2 are back to back: (almost) no time between them
    assert 0 <= device.elapsed(e1, e2) <= ms
    assert device.elapsed(e0, e0) == pytest.approx(0, abs=1e-3)
    assert device.elapsed(e0, e2) >= ms


def test_elapsed_across_streams(device):
    a, b = device.stream(), device.stream()
    e0, e1 = device.event(), device.event()
    buf = device.alloc(BIG)
    device.record(e0, a)
    device.fill(buf, 1, stream=a)
    device.wait(b, e0)
    device.fill(buf, 2, stream=b)
    device.record(e1, b)
    assert device.elapsed(e0, e1) >= 0


def test_elapsed_without_synchronize_waits_for_the_events(device):
    buf = device.alloc(BIG)
    e0, e1 = device.event(), device.event()
    device.record(e0)
    device.fill(buf, 3)
    device.record(e1)
    assert device.elapsed(e0, e1) >= 0     # a sync call: waits for e1 itself
    assert device.read(buf, 0, 4) == b"\x03" * 4


def test_elapsed_on_event_never_recorded_is_an_error(device):
    recorded, never = device.event(), device.event()
    device.record(recorded)
    with pytest.raises(harp.HarpError) as ei:
        device.elapsed(recorded, never)
    assert ei.value.call == "elapsed"
    with pytest.raises(harp.HarpError):
        device.elapsed(never, recorded)
    device.synchronize()
    buf = device.alloc(4)
    device.write(buf, 0, b"ok!!")
    assert device.read(buf, 0, 4) == b"ok!!"


def test_synchronize_one_stream(device):
    s = device.stream()
    buf = device.alloc(BIG)
    device.fill(buf, 0x5A, stream=s)
    device.write(buf, BIG - 3, b"end", stream=s)
    device.synchronize(s)
    # the work on s is done, so another stream sees it without any event
    t = device.stream()
    assert device.read(buf, BIG - 4, 4, stream=t) == b"\x5aend"
    assert device.read(buf, 0, 4) == b"\x5a" * 4


def test_synchronize_all_streams(device):
    streams = [device.stream() for _ in range(4)]
    bufs = [device.alloc(8 * MiB) for _ in streams]
    for i, (s, b) in enumerate(zip(streams, bufs)):
        device.fill(b, i + 1, stream=s)
        device.write(b, 0, bytes([i]) * 4, stream=s)
    device.synchronize()
    for i, b in enumerate(bufs):
        assert device.read(b, 0, 5) == bytes([i]) * 4 + bytes([i + 1])
        assert device.read(b, 8 * MiB - 1, 1) == bytes([i + 1])


def test_synchronize_default_stream_handle(device):
    buf = device.alloc(16)
    device.write(buf, 0, b"x" * 16)
    device.synchronize(harp.Stream(0))
    assert device.read(buf, 0, 16) == b"x" * 16


def test_many_streams(device):
    n = 32
    streams = [device.stream() for _ in range(n)]
    buf = device.alloc(n * 4)
    for i, s in enumerate(streams):
        device.write(buf, 4 * i, np.array([i], np.int32), stream=s)
    device.synchronize()
    np.testing.assert_array_equal(np.frombuffer(device.read(buf, 0, n * 4), np.int32),
                                  np.arange(n))
