"""Property-based: random sequences of memory calls against a NumPy model of every buffer."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harp

MAX_BYTES = 300
OPS = ("write", "copy", "fill", "read", "alloc", "free", "sync")

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _range(data, size: int, label: str) -> tuple[int, int]:
    """An (offset, nbytes) inside a buffer of `size` bytes."""
    offset = data.draw(st.integers(0, size), label=f"{label} offset")
    nbytes = data.draw(st.integers(0, size - offset), label=f"{label} nbytes")
    return offset, nbytes


class _Session:
    """Live buffers with their models, on one stream of the device."""

    def __init__(self, device, stream):
        self.device, self.stream = device, stream
        self.live: list[tuple[harp.Buffer, np.ndarray]] = []

    def alloc(self, data) -> None:
        size = data.draw(st.integers(0, MAX_BYTES), label="alloc size")
        value = data.draw(st.integers(0, 255), label="initial byte")
        buf = self.device.alloc(size)
        # memory is not guaranteed to be zeroed: give it a known content first
        self.device.fill(buf, value, stream=self.stream)
        self.live.append((buf, np.full(size, value, np.uint8)))

    def pick(self, data, label: str) -> tuple[harp.Buffer, np.ndarray]:
        return self.live[data.draw(st.integers(0, len(self.live) - 1), label=label)]

    def check_all(self) -> None:
        for buf, model in self.live:
            got = self.device.read(buf, 0, buf.nbytes, stream=self.stream)
            assert bytes(got) == model.tobytes()


@pytest.fixture
def side_stream(device):
    """One stream for the whole test (examples share it: sessions cap their stream count)."""
    return device.stream()


@SETTINGS
@given(data=st.data())
def test_random_memory_calls_match_a_model(device, side_stream, data):
    stream = side_stream if data.draw(st.booleans(), label="use a stream") else None
    start_free = device.mem_info().free
    session = _Session(device, stream)
    for _ in range(data.draw(st.integers(1, 3), label="initial buffers")):
        session.alloc(data)
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(st.sampled_from(OPS), label="op")
        if op == "alloc":
            session.alloc(data)
        elif op == "free":
            if len(session.live) > 1:
                i = data.draw(st.integers(0, len(session.live) - 1), label="free which")
                buf, _ = session.live.pop(i)
                device.free(buf)
        elif op == "write":
            buf, model = session.pick(data, "write to")
            offset, nbytes = _range(data, buf.nbytes, "write")
            payload = data.draw(st.binary(min_size=nbytes, max_size=nbytes), label="payload")
            kind = data.draw(st.sampled_from(["bytes", "bytearray", "numpy", "memoryview"]),
                             label="source kind")
            src = {"bytes": payload, "bytearray": bytearray(payload),
                   "numpy": np.frombuffer(payload, np.uint8).copy(),
                   "memoryview": memoryview(bytearray(payload))}[kind]
            device.write(buf, offset, src, stream=stream)
            if kind != "bytes":        # the caller may reuse its buffer at once
                src[:] = b"\xEE" * nbytes if kind != "numpy" else 0xEE
            model[offset:offset + nbytes] = np.frombuffer(payload, np.uint8)
        elif op == "copy":
            dbuf, dmodel = session.pick(data, "copy to")
            sbuf, smodel = session.pick(data, "copy from")
            doff = data.draw(st.integers(0, dbuf.nbytes), label="dst offset")
            soff = data.draw(st.integers(0, sbuf.nbytes), label="src offset")
            nbytes = data.draw(st.integers(0, min(dbuf.nbytes - doff, sbuf.nbytes - soff)),
                               label="copy nbytes")
            device.copy(dbuf, doff, sbuf, soff, nbytes, stream=stream)
            dmodel[doff:doff + nbytes] = smodel[soff:soff + nbytes].copy()
        elif op == "fill":
            buf, model = session.pick(data, "fill")
            value = data.draw(st.integers(0, 255), label="fill value")
            offset = data.draw(st.integers(0, buf.nbytes), label="fill offset")
            if data.draw(st.booleans(), label="fill to the end"):
                device.fill(buf, value, offset, stream=stream)
                model[offset:] = value
            else:
                nbytes = data.draw(st.integers(0, buf.nbytes - offset), label="fill nbytes")
                device.fill(buf, value, offset, nbytes, stream=stream)
                model[offset:offset + nbytes] = value
        elif op == "read":
            buf, model = session.pick(data, "read")
            offset, nbytes = _range(data, buf.nbytes, "read")
            if data.draw(st.booleans(), label="read into out"):
                out = np.full(nbytes + 2, 0xCC, np.uint8)
                device.read(buf, offset, nbytes, out=out, stream=stream)
                assert out[:nbytes].tobytes() == model[offset:offset + nbytes].tobytes()
                assert out[nbytes:].tobytes() == b"\xCC\xCC"
            else:
                got = device.read(buf, offset, nbytes, stream=stream)
                assert bytes(got) == model[offset:offset + nbytes].tobytes()
        elif op == "sync":
            device.synchronize(stream)
    session.check_all()
    for buf, _ in session.live:
        device.free(buf)
    device.synchronize()
    assert device.mem_info().free == start_free
