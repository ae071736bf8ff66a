"""Memory calls: write/read round trips, copy, fill and mem_info accounting."""
from __future__ import annotations

import array

import numpy as np
import pytest

import harp

MiB = 1 << 20

# (payload size, odd offset into the buffer)
ROUND_TRIP_SIZES = [0, 1, 7, 4095, 65537, MiB + 3]
GUARD = 0xA5   # the byte around the written range, which must survive the write


def _pattern(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed + n).integers(0, 256, n, dtype=np.uint8).tobytes()


def _guarded_buffer(device, offset: int, n: int, tail: int = 5) -> harp.Buffer:
    buf = device.alloc(offset + n + tail)
    device.fill(buf, GUARD)
    return buf


def _check_guards(device, buf: harp.Buffer, offset: int, n: int) -> None:
    head = device.read(buf, 0, offset)
    tail = device.read(buf, offset + n, buf.nbytes - offset - n)
    assert bytes(head) == bytes([GUARD]) * offset
    assert bytes(tail) == bytes([GUARD]) * (buf.nbytes - offset - n)


# -- round trips -----------------------------------------------------------------

@pytest.mark.parametrize("n", ROUND_TRIP_SIZES)
@pytest.mark.parametrize("offset", [1, 3, 4097])
def test_round_trip_fresh_out(device, n, offset):
    data = _pattern(n)
    buf = _guarded_buffer(device, offset, n)
    device.write(buf, offset, data)
    got = device.read(buf, offset, n)
    assert isinstance(got, bytes)                    # without `out`: immutable bytes, one copy
    assert len(got) == n
    assert got == data
    _check_guards(device, buf, offset, n)
    device.free(buf)
    device.synchronize()


@pytest.mark.parametrize("n", ROUND_TRIP_SIZES)
def test_round_trip_into_bytearray_out(device, n):
    offset = 3
    data = _pattern(n, 1)
    buf = _guarded_buffer(device, offset, n)
    device.write(buf, offset, data)
    out = bytearray(b"\x77" * (n + 9))      # larger than needed: only the first n bytes change
    got = device.read(buf, offset, n, out=out)
    assert got is out
    assert out[:n] == data
    assert out[n:] == b"\x77" * 9


@pytest.mark.parametrize("n", ROUND_TRIP_SIZES)
def test_round_trip_into_numpy_out(device, n):
    offset = 5
    data = _pattern(n, 2)
    buf = _guarded_buffer(device, offset, n)
    device.write(buf, offset, data)
    out = np.full(n, 0x33, dtype=np.uint8)
    got = device.read(buf, offset, n, out=out)
    assert got is out
    assert out.tobytes() == data


def test_read_into_typed_numpy_out(device):
    x = np.linspace(-3, 3, 1001, dtype=np.float64).reshape(7, 143)
    buf = device.alloc(x.nbytes + 11)
    device.write(buf, 11, x)
    out = np.zeros_like(x)
    got = device.read(buf, 11, x.nbytes, out=out)
    assert got is out
    np.testing.assert_array_equal(out, x)
    # a float32 view of part of it
    f = np.zeros(10, dtype=np.float32)
    device.read(buf, 11, 40, out=f)
    np.testing.assert_array_equal(f, x.reshape(-1)[:20].view(np.uint8)[:40].view(np.float32))


@pytest.mark.slow
def test_round_trip_256mib(device):
    n = 256 * MiB
    offset = 3
    data = np.arange(n // 8, dtype=np.uint64)
    data ^= data >> np.uint64(3)
    buf = device.alloc(n + offset + 1)
    device.write(buf, offset, data)
    got = device.read(buf, offset, n)
    assert len(got) == n
    assert np.array_equal(np.frombuffer(got, np.uint64), data)
    out = np.empty(n, np.uint8)
    device.read(buf, offset, n, out=out)
    assert np.array_equal(out.view(np.uint64), data)
    device.free(buf)
    device.synchronize()


# -- the kinds of source a write accepts ------------------------------------------

def _sources(raw: bytes):
    arr = np.frombuffer(raw, np.uint8).copy()
    yield "bytes", raw
    yield "bytearray", bytearray(raw)
    yield "numpy-u8", arr
    yield "numpy-f32-2d", arr.view(np.float32).reshape(4, -1)
    yield "numpy-readonly", np.frombuffer(raw, np.uint8)
    yield "memoryview", memoryview(bytearray(raw))
    yield "memoryview-slice", memoryview(b"xx" + raw + b"yy")[2:-2]
    yield "memoryview-of-numpy", memoryview(arr.view(np.int16))
    yield "array.array", array.array("d", raw)


def test_write_accepts_buffer_protocol_sources(device):
    raw = _pattern(64 * 4, 3)
    buf = device.alloc(len(raw) + 7)
    for name, src in _sources(raw):
        device.fill(buf, 0)
        device.write(buf, 7, src)
        assert device.read(buf, 7, len(raw)) == raw, name
        assert device.read(buf, 0, 7) == bytes(7), name


def test_write_source_may_be_reused_at_once(device):
    # Keep the default stream busy so the writes are still queued behind work
    # when the caller scribbles over its sources.
    big = device.alloc(64 * MiB)
    big2 = device.alloc(64 * MiB)
    for _ in range(3):
        device.copy(big2, 0, big, 0, 64 * MiB)
        device.fill(big, 1)
    raw = _pattern(4096, 4)
    sources = [bytearray(raw), np.frombuffer(raw, np.uint8).copy(), memoryview(bytearray(raw))]
    bufs = []
    for src in sources:
        b = device.alloc(len(raw))
        device.write(b, 0, src)
        bufs.append(b)
        # mutate the source right after write returns
        if isinstance(src, np.ndarray):
            src[:] = 0
        else:
            src[:] = b"\x00" * len(raw)
    for b in bufs:
        assert device.read(b, 0, len(raw)) == raw


def test_free_with_work_still_queued(device):
    """Work issued before a free still runs; the free is no error."""
    s = device.stream()
    big = device.alloc(64 * MiB)
    for _ in range(3):
        device.fill(big, 2, stream=s)
    buf = device.alloc(4096)
    device.write(buf, 0, _pattern(4096, 11), stream=s)
    device.copy(buf, 0, big, 0, 4096, stream=s)
    device.free(buf)
    device.free(big)
    device.synchronize()
    after = device.mem_info()
    again = device.alloc(4096)
    device.write(again, 0, b"q" * 4096, stream=s)
    assert device.read(again, 0, 4096, stream=s) == b"q" * 4096
    device.free(again)
    assert device.mem_info() == after


def test_write_later_overwrites_earlier(device):
    buf = device.alloc(16)
    device.write(buf, 0, b"a" * 16)
    device.write(buf, 4, b"b" * 8)
    device.write(buf, 6, b"c" * 2)
    assert device.read(buf, 0, 16) == b"aaaabbccbbbbaaaa"


# -- copy ------------------------------------------------------------------------

@pytest.mark.parametrize("dst_off,src_off,n", [
    (0, 0, 100), (13, 1, 77), (1, 13, 77), (0, 99, 1), (50, 50, 0), (0, 0, 0),
])
def test_copy_between_buffers(device, dst_off, src_off, n):
    a = np.frombuffer(_pattern(101, 5), np.uint8).copy()
    b = np.frombuffer(_pattern(131, 6), np.uint8).copy()
    ba, bb = device.alloc(a.size), device.alloc(b.size)
    device.write(ba, 0, a)
    device.write(bb, 0, b)
    device.copy(bb, dst_off, ba, src_off, n)
    b[dst_off:dst_off + n] = a[src_off:src_off + n]
    assert device.read(bb, 0, b.size) == b.tobytes()
    assert device.read(ba, 0, a.size) == a.tobytes()


@pytest.mark.parametrize("dst_off,src_off,n", [
    (0, 1, 999), (1, 0, 999), (10, 500, 400), (500, 10, 400), (100, 150, 300),
    (150, 100, 300), (7, 7, 993), (0, 0, 1000),
])
def test_copy_overlapping_within_one_buffer(device, dst_off, src_off, n):
    """Overlapping ranges behave like memmove: the result is as if the source were read first."""
    model = np.frombuffer(_pattern(1000, 7), np.uint8).copy()
    buf = device.alloc(model.size)
    device.write(buf, 0, model)
    device.copy(buf, dst_off, buf, src_off, n)
    model[dst_off:dst_off + n] = model[src_off:src_off + n].copy()
    assert device.read(buf, 0, model.size) == model.tobytes()


def test_copy_large(device):
    n = 8 * MiB + 5
    src = np.frombuffer(_pattern(n, 8), np.uint8)
    a, b = device.alloc(n + 3), device.alloc(n + 1)
    device.write(a, 3, src)
    device.copy(b, 1, a, 3, n)
    assert device.read(b, 1, n) == src.tobytes()


# -- fill ------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, 0x7F, 0x80, 0xFF])
def test_fill_whole_buffer_by_default(device, value):
    buf = device.alloc(333)
    device.write(buf, 0, _pattern(333, 9))
    device.fill(buf, value)
    assert device.read(buf, 0, 333) == bytes([value]) * 333


@pytest.mark.parametrize("offset,nbytes", [
    (0, None), (5, None), (332, None), (333, None), (0, 0), (17, 0), (17, 100), (0, 333),
    (1, 331),
])
def test_fill_offset_and_length(device, offset, nbytes):
    model = np.frombuffer(_pattern(333, 10), np.uint8).copy()
    buf = device.alloc(model.size)
    device.write(buf, 0, model)
    if nbytes is None:
        device.fill(buf, 0xEE, offset)
        model[offset:] = 0xEE
    else:
        device.fill(buf, 0xEE, offset, nbytes)
        model[offset:offset + nbytes] = 0xEE
    assert device.read(buf, 0, model.size) == model.tobytes()


def test_fill_keyword_arguments(device):
    model = np.zeros(64, np.uint8)
    buf = device.alloc(64)
    device.fill(buf, 0)
    device.fill(buf, value=9, offset=10, nbytes=5)
    model[10:15] = 9
    device.fill(buf, 3, nbytes=2)
    model[:2] = 3
    device.fill(buf, 4, offset=60)
    model[60:] = 4
    assert device.read(buf, 0, 64) == model.tobytes()


def test_zero_size_buffer(device):
    buf = device.alloc(0)
    device.write(buf, 0, b"")
    device.fill(buf, 1)
    device.copy(buf, 0, buf, 0, 0)
    assert device.read(buf, 0, 0) == b""
    device.free(buf)
    device.synchronize()


# -- mem_info accounting -----------------------------------------------------------

def test_mem_info_accounting(device):
    before = device.mem_info()
    assert 0 <= before.free <= before.total
    sizes = [1, 4096, 3 * MiB + 1]
    bufs = []
    expected = before.free
    for n in sizes:
        bufs.append(device.alloc(n))
        device.synchronize()
        expected -= n
        assert device.mem_info().free == expected
        assert device.mem_info().total == before.total
    for b, n in zip(bufs, sizes):
        device.free(b)
        device.synchronize()
        expected += n
        assert device.mem_info().free == expected
    assert device.mem_info() == before


def test_alloc_beyond_capacity_fails_cleanly(device):
    info = device.mem_info()
    huge = device.alloc(info.total + 1)    # returns at once: the failure is deferred
    assert isinstance(huge, harp.Buffer)
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()
    err = ei.value
    assert isinstance(err, (harp.OutOfMemoryError, harp.QuotaError)), type(err)
    assert err.call == "alloc"
    assert err.seq == 2          # mem_info was call 1, alloc call 2
    assert "alloc" in str(err)
    # nothing leaked, and the device is still usable
    assert device.mem_info() == info
    buf = device.alloc(100)
    device.write(buf, 0, b"z" * 100)
    assert device.read(buf, 0, 100) == b"z" * 100
    device.free(buf)
    device.synchronize()
    assert device.mem_info() == info


def test_alloc_beyond_capacity_then_use_of_failed_handle(device):
    info = device.mem_info()
    huge = device.alloc(info.total + 1)
    with pytest.raises(harp.HarpError):
        device.synchronize()
    # the handle of a failed allocation is not a buffer
    device.write(huge, 0, b"abc")
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()
    assert ei.value.call == "write"
    device.synchronize()
