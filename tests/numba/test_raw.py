"""harp.RawKernel / harp.RawModule: CUDA C compiled to PTX with NVRTC on this CPU-only machine,
and launched with HARP device arrays on devices that take it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import harp
from harp.client import numba_shim
from harp.client.raw import CompileError
from harp.types import BufferArg, Scalar

from .conftest import RecordingDevice, assemble

cuda = numba_shim.module()

ADD = r'''
extern "C" __global__ void add(float* y, const float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}
'''

TEMPLATED = r'''
template <typename T>
__global__ void fill(T* out, T value, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = value;
}
extern "C" __global__ void twice(double* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= 2;
}
'''


def test_raw_kernel_compiles_to_ptx_here_and_it_assembles(ptxas, tmp_path):
    kernel = harp.RawKernel(ADD, "add")
    for arch in ("sm_80", "sm_90"):
        ptx = kernel.compile_ptx(arch)
        assert f".target {arch}" in ptx and ".entry add(" in ptx
        path = tmp_path / f"add_{arch}.ptx"
        path.write_text(ptx)
        assemble(ptxas, path, arch)


def test_raw_module_with_cpp_name_expressions(ptxas, tmp_path):
    module = harp.RawModule(TEMPLATED, name_expressions=["fill<float>", "fill<int>"])
    lowered = module.get_lowered_name("fill<float>")
    assert lowered.startswith("_Z") and "fill" in lowered
    ptx = module.compile_ptx()
    assert f".entry {lowered}(" in ptx and ".entry twice(" in ptx
    (tmp_path / "fill.ptx").write_text(ptx)
    assemble(ptxas, tmp_path / "fill.ptx")
    with pytest.raises(harp.ArgumentError, match="not among"):
        module.get_lowered_name("fill<double>")


def test_compile_errors_carry_nvrtcs_log():
    with pytest.raises(CompileError) as ei:
        harp.RawKernel('extern "C" __global__ void k(int* x) { x[0] = undefined_name; }',
                       "k").compile_ptx()
    assert "undefined_name" in str(ei.value) and "is undefined" in str(ei.value)
    assert isinstance(ei.value, harp.ArgumentError)


def test_a_device_without_cuda_source_or_ptx_refuses_clearly():
    device = harp.connect("local:cpu", trust_client_code=True)
    try:
        kernel = harp.RawKernel(ADD, "add", device=device)
        buf = device.alloc(16)
        with pytest.raises(harp.UnsupportedError) as ei:
            kernel((1,), (4,), (buf, buf, np.float32(1), np.int32(4)))
        assert "cuda-source" in str(ei.value) and "numba-python" in str(ei.value)
        # the same through the numba.cuda session of the process
        numba_shim.use_device(device)
        d = cuda.to_device(np.zeros(4, dtype=np.float32))
        with pytest.raises(harp.UnsupportedError, match="cuda-source"):
            harp.RawKernel(ADD, "add")((1,), (4,), (d, d, np.float32(1), np.int32(4)))
    finally:
        numba_shim.close_current()
        device.close()


@pytest.fixture
def recording():
    devices = []

    def make(formats):
        device = RecordingDevice(formats)
        devices.append(device)
        numba_shim.use_device(device)
        return device
    yield make
    numba_shim.close_current()
    for d in devices:
        d.close()


def test_on_a_ptx_device_nvrtc_compiles_here_and_arrays_become_pointers(recording, ptxas,
                                                                         tmp_path):
    device = recording(("ptx", "catalog"))
    y = cuda.to_device(np.zeros(64, dtype=np.float32))
    x = cuda.to_device(np.ones(64, dtype=np.float32))
    kernel = harp.RawKernel(ADD, "add")
    kernel((2,), (32,), (y[8:], x, np.float32(2), np.int32(56)), shared_mem=16)
    kernel((2,), (32,), (y, x, np.float32(3), np.int32(64)), stream=cuda.stream())
    assert len(device.modules) == 1 and device.functions == ["add"]
    fmt, ptx = device.modules[0]
    assert fmt == "ptx" and ".target sm_90" in ptx
    name, grid, block, args, shared = device.launches[0]
    assert (name, grid, block, shared) == ("add", (2,), (32,), 16)
    assert args == [BufferArg(y.buffer, 32), BufferArg(x.buffer, 0), Scalar(2.0, "float32"),
                    Scalar(56, "int32")]
    (tmp_path / "raw.ptx").write_text(ptx)
    assemble(ptxas, tmp_path / "raw.ptx")
    with pytest.raises(TypeError, match="needs an explicit dtype"):
        kernel((1,), (1,), (y, x, 2.0, np.int32(1)))
    with pytest.raises(TypeError, match="host array"):
        kernel((1,), (1,), (np.zeros(4), x, np.float32(2), np.int32(1)))
    # C++ kernels by name expression: the lowered name is what the device looks up
    module = harp.RawModule(TEMPLATED, name_expressions=["fill<float>"])
    module.get_function("fill<float>")((1,), (64,), (y, np.float32(5), np.int32(64)))
    assert device.functions[-1] == module.get_lowered_name("fill<float>")


def test_on_a_cuda_source_device_the_source_goes_to_the_server(recording):
    device = recording(("cuda-source", "catalog"))
    d = cuda.to_device(np.zeros(8))
    module = harp.RawModule(TEMPLATED)
    module.get_function("twice")((1,), (8,), (d, np.int32(8)))
    assert device.modules == [("cuda-source", TEMPLATED)]
    assert device.functions == ["twice"]
    with pytest.raises(harp.UnsupportedError, match="need a device that takes \"ptx\""):
        harp.RawModule(TEMPLATED, options=("-DX=1",)).get_function("twice")(
            (1,), (8,), (d, np.int32(8)))


def test_raw_kernel_is_exported_lazily():
    assert harp.RawKernel.__module__ == "harp.client.raw"
    assert Path(harp.RawModule.__init__.__code__.co_filename).name == "raw.py"
