"""numba `@cuda.jit` kernels through the "numba-python" image format.

Skipped on devices that do not list the format. The cpu backend runs these in
Numba's CUDA simulator, where every thread is a Python thread: grids stay small.
"""
from __future__ import annotations

import numpy as np
import pytest

import harp

SAXPY = '''
from numba import cuda

@cuda.jit
def saxpy(out, x, y, a, n):
    i = cuda.grid(1)
    if i < n:
        out[i] = a * x[i] + y[i]
'''

BLOCK_SUM = '''
from numba import cuda, float32

BLOCK = 64

@cuda.jit
def block_sum(out, x, n):
    partial = cuda.shared.array(BLOCK, float32)
    tid = cuda.threadIdx.x
    i = cuda.blockIdx.x * cuda.blockDim.x + tid
    if i < n:
        partial[tid] = x[i]
    else:
        partial[tid] = 0
    cuda.syncthreads()
    stride = BLOCK // 2
    while stride > 0:
        if tid < stride:
            partial[tid] += partial[tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        out[cuda.blockIdx.x] = partial[0]
'''

HISTOGRAM = '''
import numba
from numba import cuda

@cuda.jit
def histogram(bins, x, n, nbins):
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, n, step):
        cuda.atomic.add(bins, x[i] % nbins, 1)


@cuda.jit(device=True)
def helper(v):
    return v


@cuda.jit
def scale2d(m, alpha):
    r, c = cuda.grid(2)
    if r < m.shape[0] and c < m.shape[1]:
        m[r, c] = helper(m[r, c]) * alpha
'''


def _kernel(device, source: str, name: str) -> harp.Function:
    module = device.load_module(source, "numba-python")
    return device.function(module, name)


def test_saxpy(numba_device, rng):
    device = numba_device
    n = 100
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    a = np.float32(2.5)
    xb, yb, ob = device.alloc(x.nbytes + 8), device.alloc(y.nbytes + 16), device.alloc(n * 4 + 4)
    device.write(xb, 8, x)
    device.write(yb, 16, y)
    device.fill(ob, 0)
    fn = _kernel(device, SAXPY, "saxpy")
    device.launch(fn, 2, 64, [harp.ArrayArg(ob, "float32", (n,), offset=4),
                              harp.ArrayArg(xb, "float32", (n,), offset=8),
                              harp.ArrayArg(yb, np.float32, (n,), offset=16),
                              a, np.int64(n)])
    got = np.frombuffer(device.read(ob, 4, n * 4), np.float32)
    np.testing.assert_allclose(got, a * x + y, rtol=1e-5, atol=1e-6)
    # the inputs are untouched, and so is the byte before out
    assert device.read(ob, 0, 4) == bytes(4)
    np.testing.assert_array_equal(np.frombuffer(device.read(xb, 8, x.nbytes), np.float32), x)


def test_shared_memory_block_reduction(numba_device, rng):
    device = numba_device
    n, blocks = 200, 4
    x = rng.uniform(-1, 1, n).astype(np.float32)
    xb, ob = device.alloc(x.nbytes), device.alloc(blocks * 4)
    device.write(xb, 0, x)
    device.fill(ob, 0xFF)
    fn = _kernel(device, BLOCK_SUM, "block_sum")
    device.launch(fn, blocks, 64, [harp.ArrayArg(ob, "float32", (blocks,)),
                                   harp.ArrayArg(xb, "float32", (n,)), np.int32(n)])
    got = np.frombuffer(device.read(ob, 0, blocks * 4), np.float32)
    padded = np.zeros(blocks * 64, np.float32)
    padded[:n] = x
    np.testing.assert_allclose(got, padded.reshape(blocks, 64).sum(axis=1), rtol=1e-5, atol=1e-5)


def test_atomic_histogram(numba_device, rng):
    device = numba_device
    n, nbins = 500, 16
    x = rng.integers(0, 1000, n).astype(np.int32)
    xb, bb = device.alloc(x.nbytes + 12), device.alloc(nbins * 4)
    device.write(xb, 12, x)
    device.fill(bb, 0)
    fn = _kernel(device, HISTOGRAM, "histogram")
    device.launch(fn, 2, 32, [harp.ArrayArg(bb, "int32", (nbins,)),
                              harp.ArrayArg(xb, "int32", (n,), offset=12),
                              np.int32(n), np.int32(nbins)])
    got = np.frombuffer(device.read(bb, 0, nbins * 4), np.int32)
    np.testing.assert_array_equal(got, np.bincount(x % nbins, minlength=nbins))
    assert got.sum() == n


def test_two_dimensional_array_and_device_function(numba_device, rng):
    device = numba_device
    m = rng.standard_normal((6, 10)).astype(np.float64)
    buf = device.alloc(m.nbytes)
    device.write(buf, 0, m)
    fn = _kernel(device, HISTOGRAM, "scale2d")
    device.launch(fn, (1, 2), (8, 8), [harp.ArrayArg(buf, "float64", m.shape), np.float64(-2)])
    got = np.frombuffer(device.read(buf, 0, m.nbytes), np.float64).reshape(m.shape)
    np.testing.assert_allclose(got, -2 * m, rtol=1e-12)


def test_numba_and_catalog_mix_in_stream_order(numba_device, catalog):
    device = numba_device
    n = 64
    s = device.stream()
    xb, yb, ob = device.alloc(n * 4), device.alloc(n * 4), device.alloc(n * 4)
    fill = device.function(catalog, "fill_f32")
    saxpy = _kernel(device, SAXPY, "saxpy")
    device.launch(fill, 1, 64, [harp.BufferArg(xb), np.float32(3), np.int64(n)], stream=s)
    device.launch(fill, 1, 64, [harp.BufferArg(yb), np.float32(1), np.int64(n)], stream=s)
    arr = lambda b: harp.ArrayArg(b, "float32", (n,))  # noqa: E731
    device.launch(saxpy, 1, 64, [arr(ob), arr(xb), arr(yb), np.float32(2), np.int64(n)], stream=s)
    got = np.frombuffer(device.read(ob, 0, n * 4, stream=s), np.float32)
    np.testing.assert_array_equal(got, np.full(n, 7, np.float32))


def test_unknown_numba_kernel_name_is_deferred(numba_device):
    device = numba_device
    module = device.load_module(SAXPY, "numba-python")   # 1
    device.function(module, "not_there")                 # 2
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                             # 3
    assert ei.value.call == "function" and ei.value.seq == 2
    device.synchronize()


def test_broken_numba_source_is_deferred(numba_device):
    device = numba_device
    device.load_module("def broken(:\n", "numba-python")  # 1
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                              # 2
    assert ei.value.call == "load_module" and ei.value.seq == 1
    device.synchronize()


def test_kernel_fault_is_deferred_and_session_survives(numba_device):
    device = numba_device
    n = 8
    buf = device.alloc(n * 4)
    fn = _kernel(device, SAXPY, "saxpy")                  # 2, 3
    # out has 8 elements but n says 40: the kernel indexes past its array
    device.launch(fn, 1, 40, [harp.ArrayArg(buf, "float32", (n,))] * 3
                  + [np.float32(1), np.int64(40)])        # 4
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                              # 5
    assert ei.value.call == "launch" and ei.value.seq == 4
    device.synchronize()
    device.fill(buf, 0)
    device.launch(fn, 1, 8, [harp.ArrayArg(buf, "float32", (n,))] * 3
                  + [np.float32(1), np.int64(n)])
    assert device.read(buf, 0, n * 4) == bytes(n * 4)


def test_array_that_does_not_fit_its_buffer_is_deferred(numba_device):
    device = numba_device
    buf = device.alloc(16)
    fn = _kernel(device, SAXPY, "saxpy")
    big = harp.ArrayArg(buf, "float32", (100,))
    device.launch(fn, 1, 4, [big, big, big, np.float32(1), np.int64(4)])
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()
    assert ei.value.call == "launch"
    device.synchronize()


RAISES = '''
from numba import cuda

@cuda.jit
def raises(out):
    if cuda.grid(1) == 0:
        raise ValueError("bad value")
'''

PACKED = '''
from numba import cuda

@cuda.jit
def modulus(out, z):
    out[0] = abs(z)

def __harp_args__(args):
    return [args[0], complex(args[1], args[2])]
'''


def test_a_kernels_exception_is_worded_for_its_type(numba_device):
    """The shim raises the kernel's own exception type again (harp.errors.kernel_exception)."""
    device = numba_device
    buf = device.alloc(8)
    device.launch(_kernel(device, RAISES, "raises"), 1, 2,
                  [harp.ArrayArg(buf, "float64", (1,))])
    with pytest.raises(harp.DeviceError) as ei:
        device.synchronize()
    kernel, name, message = harp.errors.kernel_exception(ei.value)
    assert (kernel, name) == ("raises", "ValueError") and message.endswith("bad value")
    device.synchronize()


def test_a_modules_harp_args_rebuild_the_launchs_arguments(numba_device):
    device = numba_device
    buf = device.alloc(8)
    out = harp.ArrayArg(buf, "float64", (1,))
    device.launch(_kernel(device, PACKED, "modulus"), 1, 1,
                  [out, np.float64(3.0), np.float64(4.0)])
    assert np.frombuffer(device.read(buf, 0, 8), np.float64)[0] == 5.0
    # a rebuild that fails is the launch's deferred error, named
    broken = PACKED.replace("return [args[0], complex(args[1], args[2])]", "return 42")
    device.launch(_kernel(device, broken, "modulus"), 1, 1, [out, np.float64(3.0)])
    with pytest.raises(harp.ArgumentError, match="could not rebuild the launch's arguments"):
        device.synchronize()
    device.synchronize()
