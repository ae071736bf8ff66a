"""One catalog workload on all four backends gives the same results.

The same program (fills, scale, axpy, elementwise ops, a reduction, a gemm, at
every dtype the catalog has) runs on the cpu backend, the cuda backend on the
CuPy stand-in, the opencl backend (PoCL in CI) and the onnx backend (ONNX
Runtime's CPU provider); integers must agree bit for bit, floats to rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

import harp
from harp import catalog as cat

from stand_ins import backend_or_skip, emulated_cupy

N = 1000
M, K, P = 17, 23, 19


def _open(name: str) -> harp.Device:
    options = {"cupy": emulated_cupy()} if name == "cuda" else {}
    return backend_or_skip(name, memory="1GiB", **options).open(0)


def _workload(dev: harp.Device) -> dict[str, np.ndarray]:
    """Every catalog op at every dtype, chained so that each result feeds the next."""
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    rng = np.random.default_rng(7)
    results: dict[str, np.ndarray] = {}
    for short, dtype in cat.DTYPES.items():
        dt = np.dtype(dtype)
        if dt.kind == "f":
            x = rng.uniform(-2, 2, N).astype(dt)
            y = rng.uniform(-2, 2, N).astype(dt)
        else:
            x = rng.integers(-1000, 1000, N).astype(dt)
            y = rng.integers(-1000, 1000, N).astype(dt)
        bx, by, bo, bs = (dev.alloc(N * dt.itemsize) for _ in range(4))
        dev.write(bx, 0, x)
        dev.write(by, 0, y)
        s = lambda v: harp.Scalar(v, dtype)  # noqa: E731
        n = np.int64(N)

        def run(op, *args):
            dev.launch(dev.function(lib, f"{op}_{short}"), 4, 64, list(args))
        run("fill", bo, s(3), n)
        run("axpy", by, bx, s(3), n)             # y = 3x + y
        run("scale", bo, by, s(2), n)            # o = 2y
        run("add", bo, bo, bx, n)                # o = o + x
        run("sub", bo, bo, by, n)                # o = o - y
        run("mul", bo, bo, bx, n)                # o = o * x
        if short in cat.FLOATS:
            run("div", bo, bo, by, n)            # o = o / y
        run("reduce_sum", bs, bo, n)
        results[f"o_{short}"] = np.frombuffer(dev.read(bo, 0, N * dt.itemsize), dt)
        results[f"sum_{short}"] = np.frombuffer(dev.read(bs, 0, dt.itemsize), dt)
        if short in cat.FLOATS:
            a = rng.uniform(-1, 1, (M, K)).astype(dt)
            b = rng.uniform(-1, 1, (K, P)).astype(dt)
            c = rng.uniform(-1, 1, (M, P)).astype(dt)
            ba, bb, bc = dev.alloc(a.nbytes), dev.alloc(b.nbytes), dev.alloc(c.nbytes)
            dev.write(ba, 0, a)
            dev.write(bb, 0, b)
            dev.write(bc, 0, c)
            dev.launch(dev.function(lib, f"gemm_{short}"), 1, 1,
                       [bc, ba, bb, np.int64(M), np.int64(P), np.int64(K), s(1.5), s(-0.5)])
            results[f"gemm_{short}"] = np.frombuffer(dev.read(bc, 0, c.nbytes), dt)
    dev.synchronize()
    return results


@pytest.fixture(scope="module")
def on_cpu():
    with harp.connect("local:cpu", memory="1GiB") as dev:
        return _workload(dev)


@pytest.mark.parametrize("backend", ["cuda", "opencl", "onnx"])
def test_the_catalog_workload_matches_the_cpu_backend(backend, on_cpu):
    dev = _open(backend)
    try:
        got = _workload(dev)
    finally:
        dev.close()
    assert got.keys() == on_cpu.keys()
    for key, want in on_cpu.items():
        if want.dtype.kind == "f":
            tol = 1e-4 if want.dtype == np.float32 else 1e-10
            np.testing.assert_allclose(got[key], want, rtol=tol, atol=tol, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], want, err_msg=key)
