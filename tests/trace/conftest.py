"""Fixtures of the trace tests: workloads recorded on real devices.

`mixed_workload` touches every call of the interface (streams, events, copies,
fills, writes small and chunked, reads, a deferred failure), so a round trip
through record and replay exercises the whole format.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import harp
from harp.cli.demo import workload as demo_workload
from harp.trace import open_trace

HARP = os.path.join(os.path.dirname(sys.executable), "harp")


def mixed_workload(dev: harp.Device, seed: int = 7) -> list[bytes]:
    """Every kind of call, results checked against NumPy; returns what the reads returned."""
    rng = np.random.default_rng(seed)
    n = 100_000                                      # 400 KB: a chunked write on a remote device
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    axpy, scale = dev.function(lib, "axpy_f32"), dev.function(lib, "scale_f32")
    rsum = dev.function(lib, "reduce_sum_f32")
    s1 = dev.stream()
    ev_a, ev_b = dev.event(), dev.event()
    bx, by, bz, bs = dev.alloc(x.nbytes), dev.alloc(y.nbytes), dev.alloc(x.nbytes), dev.alloc(8)
    dev.write(bx, 0, x)
    dev.write(by, 0, y[:1000])                       # a small, inline write
    dev.write(by, 4000, y[1000:], stream=s1)
    dev.record(ev_a, s1)
    dev.wait(harp.Stream(0), ev_a)
    dev.launch(axpy, 64, 256, [by, bx, np.float32(1.5), harp.Scalar(n, "int64")])
    dev.copy(bz, 0, by, 0, y.nbytes)
    dev.fill(bs, 0)
    dev.launch(scale, 64, 256, [harp.BufferArg(bz, 400), harp.BufferArg(bz, 400),
                                np.float32(0.5), np.int64(n - 100)])
    dev.launch(rsum, 1, 1, [bs, bx, np.int64(n)])
    dev.record(ev_b)
    out = [bytes(dev.read(by, 0, y.nbytes)), bytes(dev.read(bz, 0, x.nbytes, stream=s1)),
           bytes(dev.read(bs, 0, 4))]
    dev.elapsed(ev_a, ev_b)
    dev.mem_info()
    want_y = (1.5 * x + y).astype(np.float32)
    assert np.allclose(np.frombuffer(out[0], np.float32), want_y, rtol=1e-6, atol=1e-6)
    dev.free(bs)
    dev.free(bs)                                    # deferred failure, raised at the next sync
    with pytest.raises(harp.InvalidHandleError):
        dev.synchronize()
    for b in (bx, by, bz):
        dev.free(b)
    dev.synchronize()
    return out


def read_digests(path) -> list[tuple[int, bytes]]:
    with open_trace(path) as t:
        return [(c.seq, c["digest"]) for c in t.calls() if c.api == "read" and c.error is None]


@pytest.fixture(scope="session")
def demo_trace(tmp_path_factory):
    """A trace of `harp demo`'s workload on local:cpu, with payloads."""
    path = tmp_path_factory.mktemp("demo") / "demo.harptrace"
    dev = harp.connect("local:cpu", trace=str(path), trace_payloads=True)
    try:
        assert demo_workload(dev, 1 << 16, 64)["ok"]
    finally:
        dev.close()
    return path
