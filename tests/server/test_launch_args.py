"""The server's launch path keeps the kernel arguments it made from their wire form
(`Session._known_args`) and resolves catalog arguments in one pass: what it keeps must
never change what a launch means."""
from __future__ import annotations

import numpy as np
import pytest

import harp
from harp import wire
from harp.backends.cpu import CpuBackend
from harp.server.session import Session

CATALOG = 1


class _Client:
    """Call records straight into a `Session` on a real cpu device, numbered as a client does."""

    def __init__(self) -> None:
        self.session = Session(CpuBackend().open(0), "args")
        self.seq = 0

    def call(self, op: int, *fields):
        self.seq += 1
        record = [op, self.seq, *fields]
        wire.check_record(record)
        return self.session.execute(record)

    def sync(self):
        reply = self.call(wire.SYNCHRONIZE, None)
        if reply.error is not None:
            raise reply.error

    def read(self, buf: int, nbytes: int) -> bytes:
        reply = self.call(wire.READ, buf, 0, nbytes, 0)
        if reply.error is not None:
            raise reply.error
        return reply.result[1]


def _setup(kernel: str) -> _Client:
    c = _Client()
    c.call(wire.LOAD_MODULE, CATALOG, "catalog", harp.CATALOG_IMAGE)
    c.call(wire.FUNCTION, 2, CATALOG, kernel)
    return c


def _f32(values) -> bytes:
    return np.asarray(values, dtype=np.float32).tobytes()


def test_a_buffer_id_freed_and_bound_again_names_the_new_buffer():
    c = _setup("fill_f32")
    c.call(wire.ALLOC, 10, 16)
    fill = lambda value: c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0,   # noqa: E731
                                [[wire.ARG_BUFFER, 10, 0], [wire.ARG_SCALAR, value, "float32"],
                                 [wire.ARG_SCALAR, 4, "int64"]])
    fill(1.5)
    c.sync()
    assert c.read(10, 16) == _f32([1.5] * 4)
    c.call(wire.FREE, 10)
    c.call(wire.ALLOC, 10, 16)          # the same client id, another buffer
    fill(2.5)
    c.sync()
    assert c.read(10, 16) == _f32([2.5] * 4)


def test_the_same_launch_after_a_buffer_id_is_bound_again_reaches_the_new_buffer():
    c = _setup("fill_f32")
    c.call(wire.ALLOC, 10, 16)
    args = [[wire.ARG_BUFFER, 10, 0], [wire.ARG_SCALAR, 1.5, "float32"],
            [wire.ARG_SCALAR, 4, "int64"]]
    for _ in range(3):                  # a launch loop: the session reuses what it made
        c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0, [list(a) for a in args])
    c.sync()
    c.call(wire.FREE, 10)
    c.call(wire.ALLOC, 10, 16)          # the same client id, a fresh (zeroed) buffer
    c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0, [list(a) for a in args])
    c.sync()
    assert c.read(10, 16) == _f32([1.5] * 4)


def test_equal_arguments_of_other_types_make_the_same_scalars():
    c = _setup("fill_f64")
    c.call(wire.ALLOC, 10, 8)
    for value in (1, 1.0, True, 1, -0.0, 0, -0.0, 0.0):
        c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0,
               [[wire.ARG_BUFFER, 10, 0], [wire.ARG_SCALAR, value, "float64"],
                [wire.ARG_SCALAR, 1, "int64"]])
        c.sync()
        assert c.read(10, 8) == np.float64(value).tobytes(), value


def test_a_launch_on_a_freed_buffer_is_refused_even_after_the_same_launch_ran():
    c = _setup("fill_f32")
    c.call(wire.ALLOC, 10, 16)
    args = [[wire.ARG_BUFFER, 10, 0], [wire.ARG_SCALAR, 1.0, "float32"],
            [wire.ARG_SCALAR, 4, "int64"]]
    c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0, args)
    c.sync()
    c.call(wire.FREE, 10)
    c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0, args)
    reply = c.call(wire.SYNCHRONIZE, None)
    assert isinstance(reply.error, harp.InvalidHandleError)
    assert reply.error.call == "launch"


def test_negative_zero_is_not_taken_for_the_zero_kept_before():
    c = _setup("fill_f32")
    c.call(wire.ALLOC, 10, 4)
    for value in (0.0, -0.0, 0.0, -0.0):
        c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0,
               [[wire.ARG_BUFFER, 10, 0], [wire.ARG_SCALAR, value, "float32"],
                [wire.ARG_SCALAR, 1, "int64"]])
        c.sync()
        assert c.read(10, 4) == _f32([value])       # bytes: the sign of zero kept


def test_the_fast_path_refuses_what_the_checked_path_refuses():
    c = _setup("axpy_f32")
    c.call(wire.ALLOC, 10, 16)
    good = [[wire.ARG_BUFFER, 10, 0], [wire.ARG_BUFFER, 10, 0],
            [wire.ARG_SCALAR, 2.0, "float32"], [wire.ARG_SCALAR, 4, "int64"]]
    bad = {
        "n must be >= 0": [*good[:3], [wire.ARG_SCALAR, -1, "int64"]],
        "alpha must be a float32 scalar, got float64": [*good[:2], [wire.ARG_SCALAR, 2.0, "float64"], good[3]],
        "takes 4 arguments": good[:3],
        "x must be a buffer": [good[0], [wire.ARG_SCALAR, 1, "int64"], *good[2:]],
        "past the end": [good[0], [wire.ARG_BUFFER, 10, 17], *good[2:]],
        "does not fit": [*good[:2], [wire.ARG_SCALAR, 1e300, "float32"], good[3]],
    }
    for why, args in bad.items():
        c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0, good)
        c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0, args)
        reply = c.call(wire.SYNCHRONIZE, None)
        assert isinstance(reply.error, harp.ArgumentError), (why, reply.error)
        assert why in str(reply.error), (why, str(reply.error))


def test_a_session_keeps_a_bounded_number_of_arguments():
    from harp.server import session as session_module
    c = _setup("fill_f32")
    c.call(wire.ALLOC, 10, 4)
    for i in range(session_module._KNOWN_ARGS + 10):
        c.call(wire.LAUNCH, 2, [1, 1, 1], [1, 1, 1], 0, 0,
               [[wire.ARG_BUFFER, 10, 0], [wire.ARG_SCALAR, float(i), "float32"],
                [wire.ARG_SCALAR, 1, "int64"]])
    c.sync()
    assert len(c.session._known_args) <= session_module._KNOWN_ARGS
    assert c.read(10, 4) == _f32([session_module._KNOWN_ARGS + 9])


def test_a_local_device_given_the_same_scalars_again_computes_with_each():
    """The cpu device keeps the NumPy value of each `Scalar` it was given; the same
    objects again, and others equal to them, must give the same results as fresh ones."""
    from harp.backends.cpu import device as cpu_device
    dev = CpuBackend().open(0)
    fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "fill_f32")
    buf = dev.alloc(4 * 8)
    scalars = [harp.Scalar(float(v), "float32") for v in range(cpu_device._KEPT_SCALARS + 5)]
    n = harp.Scalar(8, "int64")
    for round_ in range(2):
        for s in scalars[::97] + [scalars[-1]]:
            dev.launch(fn, 1, 1, [buf, s, n])
            assert dev.read(buf, 0, 32) == _f32([s.value] * 8)
    for s in scalars:
        dev.launch(fn, 1, 1, [buf, s, n])
    dev.synchronize()
    assert len(dev._scalars) <= cpu_device._KEPT_SCALARS
    assert dev.read(buf, 0, 32) == _f32([scalars[-1].value] * 8)
    with pytest.raises(harp.ArgumentError, match="does not fit"):
        dev.launch(fn, 1, 1, [buf, harp.Scalar(1e300, "float32"), n])
        dev.synchronize()
    dev.close()
