"""The cuda backend on a real GPU (the `gpu` marker: skipped without one).

The conformance suite already runs on `local-cuda` and `remote-cuda` (tests/conftest.py).
These add what only a GPU shows: device facts from CUDA and NVML, the catalog at
sizes and launch shapes that stress the GPU kernels, kernels from every image
format (cuda-source, PTX, CUBIN, numba's PTX with array arguments), argument
checks that keep a bad launch off the GPU, a kernel fault (in a subprocess,
because a fault loses the process's CUDA context), and PyTorch operators (`aten`)
run by torch on the GPU over the session's buffers, on its stream, with torch's
own memory bounded (where torch with CUDA is installed).

Written without a GPU: none of this has run on one yet.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import harp
from harp.backends.cuda import nvml, nvrtc

pytestmark = pytest.mark.gpu

SAXPY = r'''
extern "C" __global__ void saxpy(float* out, const float* x, const float* y, float a, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i] + y[i];
}
'''


@pytest.fixture(params=["local", "remote"])
def gpu(request):
    """A session on GPU 0, in this process and through a pool server."""
    if request.param == "local":
        dev = harp.connect("local:cuda", memory="4GiB")
    else:
        pool = request.getfixturevalue("cuda_pool_server")
        dev = harp.connect(pool.url, tls=pool.client_tls)
    try:
        yield dev
    finally:
        dev.close()


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _cc(dev) -> tuple[int, int]:
    return tuple(dev.info.compute_capability)


def _driver_runs_nvrtc_ptx(dev) -> bool:
    """PTX from this NVRTC needs a driver at least as new (the driver JIT-compiles it)."""
    major, minor = nvrtc.version()
    return dev.info.extra.get("cuda_driver_version", 0) >= major * 1000 + minor * 10


# -- facts -------------------------------------------------------------------------------

def test_info_describes_the_gpu(gpu):
    import cupy
    info = gpu.info
    assert info.kind == "gpu" and info.backend == "cuda" and info.index == 0
    cc = cupy.cuda.Device(0).compute_capability          # e.g. "90"
    assert info.compute_capability == (int(cc[:-1]), int(cc[-1]))
    assert set(info.formats) - {"aten"} == {"catalog", "ptx", "cubin", "fatbin", "cuda-source"}
    assert ("aten" in info.formats) == _torch_has_cuda()
    assert info.extra["total_memory"] >= info.memory > 0
    assert info.extra["multiprocessors"] > 0
    assert info.extra["cuda_driver_version"] >= 12000
    if nvml.unavailable_reason() is None:
        assert info.extra["nvml_name"]
        assert 0 <= info.extra["utilization_gpu_percent"] <= 100
        assert 0 < info.extra["temperature_c"] < 130


def test_telemetry_reads_nvml():
    """The live readings a pool server's metrics report for a GPU (harp_device_*)."""
    from harp.backends import load_backend
    if nvml.unavailable_reason() is not None:
        pytest.skip(f"no NVML here: {nvml.unavailable_reason()}")
    readings = load_backend("cuda").telemetry(0)
    assert 0 <= readings["utilization"] <= 1
    assert 0 < readings["temperature_celsius"] < 130
    assert readings.get("power_watts", 1.0) > 0


def test_mem_info_and_the_card():
    with harp.connect("local:cuda", memory="1GiB") as dev:
        assert dev.mem_info() == harp.MemInfo(free=1 << 30, total=1 << 30)
        card = dev.card_mem_info()
        assert 0 < card.free <= card.total
        buf = dev.alloc(256 << 20)
        dev.synchronize()
        assert dev.mem_info().free == (1 << 30) - (256 << 20)
        dev.free(buf)
        assert dev.mem_info().free == 1 << 30


def test_quota_is_enforced_and_reported():
    from harp.backends import load_backend
    dev = load_backend("cuda").open(0, memory_quota=64 << 20)
    try:
        assert dev.info.memory == 64 << 20
        assert dev.mem_info().total == 64 << 20
        dev.alloc(60 << 20)
        dev.alloc(8 << 20)
        with pytest.raises(harp.QuotaError):
            dev.synchronize()
    finally:
        dev.close()


def test_new_memory_is_zeroed(gpu):
    a = gpu.alloc(32 << 20)
    gpu.fill(a, 0xEE)
    gpu.free(a)
    gpu.synchronize()
    b = gpu.alloc(32 << 20)         # very likely the same block, from the pool
    assert gpu.read(b, 0, 32 << 20) == bytes(32 << 20)


# -- the catalog at GPU sizes ------------------------------------------------------------------

@pytest.mark.parametrize("grid,block", [(1, 1), (1, 1024), (4096, 256), ((64, 64), (16, 16)),
                                        ((8, 4, 2), (8, 8, 4))])
def test_catalog_launch_shapes(gpu, grid, block):
    lib = gpu.load_module(harp.CATALOG_IMAGE, "catalog")
    n = 3_000_017
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n).astype(np.float32)
    y = rng.standard_normal(n).astype(np.float32)
    xb, yb, sb = gpu.alloc(x.nbytes), gpu.alloc(y.nbytes), gpu.alloc(8)
    gpu.write(xb, 0, x)
    gpu.write(yb, 0, y)
    gpu.launch(gpu.function(lib, "axpy_f32"), grid, block,
               [harp.BufferArg(yb), harp.BufferArg(xb), np.float32(0.5), np.int64(n)])
    expected = np.float32(0.5) * x + y
    got = np.frombuffer(gpu.read(yb, 0, y.nbytes), np.float32)
    np.testing.assert_array_equal(got, expected)       # element-wise: bit-identical to NumPy
    gpu.launch(gpu.function(lib, "reduce_sum_f64"), grid, block,
               [harp.BufferArg(sb), harp.BufferArg(xb), np.int64(0)])   # f64 over 0 elements
    assert np.frombuffer(gpu.read(sb, 0, 8), np.float64)[0] == 0


def test_reductions_at_size(gpu):
    lib = gpu.load_module(harp.CATALOG_IMAGE, "catalog")
    rng = np.random.default_rng(2)
    n = 1 << 22
    for dtype, name in ((np.float64, "reduce_sum_f64"), (np.float32, "reduce_sum_f32"),
                        (np.int32, "reduce_sum_i32"), (np.int64, "reduce_sum_i64")):
        x = (rng.standard_normal(n) if dtype in (np.float32, np.float64)
             else rng.integers(-2**30, 2**30, n)).astype(dtype)
        xb, out = gpu.alloc(x.nbytes), gpu.alloc(16)
        gpu.write(xb, 0, x)
        gpu.fill(out, 0xFF)
        gpu.launch(gpu.function(lib, name), 1024, 256,
                   [harp.BufferArg(out, 8), harp.BufferArg(xb), np.int64(n)])
        got = np.frombuffer(gpu.read(out, 8, x.itemsize), dtype)[0]
        if dtype == np.float32:
            np.testing.assert_allclose(got, x.astype(np.float64).sum(), rtol=1e-4, atol=1e-2)
        elif dtype == np.float64:
            np.testing.assert_allclose(got, x.sum(), rtol=1e-10, atol=1e-8)
        else:
            assert got == x.sum(dtype=dtype)       # wraps exactly
        gpu.free(xb)
        gpu.free(out)


def test_gemm_at_size(gpu):
    lib = gpu.load_module(harp.CATALOG_IMAGE, "catalog")
    rng = np.random.default_rng(3)
    m, n, k = 257, 190, 131
    for dtype, name, tol in ((np.float32, "gemm_f32", 1e-3), (np.float64, "gemm_f64", 1e-10)):
        A, B, C = (rng.standard_normal(s).astype(dtype) for s in ((m, k), (k, n), (m, n)))
        bufs = [gpu.alloc(a.nbytes) for a in (C, A, B)]
        for b, a in zip(bufs, (C, A, B)):
            gpu.write(b, 0, a)
        gpu.launch(gpu.function(lib, name), (64,), (128,),
                   [harp.BufferArg(b) for b in bufs]
                   + [np.int64(m), np.int64(n), np.int64(k), dtype(1.5), dtype(-0.25)])
        got = np.frombuffer(gpu.read(bufs[0], 0, C.nbytes), dtype).reshape(m, n)
        want = 1.5 * (A.astype(np.float64) @ B.astype(np.float64)) - 0.25 * C
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_misaligned_catalog_buffer_is_refused_not_run(gpu):
    lib = gpu.load_module(harp.CATALOG_IMAGE, "catalog")     # 1
    fn = gpu.function(lib, "fill_f64")                        # 2
    buf = gpu.alloc(64)                                       # 3
    gpu.launch(fn, 1, 8, [harp.BufferArg(buf, 4), np.float64(1), np.int64(4)])   # 4
    with pytest.raises(harp.ArgumentError, match="not aligned") as ei:
        gpu.synchronize()                                     # 5
    assert (ei.value.call, ei.value.seq) == ("launch", 4)
    assert gpu.read(buf, 0, 64) == bytes(64)


# -- compiled kernels ----------------------------------------------------------------------

def _check_saxpy(dev, fn, n=10_000):
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    xb, yb, ob = dev.alloc(x.nbytes), dev.alloc(y.nbytes), dev.alloc(x.nbytes)
    dev.write(xb, 0, x)
    dev.write(yb, 0, y)
    dev.launch(fn, (n + 255) // 256, 256, [harp.BufferArg(ob), harp.BufferArg(xb),
                                           harp.BufferArg(yb), np.float32(3), np.int64(n)])
    got = np.frombuffer(dev.read(ob, 0, x.nbytes), np.float32)
    np.testing.assert_allclose(got, np.float32(3) * x + y, rtol=1e-6, atol=1e-6)


def test_cuda_source_kernel(gpu):
    _check_saxpy(gpu, gpu.function(gpu.load_module(SAXPY, "cuda-source"), "saxpy"))


def test_cuda_source_compile_error_is_deferred_with_the_log(gpu):
    gpu.load_module('extern "C" __global__ void k(int* x) { x[0] = ; }', "cuda-source")   # 1
    with pytest.raises(harp.ArgumentError) as ei:
        gpu.synchronize()                                                                # 2
    assert (ei.value.call, ei.value.seq) == ("load_module", 1)
    assert "NVRTC" in str(ei.value) and "expected an expression" in str(ei.value)
    gpu.synchronize()


def test_cubin_and_ptx_images(gpu):
    cubin = nvrtc.compile_cuda(SAXPY, arch=_cc(gpu), kind="cubin").image
    _check_saxpy(gpu, gpu.function(gpu.load_module(cubin, "cubin"), "saxpy"))
    if not _driver_runs_nvrtc_ptx(gpu):
        pytest.skip("this driver is older than NVRTC: it cannot JIT NVRTC's PTX")
    ptx = nvrtc.compile_cuda(SAXPY, arch=_cc(gpu), kind="ptx").image
    _check_saxpy(gpu, gpu.function(gpu.load_module(ptx, "ptx"), "saxpy"))
    _check_saxpy(gpu, gpu.function(gpu.load_module(ptx.decode(), "ptx"), "saxpy"))


def test_wrong_argument_count_is_refused_not_launched(gpu):
    fn = gpu.function(gpu.load_module(SAXPY, "cuda-source"), "saxpy")   # 1, 2
    buf = gpu.alloc(64)                                                  # 3
    gpu.launch(fn, 1, 1, [harp.BufferArg(buf), np.float32(1)])           # 4
    with pytest.raises(harp.ArgumentError, match="takes 5 parameters") as ei:
        gpu.synchronize()                                                # 5
    assert (ei.value.call, ei.value.seq) == ("launch", 4)
    _check_saxpy(gpu, fn)                                                # the GPU is fine


def test_numba_ptx_with_array_arguments(gpu):
    cuda = pytest.importorskip("numba.cuda")
    from numba import float32, float64, int64
    if not _driver_runs_nvrtc_ptx(gpu):
        pytest.skip("this driver is older than numba's NVVM: it cannot JIT its PTX")

    def saxpy(out, x, y, a, n):
        i = cuda.grid(1)
        if i < n:
            out[i] = a * x[i] + y[i]

    def scale2d(m, alpha):
        r, c = cuda.grid(2)
        if r < m.shape[0] and c < m.shape[1]:
            m[r, c] = m[r, c] * alpha

    ptx1, _ = cuda.compile_ptx(saxpy, (float32[:], float32[:], float32[:], float32, int64),
                               cc=_cc(gpu))
    ptx2, _ = cuda.compile_ptx(scale2d, (float64[:, :], float64), cc=_cc(gpu))
    n = 1000
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    xb, yb, ob = gpu.alloc(x.nbytes + 16), gpu.alloc(y.nbytes), gpu.alloc(x.nbytes + 4)
    gpu.write(xb, 16, x)
    gpu.write(yb, 0, y)
    gpu.fill(ob, 0)
    fn = gpu.function(gpu.load_module(ptx1, "ptx"), "saxpy")
    gpu.launch(fn, 8, 128, [harp.ArrayArg(ob, "float32", (n,), offset=4),
                            harp.ArrayArg(xb, "float32", (n,), offset=16),
                            harp.ArrayArg(yb, "float32", (n,)), np.float32(2), np.int64(n)])
    got = np.frombuffer(gpu.read(ob, 4, x.nbytes), np.float32)
    np.testing.assert_allclose(got, 2 * x + y, rtol=1e-6, atol=1e-6)
    assert gpu.read(ob, 0, 4) == bytes(4)

    m = rng.standard_normal((37, 53))
    mb = gpu.alloc(m.nbytes)
    gpu.write(mb, 0, m)
    fn2 = gpu.function(gpu.load_module(ptx2, "ptx"), "scale2d")
    gpu.launch(fn2, (5, 7), (8, 8), [harp.ArrayArg(mb, "float64", m.shape), np.float64(-3)])
    got2 = np.frombuffer(gpu.read(mb, 0, m.nbytes), np.float64).reshape(m.shape)
    np.testing.assert_allclose(got2, -3 * m, rtol=1e-15)


def test_streams_overlap_and_events_time_them(gpu):
    lib = gpu.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = gpu.function(lib, "gemm_f32")
    n = 512
    a, c1, c2 = gpu.alloc(n * n * 4), gpu.alloc(n * n * 4), gpu.alloc(n * n * 4)
    gpu.fill(a, 0x3F)
    s1, s2 = gpu.stream(), gpu.stream()
    e0, e1, e2 = gpu.event(), gpu.event(), gpu.event()
    args = lambda c: [harp.BufferArg(c), harp.BufferArg(a), harp.BufferArg(a),  # noqa: E731
                      np.int64(n), np.int64(n), np.int64(n), np.float32(1), np.float32(0)]
    gpu.record(e0, s1)
    gpu.launch(gemm, 256, 256, args(c1), stream=s1)
    gpu.record(e1, s1)
    gpu.wait(s2, e1)
    gpu.copy(c2, 0, c1, 0, n * n * 4, stream=s2)
    gpu.record(e2, s2)
    ms = gpu.elapsed(e0, e1)
    assert ms > 0 and gpu.elapsed(e0, e2) >= ms
    assert gpu.read(c2, 0, 64, stream=s2) == gpu.read(c1, 0, 64, stream=s1)


# -- a kernel fault --------------------------------------------------------------------------

def test_kernel_fault_names_the_launch_and_ends_the_gpu_in_that_process():
    """In a subprocess: a fault loses the CUDA context of the whole process."""
    script = textwrap.dedent(r'''
        import numpy as np, harp
        dev = harp.connect("local:cuda")
        src = 'extern "C" __global__ void poke(unsigned long long a) { *(volatile int*)a = 1; }'
        fn = dev.function(dev.load_module(src, "cuda-source"), "poke")   # 1, 2
        buf = dev.alloc(16)                                               # 3
        dev.launch(fn, 1, 1, [harp.Scalar(16, "uint64")])                 # 4: address 16
        dev.fill(buf, 1)                                                  # 5
        try:
            dev.synchronize()                                             # 6
        except harp.DeviceError as e:
            print("FAULT", e.call, e.seq, "sticky" in str(e))
        try:
            dev.alloc(16)
        except harp.DeviceError as e:
            print("AFTER", "unusable" in str(e))
        dev.close()
        print("CLOSED")
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert "FAULT launch 4 True" in out.stdout, out.stdout + out.stderr
    assert "AFTER True" in out.stdout and "CLOSED" in out.stdout, out.stdout + out.stderr


# -- PyTorch operators (aten) on the GPU -----------------------------------------------------

def _needs_aten(dev):
    if "aten" not in dev.info.formats:
        pytest.skip("torch with CUDA is not installed with this server")


def test_torch_operators_run_on_the_gpu(gpu):
    _needs_aten(gpu)
    import torch
    import harp.torch as ht
    ht.use(gpu)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(64, 32, generator=g), torch.randn(32, 16, generator=g)
        ha, hb = a.to("harp"), b.to("harp")
        torch.testing.assert_close((ha @ hb).cpu(), a @ b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.softmax(ha, -1).cpu(), torch.softmax(a, -1),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((ha.exp() + 1).log().sum(0).cpu(), (a.exp() + 1).log().sum(0),
                                   rtol=1e-5, atol=1e-4)
        idx = torch.tensor([3, 0, 7])
        torch.testing.assert_close(ha.index_select(0, idx.to("harp")).cpu(), a.index_select(0, idx))
        view = ha[2:5]                               # in place through a view: the buffer itself
        view.mul_(10)
        a[2:5].mul_(10)
        torch.testing.assert_close(ha.cpu(), a)
        torch.testing.assert_close(torch.zeros(3, 4, device="harp").cpu(), torch.zeros(3, 4))
        # dropout draws from the session's generator on the GPU: a seed repeats its mask
        x = torch.ones(10_000)
        torch.manual_seed(5)
        m1 = torch.nn.functional.dropout(x.to("harp"), 0.25).cpu()
        torch.manual_seed(5)
        m2 = torch.nn.functional.dropout(x.to("harp"), 0.25).cpu()
        assert torch.equal(m1, m2) and 0.2 < float((m1 == 0).float().mean()) < 0.3
    finally:
        ht.reset()


def test_torch_training_on_the_gpu_follows_the_cpu():
    """A CNN (no dropout: CUDA's random numbers are not the CPU's) trained 20 steps on the
    GPU through HARP, in this process, against the CPU (TF32 off, so only the order of
    floating-point sums differs)."""
    import os
    import torch
    import harp.torch as ht
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "torch"))
    from training import train
    dev = harp.connect("local:cuda", memory="2GiB")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        _needs_aten(dev)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        ht.use(dev)
        want = train("cnn", "cpu", steps=20, optimizer="sgd")
        got = train("cnn", "harp", steps=20, optimizer="sgd")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        ht.reset()
        dev.close()
    for step, (w, g) in enumerate(zip(want, got)):
        assert abs(w - g) <= 1e-3 * abs(w) + 1e-5, (step, w, g)


def test_aten_tensors_are_the_sessions_buffers_on_its_stream():
    """White-box, in this process: a launch's tensors are the session's own memory on
    `cuda:0`, and its operator runs with torch's current stream the session's."""
    import torch
    from harp.backends.cuda.aten import AtenKernel
    dev = harp.connect("local:cuda", memory="1GiB")
    try:
        _needs_aten(dev)
        module = dev.load_module(b"", "aten")
        buf = dev.alloc(1024)
        s = dev.stream()
        dev.synchronize()
        payload = dev._modules[module.id].payload
        assert payload.device == torch.device("cuda", 0)
        assert payload.generator.device == torch.device("cuda", 0)
        call = payload.call('["neg.default",1,[{"t":1}],{}]')
        kernel = AtenKernel(call, payload.place, dev._cp)
        arg = harp.ArrayArg(buf, "float32", (16,), 64, (4,))
        with dev._card.use():
            out, x = kernel.prepare([arg, arg], dev._mem)
        assert x.device == torch.device("cuda", 0)
        assert x.data_ptr() == dev._buffers[buf.id].ptr + 64
        state = dev._streams[s.id]
        with dev._card.use(), payload.place.running(state.stream):
            assert torch.cuda.current_stream().cuda_stream == state.stream.ptr
        dev.write(buf, 64, np.arange(16, dtype=np.float32), stream=s)
        fn = dev.function(module, '["neg.default",1,[{"t":1}],{}]')
        dev.launch(fn, 1, 1, [harp.ArrayArg(buf, "float32", (16,), 0, (4,)), arg], stream=s)
        got = np.frombuffer(dev.read(buf, 0, 64, stream=s), np.float32)
        np.testing.assert_array_equal(got, -np.arange(16, dtype=np.float32))
    finally:
        dev.close()


def test_torchs_own_memory_is_bounded_by_the_session():
    """In a subprocess (the bound is per process): after a session of 256 MiB runs an
    operator, torch's caching allocator refuses to hold more than that on the GPU."""
    script = textwrap.dedent(r'''
        import torch, harp, harp.torch as ht
        dev = harp.connect("local:cuda", memory="256MiB")
        if "aten" not in dev.info.formats:
            print("NO-ATEN"); raise SystemExit(0)
        ht.use(dev)
        print("SUM", (torch.ones(1000, device="harp") * 2).sum().item())
        small = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")
        try:
            torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            print("UNBOUNDED")
        except torch.cuda.OutOfMemoryError:
            print("BOUNDED")
        ht.reset()
        dev.close()
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    if "NO-ATEN" in out.stdout:
        pytest.skip("torch with CUDA is not installed here")
    assert "SUM 2000.0" in out.stdout, out.stdout + out.stderr
    assert "BOUNDED" in out.stdout, out.stdout + out.stderr
