"""numba kernels as a CUDA device gets them: PTX compiled on this CPU-only machine, which
assembles with ptxas (from the nvidia-cuda-nvcc wheel), and launched with numba's arguments."""
from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import pytest

import harp
from harp.client import numba_shim
from harp.client.numba_shim.ptx import entry_name
from harp import catalog as cat
from harp.types import ArrayArg, Scalar

from .conftest import (HARP, PROGRAMS, PROGRAMS_DIR, RecordingDevice, assemble, base_env,
                       run_all)

cuda = numba_shim.module()

#: The kernels each program launches.
KERNELS = {"saxpy": {"saxpy"}, "matmul": {"matmul"}, "reduction": {"block_sum_squares"},
           "histogram": {"histogram", "max_value"}, "pipeline": {"poly", "reverse_blocks"}}


def test_every_program_kernel_compiles_to_ptx_that_assembles(ptxas, tmp_path, hook_installed):
    dump = Path(__file__).parent / "ptx_dump.py"
    jobs = {}
    for p in PROGRAMS:
        out = tmp_path / p
        out.mkdir()
        jobs[p] = ([HARP, "run", "--device", "local:cpu", "--", "python", str(dump),
                    str(PROGRAMS_DIR / f"{p}.py"), str(out)], base_env())
    results = run_all(jobs, tmp_path)
    for p, result in results.items():
        assert result.returncode == 0, result.stderr
        written = json.loads(result.stdout.splitlines()[-1])
        assert {w["kernel"] for w in written} == KERNELS[p]
        for w in written:
            ptx = Path(w["file"]).read_text()
            assert ".target sm_90" in ptx and w["kernel"] in w["entry"]
            assemble(ptxas, Path(w["file"]))


# -- what a device that takes PTX receives ---------------------------------------------

@cuda.jit(device=True)
def twice(v):
    return 2 * v


@cuda.jit
def scale(out, x, a):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = twice(a) * x[i]


@cuda.jit
def warp_sum(out, x):
    i = cuda.grid(1)
    v = x[i]
    v += cuda.shfl_down_sync(0xffffffff, v, 16)
    v += cuda.shfl_down_sync(0xffffffff, v, 8)
    if cuda.threadIdx.x == 0:
        out[cuda.blockIdx.x] = v


@cuda.jit
def grid_sync(x):
    cuda.cg.this_grid().sync()


@pytest.fixture
def ptx_device():
    device = RecordingDevice()
    numba_shim.use_device(device)
    yield device
    numba_shim.close_current()
    device.close()


def test_launch_sends_ptx_the_entry_name_and_numbas_arguments(ptx_device, ptxas, tmp_path):
    x = cuda.to_device(np.arange(64, dtype=np.float32))
    out = cuda.device_array(32, dtype=np.float32)
    view = x[::2]                                 # strided: layout "A", an offset-0 view
    scale[1, 32](out, view, np.float32(1.5))
    scale[1, 32](out, view, np.float32(2.5))       # same types: nothing compiled or loaded
    assert len(ptx_device.modules) == 1 and len(ptx_device.functions) == 1
    fmt, ptx = ptx_device.modules[0]
    assert fmt == "ptx" and ".target sm_90" in ptx
    assert ptx_device.functions[0] == entry_name(ptx)
    name, grid, block, args, shared = ptx_device.launches[0]
    assert name == entry_name(ptx) and "scale" in name
    assert (grid, block, shared) == ((1,), (32,), 0)
    assert args[0] == ArrayArg(out.buffer, "float32", (32,), 0, (4,))
    assert args[1] == ArrayArg(x.buffer, "float32", (32,), 0, (8,))
    assert args[2] == Scalar(1.5, "float32")
    assert ptx_device.launches[1][3][2] == Scalar(2.5, "float32")
    (tmp_path / "scale.ptx").write_text(ptx)
    assemble(ptxas, tmp_path / "scale.ptx")
    # other argument types: a second PTX, a second entry
    scale[1, 32](cuda.device_array(32), cuda.device_array(32), 3.0)
    assert len(ptx_device.modules) == 2
    assert ptx_device.launches[-1][3][2] == Scalar(3.0, "float64")
    assert entry_name(ptx_device.modules[1][1]) != entry_name(ptx)


def test_warp_intrinsics_compile_for_cuda_devices(ptx_device, ptxas, tmp_path):
    warp_sum[2, 32](cuda.device_array(2, dtype=np.int32), cuda.device_array(64, dtype=np.int32))
    ptx = ptx_device.modules[-1][1]
    assert "shfl.sync.down" in ptx
    (tmp_path / "warp.ptx").write_text(ptx)
    assemble(ptxas, tmp_path / "warp.ptx")


def test_cooperative_groups_are_refused_for_cuda_devices_too(ptx_device):
    with pytest.raises(harp.UnsupportedError, match="numba.cuda.cg: cooperative groups on a "
                       "CUDA device"):
        grid_sync[1, 1](cuda.device_array(1))
    assert ptx_device.modules == []


def test_packed_arguments_are_refused_for_cuda_devices_saying_why(ptx_device):
    """Complex, tuple and record arguments reach numba-python devices only (packing.py)."""
    for value in (1j, (1, 2), np.zeros(1, [("a", np.int32)])):
        with pytest.raises(harp.UnsupportedError, match="on a CUDA device is not supported "
                           "under HARP: complex, tuple and record arguments"):
            grid_sync[1, 1](value)
    assert ptx_device.modules == []


def test_get_current_device_reports_the_remote_device(ptx_device):
    d = cuda.get_current_device()
    assert d.name == "recording device" and d.compute_capability == (9, 0)


@cuda.jit
def mixed(out, m, flag, k, factor):
    i, j = cuda.grid(2)
    if flag and i < m.shape[0] and j < m.shape[1]:
        out[i, j] = m[i, j] * factor + k


def test_launch_arguments_fit_the_ptx_parameters_as_the_cuda_backend_lays_them_out(ptx_device):
    """The contract with the cuda backend: it expands an ArrayArg to numba's array parameters
    and a Scalar to its dtype; the sizes must be the PTX entry's parameters."""
    kernels = pytest.importorskip("harp.backends.cuda.kernels")
    m = cuda.to_device(np.asfortranarray(np.ones((4, 6), dtype=np.float64)))
    out = cuda.device_array((4, 6), dtype=np.float64)
    mixed[(1, 1), (4, 8)](out, m, True, 3, np.float32(2))
    mixed[(1, 1), (4, 8)](out, m[:, ::2], np.bool_(False), np.int16(1), 2.0)
    scale[1, 32](out.ravel(), m.ravel(order="F"), np.float64(1))
    assert len(ptx_device.modules) == len(ptx_device.launches) == 3
    for (name, _, _, args, _), (_, ptx) in zip(ptx_device.launches, ptx_device.modules):
        params = []
        for a in args:
            if isinstance(a, ArrayArg):
                params += kernels.numba_array_params(0, np.dtype(a.dtype), a.shape, a.strides)
            else:
                params.append(cat.scalar_value(a.value, a.dtype))
        assert kernels.param_sizes(params) == kernels.ptx_entries(ptx)[name]
