"""Immediate errors (raised at the call) and deferred errors (raised at the next sync call).

Immediate: shape and type errors that need no device state (harp/frontend.py):
a negative size, a range past the end of the buffer (the handle carries its
size), a value of the wrong type. Deferred: everything that needs the device's
handle tables — a freed buffer, a double free, a handle the session never
issued — raised at the next *sync* call as an error naming the failed call
(API name and sequence number; every call is numbered from 1 in issue order,
sync calls included).
"""
from __future__ import annotations

import numpy as np
import pytest

import harp

FORGED_BUFFER = harp.Buffer(id=12345, nbytes=16)
FORGED_STREAM = harp.Stream(id=54321)
FORGED_EVENT = harp.Event(id=77777)
FORGED_MODULE = harp.Module(id=88888, format="catalog")
FORGED_FUNCTION = harp.Function(id=99999, name="noop")


def _assert_usable(device):
    """The session still works: no error pending, and a round trip succeeds."""
    device.synchronize()
    buf = device.alloc(10)
    device.write(buf, 0, b"0123456789")
    assert device.read(buf, 2, 5) == b"23456"
    device.free(buf)
    device.synchronize()


# -- immediate errors --------------------------------------------------------------

def _immediate_cases(device, buf, other):
    """(description, expected exception, call) triples; buf has 16 bytes, other 8."""
    s = device.stream()
    ev = device.event()
    A, T = harp.ArgumentError, TypeError
    return [
        # alloc
        ("alloc negative", A, lambda: device.alloc(-1)),
        ("alloc float", T, lambda: device.alloc(1.5)),
        ("alloc str", T, lambda: device.alloc("16")),
        ("alloc None", T, lambda: device.alloc(None)),
        # write
        ("write past end", A, lambda: device.write(buf, 10, b"x" * 7)),
        ("write at end+1", A, lambda: device.write(buf, 17, b"")),
        ("write too long", A, lambda: device.write(buf, 0, b"x" * 17)),
        ("write negative offset", A, lambda: device.write(buf, -1, b"x")),
        ("write float offset", T, lambda: device.write(buf, 1.0, b"x")),
        ("write not a buffer", T, lambda: device.write("buf", 0, b"x")),
        ("write stream as buffer", T, lambda: device.write(s, 0, b"x")),
        ("write int data", T, lambda: device.write(buf, 0, 1234)),
        ("write str data", T, lambda: device.write(buf, 0, "text")),
        ("write bad stream", T, lambda: device.write(buf, 0, b"x", stream=buf)),
        ("write non-contiguous", A,
         lambda: device.write(buf, 0, np.zeros(8, np.uint8)[::2])),
        # read
        ("read past end", A, lambda: device.read(buf, 8, 9)),
        ("read offset past end", A, lambda: device.read(buf, 17, 0)),
        ("read negative nbytes", A, lambda: device.read(buf, 0, -1)),
        ("read negative offset", A, lambda: device.read(buf, -3, 1)),
        ("read float nbytes", T, lambda: device.read(buf, 0, 4.0)),
        ("read not a buffer", T, lambda: device.read(ev, 0, 4)),
        ("read out too small", A, lambda: device.read(buf, 0, 8, out=bytearray(7))),
        ("read out readonly", A, lambda: device.read(buf, 0, 8, out=bytes(8))),
        ("read out not a buffer", T, lambda: device.read(buf, 0, 8, out=[0] * 8)),
        ("read out non-contiguous", A,
         lambda: device.read(buf, 0, 4, out=np.zeros(8, np.uint8)[::2])),
        ("read bad stream", T, lambda: device.read(buf, 0, 8, stream=ev)),
        # copy
        ("copy dst past end", A, lambda: device.copy(other, 1, buf, 0, 8)),
        ("copy src past end", A, lambda: device.copy(buf, 0, other, 4, 5)),
        ("copy both past end", A, lambda: device.copy(buf, 16, other, 8, 1)),
        ("copy negative nbytes", A, lambda: device.copy(buf, 0, other, 0, -1)),
        ("copy negative dst offset", A, lambda: device.copy(buf, -1, other, 0, 1)),
        ("copy negative src offset", A, lambda: device.copy(buf, 0, other, -1, 1)),
        ("copy dst not a buffer", T, lambda: device.copy(b"dst", 0, other, 0, 1)),
        ("copy src not a buffer", T, lambda: device.copy(buf, 0, 5, 0, 1)),
        ("copy bad stream", T, lambda: device.copy(buf, 0, other, 0, 1, stream="s")),
        # fill
        ("fill past end", A, lambda: device.fill(buf, 0, 10, 7)),
        ("fill offset past end", A, lambda: device.fill(buf, 0, 17)),
        ("fill negative offset", A, lambda: device.fill(buf, 0, -1)),
        ("fill negative nbytes", A, lambda: device.fill(buf, 0, 0, -1)),
        ("fill value 256", A, lambda: device.fill(buf, 256)),
        ("fill value -1", A, lambda: device.fill(buf, -1)),
        ("fill not a buffer", T, lambda: device.fill(other.id, 0)),
        ("fill bad stream", T, lambda: device.fill(buf, 0, stream=0)),
        # free
        ("free not a buffer", T, lambda: device.free(12345)),
        ("free stream", T, lambda: device.free(s)),
        # code
        ("load_module bad image type", T, lambda: device.load_module(12345, "catalog")),
        ("function bad module", T, lambda: device.function("catalog", "noop")),
        ("launch bad function", T, lambda: device.launch("noop", 1, 1, [])),
        ("launch zero grid", A, lambda: device.launch(FORGED_FUNCTION, 0, 1, [])),
        ("launch negative block", A, lambda: device.launch(FORGED_FUNCTION, 1, (-1,), [])),
        ("launch 4-d grid", A, lambda: device.launch(FORGED_FUNCTION, (1, 1, 1, 1), 1, [])),
        ("launch python int arg", T, lambda: device.launch(FORGED_FUNCTION, 1, 1, [3])),
        ("launch python float arg", T, lambda: device.launch(FORGED_FUNCTION, 1, 1, [2.5])),
        ("launch str args", T, lambda: device.launch(FORGED_FUNCTION, 1, 1, "abc")),
        ("launch object arg", T, lambda: device.launch(FORGED_FUNCTION, 1, 1, [object()])),
        ("launch negative shared", A,
         lambda: device.launch(FORGED_FUNCTION, 1, 1, [], shared_mem=-1)),
        # order
        ("record not an event", T, lambda: device.record(s, s)),
        ("record bad stream", T, lambda: device.record(ev, ev)),
        ("wait not a stream", T, lambda: device.wait(ev, ev)),
        ("wait not an event", T, lambda: device.wait(s, s)),
        ("elapsed not events", T, lambda: device.elapsed(s, ev)),
        ("synchronize bad stream", T, lambda: device.synchronize(ev)),
    ]


def test_immediate_errors(device):
    buf, other = device.alloc(16), device.alloc(8)
    device.write(buf, 0, bytes(range(16)))
    device.write(other, 0, b"abcdefgh")
    device.synchronize()
    for what, exc_type, call in _immediate_cases(device, buf, other):
        with pytest.raises(exc_type) as ei:
            call()
        if exc_type is harp.ArgumentError:
            assert isinstance(ei.value, harp.HarpError), what
            assert isinstance(ei.value, ValueError), what
        # an immediate error leaves nothing behind for the next sync call
        device.synchronize()
        # and did not touch the buffers
        assert device.read(buf, 0, 16) == bytes(range(16)), what
        assert device.read(other, 0, 8) == b"abcdefgh", what
    _assert_usable(device)


def test_scalar_needs_dtype_error_message(device):
    with pytest.raises(TypeError, match="dtype"):
        device.launch(FORGED_FUNCTION, 1, 1, [7])


def test_numpy_integer_sizes_are_accepted(device):
    buf = device.alloc(np.int64(32))
    assert buf.nbytes == 32
    device.write(buf, np.int32(4), b"abcd")
    device.fill(buf, 1, np.uint16(8), np.int64(2))
    assert device.read(buf, np.int64(4), np.int64(6)) == b"abcd\x01\x01"


# -- deferred errors ---------------------------------------------------------------

def test_write_to_freed_buffer_is_deferred(device):
    buf = device.alloc(16)                  # 1
    device.free(buf)                        # 2
    device.write(buf, 0, b"abcd")           # 3: returns at once
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()                # 4
    err = ei.value
    assert err.call == "write"
    assert err.seq == 3
    assert "write" in str(err)
    assert "3" in str(err)
    assert isinstance(err, harp.ArgumentError)
    # raised once only
    device.synchronize()                    # 5
    _assert_usable(device)


def test_double_free_is_deferred(device):
    buf = device.alloc(16)                  # 1
    device.free(buf)                        # 2
    device.free(buf)                        # 3
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()                # 4
    assert ei.value.call == "free"
    assert ei.value.seq == 3
    assert "free" in str(ei.value)
    device.synchronize()
    _assert_usable(device)


def test_sequence_numbers_count_every_call(device):
    a = device.alloc(8)                     # 1
    s = device.stream()                     # 2
    e = device.event()                      # 3
    device.write(a, 0, b"12345678", stream=s)  # 4
    device.record(e, s)                     # 5
    device.wait(harp.Stream(0), e)          # 6
    assert device.read(a, 0, 8, stream=s) == b"12345678"  # 7
    device.synchronize(s)                   # 8
    device.mem_info()                       # 9
    device.fill(a, 0)                       # 10
    device.copy(a, 0, a, 4, 4)              # 11
    device.free(FORGED_BUFFER)              # 12
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()                # 13
    assert (ei.value.call, ei.value.seq) == ("free", 12)
    module = device.load_module(harp.CATALOG_IMAGE, "catalog")  # 14
    device.function(module, "noop")        # 15
    device.function(module, "no_such_kernel")  # 16
    with pytest.raises(harp.HarpError) as ei:
        device.read(a, 0, 8)                # 17
    assert (ei.value.call, ei.value.seq) == ("function", 16)


def test_calls_that_fail_at_once_are_numbered_too(device):
    buf = device.alloc(16)                  # 1
    with pytest.raises(harp.ArgumentError):
        device.write(buf, 100, b"x")        # 2: fails at once, but is a call
    with pytest.raises(TypeError):
        device.launch(FORGED_FUNCTION, 1, 1, [3])   # 3
    device.free(FORGED_BUFFER)              # 4
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()                # 5
    assert (ei.value.call, ei.value.seq) == ("free", 4)


@pytest.mark.parametrize("n_before", [0, 1, 5])
def test_sequence_number_of_deferred_error(device, n_before):
    buf = device.alloc(64)                  # 1
    for i in range(n_before):               # 2 .. 1+n_before
        device.write(buf, i, b"x")
    s = device.stream()                     # 2+n_before
    e = device.event()                      # 3+n_before
    device.record(e, s)                     # 4+n_before
    assert device.read(buf, 0, 1) == (b"x" if n_before else b"\x00")  # 5+n_before
    device.fill(FORGED_BUFFER, 1)           # 6+n_before
    device.write(buf, 0, b"y", stream=s)    # 7+n_before
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()                # 8+n_before
    assert ei.value.call == "fill"
    assert ei.value.seq == 6 + n_before
    assert f"#{6 + n_before}" in str(ei.value) or str(6 + n_before) in str(ei.value)
    device.synchronize()
    assert device.read(buf, 0, 1) == b"y"


@pytest.mark.parametrize("case", [
    "write", "read-next", "copy-src", "copy-dst", "fill", "free",
])
def test_forged_buffer_handle_is_deferred(device, case):
    good = device.alloc(16)                 # 1
    device.write(good, 0, b"g" * 16)        # 2
    f = FORGED_BUFFER
    if case == "write":
        device.write(f, 0, b"abcd")         # 3
    elif case == "read-next":
        device.write(f, 4, b"abcd")         # 3
    elif case == "copy-src":
        device.copy(good, 0, f, 0, 16)      # 3
    elif case == "copy-dst":
        device.copy(f, 0, good, 0, 16)      # 3
    elif case == "fill":
        device.fill(f, 7)                   # 3
    elif case == "free":
        device.free(f)                      # 3
    call = {"read-next": "write", "copy-src": "copy", "copy-dst": "copy"}.get(case, case)
    with pytest.raises(harp.InvalidHandleError) as ei:
        if case == "read-next":
            device.read(good, 0, 16)        # 4: a read is a sync call too
        else:
            device.synchronize()            # 4
    assert ei.value.call == call
    assert ei.value.seq == 3
    assert call in str(ei.value)
    # the good buffer is untouched and the session goes on
    assert device.read(good, 0, 16) == b"g" * 16
    device.synchronize()
    _assert_usable(device)


def test_read_of_forged_buffer_raises_at_the_read(device):
    device.alloc(4)                         # 1
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.read(FORGED_BUFFER, 0, 16)   # 2: sync, so it raises here
    assert ei.value.call == "read"
    assert ei.value.seq == 2
    device.synchronize()
    _assert_usable(device)


def test_read_of_freed_buffer_raises_at_the_read(device):
    b = device.alloc(4)                     # 1
    device.free(b)                          # 2
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.read(b, 0, 4)                # 3
    assert ei.value.call == "read"
    assert ei.value.seq == 3
    _assert_usable(device)


def test_forged_handles_of_every_kind(device):
    buf = device.alloc(16)                              # 1
    cases = [
        ("write", lambda: device.write(buf, 0, b"x", stream=FORGED_STREAM)),
        ("fill", lambda: device.fill(buf, 0, stream=FORGED_STREAM)),
        ("copy", lambda: device.copy(buf, 0, buf, 8, 8, stream=FORGED_STREAM)),
        ("record", lambda: device.record(FORGED_EVENT)),
        ("record", lambda: device.record(device.event(), FORGED_STREAM)),
        ("wait", lambda: device.wait(FORGED_STREAM, device.event())),
        ("wait", lambda: device.wait(harp.Stream(0), FORGED_EVENT)),
        ("function", lambda: device.function(FORGED_MODULE, "noop")),
        ("launch", lambda: device.launch(FORGED_FUNCTION, 1, 1, [])),
    ]
    for call, issue in cases:
        issue()
        with pytest.raises(harp.InvalidHandleError) as ei:
            device.synchronize()
        assert ei.value.call == call, ei.value
        assert call in str(ei.value)
        device.synchronize()
    _assert_usable(device)


def test_launch_with_freed_buffer_argument(device, catalog):
    fn = device.function(catalog, "fill_i32")
    buf = device.alloc(64)
    device.free(buf)
    device.launch(fn, 1, 32, [harp.BufferArg(buf, 0), np.int32(1), np.int64(16)])
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()
    assert ei.value.call == "launch"
    assert ei.value.seq == 5
    _assert_usable(device)


@pytest.mark.parametrize("case", ["write", "fill", "fill-past-real-end", "copy-dst", "copy-src",
                                  "read"])
def test_handle_claiming_more_bytes_than_allocated(device, case):
    """A handle is checked against the real allocation, not the size the handle claims.

    The id is real but the size is forged: every range past the real end is a
    deferred ArgumentError naming the call, and nothing is written.
    """
    real = device.alloc(16)                             # 1
    other = device.alloc(64)                            # 2
    device.write(real, 0, b"r" * 16)                    # 3
    device.write(other, 0, b"o" * 64)                   # 4
    device.synchronize()                                # 5
    forged = harp.Buffer(real.id, 64)
    call = case.split("-")[0]
    if case == "read":
        with pytest.raises(harp.ArgumentError) as ei:
            device.read(forged, 0, 32)                  # 6
    else:
        if case == "write":
            device.write(forged, 8, b"w" * 20)          # 6
        elif case == "fill":
            device.fill(forged, 0x42, 8)                # 6
        elif case == "fill-past-real-end":
            device.fill(forged, 0x43, 32)               # 6
        elif case == "copy-dst":
            device.copy(forged, 0, other, 0, 64)        # 6
        elif case == "copy-src":
            device.copy(other, 0, forged, 8, 16)        # 6
        with pytest.raises(harp.ArgumentError) as ei:
            device.synchronize()                        # 7
    assert ei.value.call == call
    assert ei.value.seq == 6
    assert device.read(real, 0, 16) == b"r" * 16
    assert device.read(other, 0, 64) == b"o" * 64
    _assert_usable(device)


def test_synchronize_on_forged_stream(device):
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize(FORGED_STREAM)   # 1
    assert ei.value.call == "synchronize"
    assert ei.value.seq == 1
    _assert_usable(device)


SYNC_CALLS = {
    "synchronize": lambda d, ctx: d.synchronize(),
    "synchronize-stream": lambda d, ctx: d.synchronize(ctx["stream"]),
    "read": lambda d, ctx: d.read(ctx["buf"], 0, 4),
    "mem_info": lambda d, ctx: d.mem_info(),
    "elapsed": lambda d, ctx: d.elapsed(ctx["e0"], ctx["e1"]),
}


@pytest.mark.parametrize("sync", sorted(SYNC_CALLS))
def test_every_sync_call_raises_a_pending_error(device, sync):
    buf = device.alloc(4)                   # 1
    s = device.stream()                     # 2
    e0, e1 = device.event(), device.event()  # 3, 4
    device.record(e0, s)                    # 5
    device.record(e1, s)                    # 6
    device.synchronize()                    # 7
    device.write(FORGED_BUFFER, 0, b"abc")  # 8
    ctx = {"buf": buf, "stream": s, "e0": e0, "e1": e1}
    with pytest.raises(harp.InvalidHandleError) as ei:
        SYNC_CALLS[sync](device, ctx)       # 9
    assert ei.value.call == "write"
    assert ei.value.seq == 8
    # raised once: the same sync call now succeeds
    SYNC_CALLS[sync](device, ctx)
    device.synchronize()
    _assert_usable(device)


def test_earliest_deferred_error_is_raised_first(device):
    buf = device.alloc(8)                   # 1
    device.free(buf)                        # 2
    device.fill(buf, 1)                     # 3 fails
    device.copy(buf, 0, buf, 0, 4)          # 4 fails
    device.free(buf)                        # 5 fails
    with pytest.raises(harp.InvalidHandleError) as ei:
        device.synchronize()                # 6
    assert ei.value.call == "fill"
    assert ei.value.seq == 3
    # the session is not stuck: eventually sync calls succeed and work goes on
    for _ in range(3):
        try:
            device.synchronize()
            break
        except harp.InvalidHandleError:
            pass
    _assert_usable(device)


def test_async_calls_do_not_raise_deferred_errors(device):
    """Only sync calls raise a pending error; later async calls return normally."""
    buf = device.alloc(8)
    device.free(FORGED_BUFFER)
    # a run of async calls after the failure: none raises
    device.write(buf, 0, b"abcdefgh")
    device.fill(buf, 0x41, 4)
    device.copy(buf, 0, buf, 4, 2)
    s = device.stream()
    e = device.event()
    device.record(e)
    device.wait(s, e)
    with pytest.raises(harp.InvalidHandleError):
        device.synchronize()
    # the work queued after the failed call still ran
    assert device.read(buf, 0, 8) == b"AAcdAAAA"
