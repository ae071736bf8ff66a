"""The cuda backend on a machine without a GPU (these run everywhere).

- Without CuPy, a driver, a GPU or NVRTC, the backend is listed, reports itself
  unavailable with the reason, and opening it is a clear `BackendError`.
- The catalog's CUDA C compiles with NVRTC (PTX for several architectures, and a
  CUBIN), the PTX assembles with ptxas, and every catalog kernel is an entry with
  the catalog's parameters; broken CUDA C gives NVRTC's log.
- The catalog kernels run in a host emulation of CUDA's thread model
  (fake_cupy/harp_cuda_emulation.py) and match NumPy for every kernel, with
  1-D, 2-D and 3-D grids and blocks of odd sizes.
- numba's CUDA array ABI is checked against PTX that numba itself compiles.
- `CudaDevice` runs on a host-memory stand-in for CuPy (fake_cupy/harp_fake_cupy,
  injected as the backend's driver): the conformance suite runs on it in-process
  (its `*-cuda-emulated` kinds); here are the paths the suite does not reach
  (compiled modules, argument layouts, a sticky GPU fault).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import harp
from harp import catalog as cat
from harp.backends import backend_names, load_backend
from harp.backends.cuda import kernels, nvml, nvrtc

from stand_ins import emulated_cupy

HERE = pathlib.Path(__file__).resolve().parent
FAKE = HERE / "fake_cupy"
ROOT = HERE.parents[1]
BIN = pathlib.Path(sys.executable).parent


def _load_path(name: str, path: pathlib.Path, package: bool = False):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    module = importlib.util.module_from_spec(spec)
    return spec, module


@pytest.fixture(scope="module")
def emulation():
    """The catalog compiled for the host (needs g++)."""
    spec, module = _load_path("harp_cuda_emulation", FAKE / "harp_cuda_emulation.py")
    spec.loader.exec_module(module)
    if module.compiler() is None:
        pytest.skip("no C++ compiler to build the catalog emulation")
    sys.modules.setdefault("harp_cuda_emulation", module)
    module.library()
    return module


@pytest.fixture
def fake_cupy(emulation, monkeypatch):
    """The host-memory stand-in for CuPy, as the cuda backend's driver: injected
    (`load_backend("cuda", cupy=...)`) or named by `HARP_CUDA_CUPY` for `harp.connect`."""
    module = emulated_cupy()
    monkeypatch.setenv("HARP_CUDA_CUPY", module.__name__)
    return module


@pytest.fixture
def no_cupy(monkeypatch):
    """The driver module does not import, as on a machine without CuPy."""
    monkeypatch.setenv("HARP_CUDA_CUPY", "harp_no_cupy_here")


def _ptxas() -> pathlib.Path | None:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = pathlib.Path(base) / "bin" / "ptxas"
        if path.exists():
            return path
    return None


needs_nvrtc = pytest.mark.skipif(not nvrtc.available()[0], reason="NVRTC not installed")


# -- availability -------------------------------------------------------------------------

def test_backend_is_listed():
    assert "cuda" in backend_names()


def test_harp_devices_json_lists_cuda():
    out = subprocess.run([str(BIN / "harp"), "devices", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["backend"]: r for r in json.loads(out.stdout)}
    row = rows["cuda"]
    if row["available"]:            # a machine with a GPU
        assert row["devices"] and all(d["kind"] == "gpu" for d in row["devices"])
    else:
        assert row["reason"] and row["devices"] == []


def test_without_cupy_unavailable_with_reason(no_cupy):
    backend = load_backend("cuda")
    ok, reason = backend.available()
    assert ok is False
    assert "CuPy" in reason and "harp[cuda]" in reason
    assert backend.device_count() == 0
    assert backend.telemetry(0) == {}                    # a pool server's metrics: none
    with pytest.raises(harp.BackendError, match="unavailable here: CuPy"):
        backend.describe(0)
    row = next(r for r in harp.backends.list_devices() if r["backend"] == "cuda")
    assert row == {"backend": "cuda", "available": False, "reason": reason, "devices": []}


def test_connect_without_cupy_is_a_backend_error(no_cupy):
    with pytest.raises(harp.BackendError) as ei:
        harp.connect("local:cuda")
    assert "cuda backend is unavailable" in str(ei.value) and "CuPy" in str(ei.value)
    with pytest.raises(harp.BackendError):
        harp.connect("local:cuda:1", memory="1GiB")


def test_nvml_readings_are_in_base_units():
    """What a pool server's metrics read from NVML, through a stand-in for pynvml: a
    percentage becomes a ratio, milliwatts watts, and a reading the GPU does not give is
    left out."""
    class StandIn:
        NVML_TEMPERATURE_GPU = 0

        def nvmlDeviceGetHandleByPciBusId(self, bus):
            assert bus == b"00000000:17:00.0"
            return "gpu-17"

        def nvmlDeviceGetUtilizationRates(self, handle):
            return types.SimpleNamespace(gpu=37, memory=5)

        def nvmlDeviceGetTemperature(self, handle, sensor):
            return 61

        def nvmlDeviceGetPowerUsage(self, handle):
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
    assert nvml.readings(0, "00000000:17:00.0", module=StandIn()) == {
        "utilization": 0.37, "temperature_celsius": 61.0}
    StandIn.nvmlDeviceGetPowerUsage = lambda self, handle: 71_250
    assert nvml.readings(0, "00000000:17:00.0", module=StandIn())["power_watts"] == 71.25


def test_no_visible_gpu_is_unavailable(fake_cupy, monkeypatch):
    monkeypatch.setenv("HARP_FAKE_CUPY_DEVICES", "0")
    ok, reason = load_backend("cuda").available()
    assert not ok and "no CUDA GPU is visible" in reason
    with pytest.raises(harp.BackendError, match="no CUDA GPU"):
        harp.connect("local:cuda")


def test_driver_failure_is_unavailable(fake_cupy, monkeypatch):
    def no_driver():
        raise fake_cupy.cuda.CUDARuntimeError(35, "cudaErrorInsufficientDriver")
    monkeypatch.setattr(fake_cupy.cuda.runtime, "getDeviceCount", no_driver)
    ok, reason = load_backend("cuda").available()
    assert not ok and "no usable CUDA driver" in reason and "35" in reason


def test_server_serve_backend_cuda_without_cupy_is_a_clear_error(tmp_path):
    broken = tmp_path / "cupy"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('simulated: no CuPy here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([str(BIN / "harp"), "server", "serve", "--backend", "cuda", "--insecure",
                          "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 1
    assert "unavailable" in out.stderr and "simulated: no CuPy here" in out.stderr
    assert "Traceback" not in out.stderr


# -- NVRTC and ptxas --------------------------------------------------------------------------

def _catalog_ptx(cc: tuple[int, int]) -> str:
    compiled = nvrtc.compile_cuda(kernels.CATALOG_SOURCE, arch=cc, kind="ptx")
    assert compiled.kind == "ptx" and compiled.arch == f"compute_{cc[0]}{cc[1]}"
    return compiled.image.decode()


@needs_nvrtc
@pytest.mark.parametrize("cc", [(9, 0), (8, 0), (5, 2)])
def test_catalog_compiles_to_ptx_that_ptxas_assembles(cc, tmp_path):
    ptx = _catalog_ptx(cc)
    entries = kernels.ptx_entries(ptx)
    assert set(entries) == set(cat.KERNELS)
    for name, kernel in cat.KERNELS.items():
        want = [8 if p.kind == "buffer" else np.dtype(kernel.param_dtype(p)).itemsize
                for p in kernel.op.params]
        assert entries[name] == want, name
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("ptxas (nvidia-cuda-nvcc wheel) not installed")
    src = tmp_path / "catalog.ptx"
    src.write_text(ptx)
    arch = f"sm_{cc[0]}{cc[1]}"
    out = subprocess.run([str(ptxas), f"-arch={arch}", str(src), "-o", str(tmp_path / "c.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c.cubin").stat().st_size > 0


@needs_nvrtc
def test_catalog_compiles_to_a_cubin_for_the_device_arch():
    compiled = nvrtc.compile_cuda(kernels.CATALOG_SOURCE, arch=(9, 0))
    assert compiled.kind == "cubin" and compiled.arch == "sm_90"
    assert compiled.image[:4] == b"\x7fELF"
    for name in cat.KERNELS:
        assert name.encode() in compiled.image


@needs_nvrtc
def test_cuda_source_with_a_syntax_error_gives_nvrtc_log():
    src = 'extern "C" __global__ void broken(float* x) { x[0] = 1.0f +; }\n'
    with pytest.raises(nvrtc.CompileError) as ei:
        nvrtc.compile_cuda(src, arch=(9, 0), name="user.cu")
    err = ei.value
    assert isinstance(err, harp.ArgumentError)
    assert "user.cu" in str(err) and "error" in err.log and "expected an expression" in err.log
    assert "NVRTC_ERROR_COMPILATION" in str(err)


@needs_nvrtc
def test_target_choice():
    assert nvrtc.choose_target((9, 0)) == ("sm_90", "cubin")
    assert nvrtc.choose_target((9, 0), "ptx") == ("compute_90", "ptx")
    archs = nvrtc.supported_archs()
    newest = max(archs)
    # a GPU newer than this NVRTC: PTX for the newest architecture it knows, JIT-compiled
    assert nvrtc.choose_target((99, 9)) == (f"compute_{newest}", "ptx")


def test_ptx_parsing():
    ptx = """
.visible .entry plain(
\t.param .u64 plain_param_0,
\t.param .f32 plain_param_1,
\t.param .u32 plain_param_2
)
{ ret; }
.entry empty()
{ ret; }
.weak .entry by_value(
\t.param .align 8 .b8 by_value_param_0[24],
\t.param .u64 .ptr .global .align 4 by_value_param_1
)
{ ret; }
"""
    assert kernels.ptx_entries(ptx) == {"plain": [8, 4, 4], "empty": [], "by_value": [24, 8]}
    assert kernels.ptx_text(ptx.encode() + b"\0garbage") == ptx


def test_numba_style_names_resolve():
    entries = ["_ZN8__main__5saxpyB2v1B92cw51cXTLSUwv1sDUaKthqaNgoKmjgE5ArrayIfLi1E1C7mutableE",
               "_ZN6cudapy4mod29two_wordsB2v3E5ArrayIdLi2E1C7mutableE", "plain_c"]
    assert kernels.resolve_entry(entries, "saxpy") == entries[0]
    assert kernels.resolve_entry(entries, "two_words") == entries[1]
    assert kernels.resolve_entry(entries, "plain_c") == "plain_c"
    with pytest.raises(harp.ArgumentError, match="no kernel 'nope'"):
        kernels.resolve_entry(entries, "nope")
    assert kernels.resolve_entry(entries + ["_Z6scaledPfi"], "scaled") == "_Z6scaledPfi"
    templated = ["_Z4axpyIfEvPT_S1_S0_x", "_Z4axpyIdEvPT_S1_S0_x"]
    with pytest.raises(harp.ArgumentError, match="ambiguous"):
        kernels.resolve_entry(templated, "axpy")
    assert kernels.resolve_entry(templated, templated[1]) == templated[1]
    twice = entries + ["_ZN8__main__5saxpyB2v2B9otherspecE5ArrayIdLi1E1C7mutableE"]
    with pytest.raises(harp.ArgumentError, match="ambiguous"):
        kernels.resolve_entry(twice, "saxpy")


# -- numba's CUDA array ABI, against numba's own PTX ---------------------------------------------

def _numba_ptx():
    pytest.importorskip("numba.cuda")
    from numba import cuda, float32, float64, int64
    try:
        def saxpy(out, x, y, a, n):
            i = cuda.grid(1)
            if i < n:
                out[i] = a * x[i] + y[i]

        def scale2d(m, alpha):
            r, c = cuda.grid(2)
            if r < m.shape[0] and c < m.shape[1]:
                m[r, c] = m[r, c] * alpha
        ptx1, _ = cuda.compile_ptx(saxpy, (float32[:], float32[:], float32[:], float32, int64),
                                   cc=(9, 0))
        ptx2, _ = cuda.compile_ptx(scale2d, (float64[:, :], float64), cc=(9, 0))
    except Exception as exc:   # numba without its CUDA toolchain (libNVVM)
        pytest.skip(f"numba cannot compile PTX here: {exc}")
    return ptx1, ptx2


def test_numba_array_params_match_numba_ptx():
    ptx1, ptx2 = _numba_ptx()
    e1, e2 = kernels.ptx_entries(ptx1), kernels.ptx_entries(ptx2)
    saxpy = kernels.resolve_entry(list(e1), "saxpy")
    f32 = np.dtype(np.float32)
    args = []
    for _ in range(3):
        args += kernels.numba_array_params(0x1000, f32, (100,), (4,))
    args += [np.float32(2), np.int64(100)]
    assert kernels.param_sizes(args) == e1[saxpy]
    scale2d = kernels.resolve_entry(list(e2), "scale2d")
    f64 = np.dtype(np.float64)
    args = kernels.numba_array_params(0x2000, f64, (6, 10),
                                      kernels.c_contiguous_strides((6, 10), 8)) + [np.float64(2)]
    assert kernels.param_sizes(args) == e2[scale2d]


def test_numba_array_params_values():
    p = kernels.numba_array_params(0xABC0, np.dtype(np.int32), (3, 5), (20, 4))
    assert [int(v) for v in p] == [0, 0, 15, 4, 0xABC0, 3, 5, 20, 4]
    assert [v.dtype.name for v in p] == ["uint64", "uint64", "int64", "int64", "uint64",
                                         "int64", "int64", "int64", "int64"]
    assert kernels.c_contiguous_strides((2, 3, 4), 8) == (96, 32, 8)
    assert kernels.array_extent(16, (3, 5), (20, 4), 4) == (16, 16 + 2 * 20 + 4 * 4 + 4)
    assert kernels.array_extent(100, (4,), (-8,), 8) == (76, 108)
    assert kernels.array_extent(8, (0, 5), (20, 4), 4) == (8, 8)
    with pytest.raises(harp.ArgumentError, match="outside its buffer"):
        kernels.check_array(64, 8, np.dtype(np.float32), (16,), None)
    with pytest.raises(harp.ArgumentError, match="multiples of the item size"):
        kernels.check_array(64, 2, np.dtype(np.float32), (4,), None)
    assert kernels.check_array(64, 0, np.dtype(np.float32), (4, 4), None) == (16, 4)


# -- the catalog's CUDA C, run in the host emulation --------------------------------------------

GRIDS = [((1,), (1,)), ((3,), (5,)), ((2, 2), (8, 4)), ((2, 1, 3), (3, 2, 2)), ((40,), (32,))]


def _reference(op, a, s):
    n = s.get("n")
    if op == "fill":
        a["out"][:n] = s["value"]
    elif op == "scale":
        a["out"][:n] = s["alpha"] * a["x"][:n]
    elif op == "axpy":
        a["y"][:n] = s["alpha"] * a["x"][:n] + a["y"][:n]
    elif op in ("add", "sub", "mul", "div"):
        fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op]
        a["out"][:n] = fn(a["a"][:n], a["b"][:n])
    elif op == "reduce_sum":
        a["out"][0] = a["x"][:n].sum(dtype=a["x"].dtype)
    elif op == "gemm":
        m, k = s["m"], s["k"]
        A = a["a"][:m * k].reshape(m, k).astype(np.float64)
        B = a["b"][:k * n].reshape(k, n).astype(np.float64)
        C = a["c"][:m * n].reshape(m, n)
        C[...] = s["alpha"] * (A @ B) + s["beta"] * C.astype(np.float64)


def _run_emulated(emulation, kernel, grid, block, rng, sizes):
    dtype = np.dtype(kernel.dtype) if kernel.dtype else np.dtype(np.uint8)
    args, model, got, scalars = [], {}, {}, {}
    for p in kernel.op.params:
        if p.kind == "scalar":
            t = np.dtype(kernel.param_dtype(p)).type
            value = t(sizes[p.name]) if p.name in sizes else t(
                {"alpha": 2.5, "beta": -0.5, "value": 7.25}[p.name] if dtype.kind == "f"
                else {"alpha": 3, "beta": 2, "value": -7}[p.name])
            scalars[p.name] = value
            args.append(value)
            continue
        count = cat.elements_needed(kernel, sizes)[p.name]
        if dtype.kind == "f":
            data = (rng.uniform(0.5, 2.0, count) * rng.choice([-1, 1], count)).astype(dtype)
        else:
            data = (rng.integers(1, 50, count) * rng.choice([-1, 1], count)).astype(dtype)
        guard = np.full(count + 16, 0x5A, np.uint8)
        buf = np.concatenate([guard[:8], data.view(np.uint8), guard[8:]])   # guarded, aligned
        got[p.name] = buf
        model[p.name] = data.copy()
        args.append(np.uint64(buf.ctypes.data + 8))
    if kernel.op.name == "reduce_sum":      # the backend zeroes out[0] before the launch
        got["out"][8:8 + dtype.itemsize] = 0
    _reference(kernel.op.name, model, {**scalars, **{k: int(v) for k, v in sizes.items()}})
    emulation.launch(kernel.name, grid, block, args)
    for name, buf in got.items():
        assert (buf[:8] == 0x5A).all() and (buf[8 + model[name].nbytes:] == 0x5A).all(), \
            f"{kernel.name} wrote outside {name}"
    return {k: v[8:8 + model[k].nbytes].view(dtype) for k, v in got.items()}, model, dtype


@pytest.mark.parametrize("name", sorted(cat.KERNELS))
def test_catalog_cuda_c_matches_numpy_in_emulation(emulation, name):
    kernel = cat.KERNELS[name]
    rng = np.random.default_rng(7)
    for grid, block in GRIDS:
        sizes = {"n": 7, "m": 5, "k": 3} if kernel.op.name == "gemm" else {"n": 101}
        got, model, dtype = _run_emulated(emulation, kernel, grid, block, rng, sizes)
        for pname, expected in model.items():
            if kernel.op.name in ("reduce_sum", "gemm") and dtype.kind == "f":
                tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else \
                    dict(rtol=1e-12, atol=1e-10)
                np.testing.assert_allclose(got[pname], expected, **tol,
                                           err_msg=f"{name} {grid} {block}")
            else:   # element-wise: bit-identical to NumPy, integers wrap
                np.testing.assert_array_equal(got[pname], expected,
                                              err_msg=f"{name} {grid} {block}")


@pytest.mark.parametrize("dtype,name", [(np.int32, "reduce_sum_i32"), (np.int64, "reduce_sum_i64")])
def test_integer_reduce_wraps_in_emulation(emulation, dtype, name):
    big = np.iinfo(dtype).max // 3
    x = np.full(1000, big, dtype)
    out = np.zeros(1, dtype)
    emulation.launch(name, (3,), (7,), [np.uint64(out.ctypes.data), np.uint64(x.ctypes.data),
                                        np.int64(x.size)])
    assert out[0] == x.sum(dtype=dtype)


def test_integer_elementwise_wraps_in_emulation(emulation):
    a = np.array([2**31 - 1, -2**31, 123456789], np.int32)
    b = np.array([1, -1, 1000], np.int32)
    out = np.zeros(3, np.int32)
    ptr = lambda v: np.uint64(v.ctypes.data)  # noqa: E731
    for op, fn in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply)):
        emulation.launch(f"{op}_i32", (1,), (2,), [ptr(out), ptr(a), ptr(b), np.int64(3)])
        np.testing.assert_array_equal(out, fn(a, b))


def test_reduce_with_every_block_size_in_emulation(emulation):
    x = np.arange(1, 300, dtype=np.int64)
    for threads in (1, 2, 3, 31, 32, 33, 64, 100, 255, 256):
        out = np.zeros(1, np.int64)
        emulation.launch("reduce_sum_i64", (2,), (threads,), [np.uint64(out.ctypes.data),
                                                            np.uint64(x.ctypes.data),
                                                            np.int64(x.size)])
        assert out[0] == x.sum(), threads


# -- CudaDevice on the host-memory stand-in -----------------------------------------------------

@pytest.fixture
def emulated(fake_cupy):
    """A session on the stand-in that trusts client code (so it compiles cuda-source)."""
    dev = load_backend("cuda", memory="1GiB", cupy=fake_cupy).open(0, trust_client_code=True)
    yield dev, fake_cupy.cuda
    dev.close()


def test_cuda_source_needs_trust(fake_cupy):
    """Without trust the device does not offer cuda-source, and refuses it by policy,
    saying to compile on the client."""
    with harp.connect("local:cuda", memory="1GiB") as dev:
        assert "cuda-source" not in dev.info.formats and "ptx" in dev.info.formats
        dev.load_module('extern "C" __global__ void k() {}', "cuda-source")
        with pytest.raises(harp.PermissionDeniedError, match="compile on the client"):
            dev.synchronize()


def test_emulated_info(emulated):
    dev, cuda = emulated
    info = dev.info
    assert info.kind == "gpu" and info.backend == "cuda" and info.compute_capability == (9, 0)
    from harp.backends.aten import torch_available
    aten = ("aten",) if torch_available() else ()     # the stand-in's memory is host memory
    assert info.formats == ("catalog", "ptx", "cubin", "fatbin", *aten, "cuda-source")
    assert info.memory == 1 << 30
    assert info.extra["nvrtc"].startswith("NVRTC")
    assert dev.mem_info() == harp.MemInfo(free=1 << 30, total=1 << 30)


def test_numba_python_is_refused(emulated):
    dev, _ = emulated
    dev.load_module("from numba import cuda\n", "numba-python")      # 1
    with pytest.raises(harp.UnsupportedError) as ei:
        dev.synchronize()                                            # 2
    assert (ei.value.call, ei.value.seq) == ("load_module", 1)
    assert "never client Python" in str(ei.value) and "PTX" in str(ei.value)


def test_numba_ptx_launch_expands_arrays(emulated):
    dev, cuda = emulated
    ptx, _ = _numba_ptx()
    n = 100
    bufs = [dev.alloc(4 * n + 16) for _ in range(3)]
    module = dev.load_module(ptx, "ptx")
    fn = dev.function(module, "saxpy")                  # the numba-mangled entry, by its name
    dev.launch(fn, 2, 64, [harp.ArrayArg(bufs[0], "float32", (n,), offset=16),
                           harp.ArrayArg(bufs[1], "float32", (n,)),
                           harp.ArrayArg(bufs[2], np.float32, (n,), offset=4),
                           np.float32(2.5), np.int64(n)])
    dev.synchronize()
    name, grid, block, args, shared, stream = cuda.launches[-1]
    assert name.startswith("_ZN") and "saxpy" in name
    assert grid == (2, 1, 1) and block == (64, 1, 1)
    assert len(args) == 3 * 7 + 2
    first = [int(a) for a in args[:7]]
    assert first[:4] == [0, 0, n, 4] and first[5:] == [n, 4]
    third = [int(a) for a in args[14:21]]
    assert third[4] - first[4] != 0 and (first[4] % 512, third[4] % 512) == (16, 4)
    assert args[21] == np.float32(2.5) and args[21].dtype == np.float32
    assert args[22] == n and args[22].dtype == np.int64


def test_compiled_kernel_argument_checks_are_deferred(emulated):
    dev, cuda = emulated
    ptx, _ = _numba_ptx()
    buf = dev.alloc(64)                                          # 1
    module = dev.load_module(ptx, "ptx")                         # 2
    fn = dev.function(module, "saxpy")                           # 3
    arr = harp.ArrayArg(buf, "float32", (16,))
    dev.launch(fn, 1, 16, [arr, arr, np.float32(1), np.int64(16)])          # 4: too few
    dev.launch(fn, 1, 16, [arr, arr, harp.ArrayArg(buf, "float32", (17,)),
                           np.float32(1), np.int64(16)])                    # 5: past the end
    dev.launch(fn, 1, 16, [arr, arr, arr, np.float64(1), np.int64(16)])     # 6: 8-byte alpha
    launched = len(cuda.launches)
    with pytest.raises(harp.ArgumentError) as ei:
        dev.synchronize()                                        # 7
    errors = [ei.value, *ei.value.later]
    assert [(e.call, e.seq) for e in errors] == [("launch", 4), ("launch", 5), ("launch", 6)]
    assert "takes 23 parameters" in str(errors[0])
    assert "outside its buffer" in str(errors[1])
    assert "takes 23 parameters" in str(errors[2]) and "numba's array layout" in str(errors[2])
    assert len(cuda.launches) == launched                     # nothing reached the GPU
    dev.launch(fn, 1, 16, [arr, arr, arr, np.float32(1), np.int64(16)])
    dev.synchronize()
    assert len(cuda.launches) == launched + 1


def test_plain_ptx_gets_pointers_for_arrays(emulated):
    dev, cuda = emulated
    ptx = kernels.ptx_text(
        '.version 8.0\n.target sm_90\n.address_size 64\n'
        '.visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1\n)\n{ ret; }\n')
    buf = dev.alloc(64)
    fn = dev.function(dev.load_module(ptx, "ptx"), "k")
    dev.launch(fn, 1, 1, [harp.ArrayArg(buf, "int32", (4,), offset=8), np.int32(3)])
    dev.launch(fn, 1, 1, [harp.BufferArg(buf, 4), np.int32(3)])
    dev.synchronize()
    (_, _, _, a1, _, _), (_, _, _, a2, _, _) = cuda.launches[-2:]
    assert int(a1[0]) + 0 == int(a2[0]) + 4 and len(a1) == 2 and a1[1].dtype == np.int32


def test_cuda_source_module_is_compiled_on_the_device(emulated):
    dev, cuda = emulated
    good = 'extern "C" __global__ void twice(float* x, long long n) { x[threadIdx.x] *= 2; }'
    fn = dev.function(dev.load_module(good, "cuda-source"), "twice")    # 1, 2
    dev.load_module(b'extern "C" __global__ void bad( {', "cuda-source")  # 3
    with pytest.raises(harp.ArgumentError) as ei:
        dev.synchronize()                                                  # 4
    assert (ei.value.call, ei.value.seq) == ("load_module", 3)
    assert "NVRTC could not compile" in str(ei.value) and "error" in str(ei.value)
    buf = dev.alloc(16)
    dev.launch(fn, 1, 4, [harp.BufferArg(buf), np.int64(4)])
    dev.synchronize()
    assert cuda.launches[-1][0] == "twice"


def test_driver_refusing_an_image_is_deferred(emulated):
    dev, _ = emulated
    dev.load_module(b"\0\0\0", "cubin")                          # 1
    dev.load_module("not ptx at all", "cubin")                   # 2: a cubin is bytes
    with pytest.raises(harp.ArgumentError) as ei:
        dev.synchronize()                                        # 3
    assert (ei.value.call, ei.value.seq) == ("load_module", 1)
    assert "refused the cubin image" in str(ei.value)
    assert ei.value.later[0].seq == 2


def test_sticky_gpu_fault_names_the_launch_and_ends_the_gpu(emulated, monkeypatch):
    dev, cuda = emulated
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")         # 1
    fill = dev.function(lib, "fill_f32")                         # 2
    buf = dev.alloc(64)                                          # 3
    s = dev.stream()                                             # 4
    dev.launch(fill, 1, 16, [harp.BufferArg(buf), np.float32(1), np.int64(16)], stream=s)  # 5
    dev.launch(fill, 1, 16, [harp.BufferArg(buf), np.float32(2), np.int64(16)], stream=s)  # 6
    dev.fill(buf, 0)                                             # 7

    def fault(self):
        raise cuda.CUDARuntimeError(700, "cudaErrorIllegalAddress: an illegal memory access")
    monkeypatch.setattr(cuda.Stream, "synchronize", fault)
    with pytest.raises(harp.DeviceError) as ei:
        dev.synchronize()                                        # 8
    err = ei.value
    assert (err.call, err.seq) == ("launch", 5)
    assert "fill_f32" in str(err) and "sticky" in str(err) and "illegal" in str(err)
    monkeypatch.undo()
    for call in (lambda: dev.alloc(4), lambda: dev.synchronize(), lambda: dev.mem_info()):
        with pytest.raises(harp.DeviceError, match="unusable after an earlier failure"):
            call()
    dev.close()
    dev.close()


def test_errors_stay_in_call_order():
    """A failure learnt late (a kernel fault, at a sync call) goes before later ones."""
    from harp.frontend import DeferredErrors
    errors = DeferredErrors()
    errors.add(harp.InvalidHandleError("b"), "free", 7)
    errors.add(harp.DeviceError("a"), "launch", 3)
    errors.add(harp.ArgumentError("c"), "write", 9)
    first = errors.take()
    assert (first.call, first.seq) == ("launch", 3)
    assert [e.seq for e in first.later] == [7, 9]


def test_free_waits_for_work_in_flight_before_reuse(emulated):
    """A freed block is fenced on every busy stream and released once the fences pass."""
    dev, cuda = emulated
    card = dev._card
    s = dev.stream()
    buf = dev.alloc(4096)
    dev.fill(buf, 1, stream=s)                  # s is busy
    dev.free(buf)
    assert len(card._pending) == 1 and len(card._pending[0][1]) == 1
    assert dev.mem_info().free == 1 << 30       # accounted as free at once
    dev.synchronize()
    assert card._pending == []
    idle = dev.alloc(64)
    dev.synchronize()
    dev.free(idle)                              # nothing in flight: released at once
    assert card._pending == []


@needs_nvrtc
def test_cubin_without_parameter_info_gets_zero_padding(emulated):
    """A cubin's parameters come from the driver (CUDA 12.4+); without them, a launch carries
    zero padding so a kernel given too few arguments reads zeros, not host memory."""
    dev, cuda = emulated
    src = ('extern "C" __global__ void k(float* x, int n) '
           '{ if (threadIdx.x < n) x[threadIdx.x] = 1; }')
    cubin = nvrtc.compile_cuda(src, arch=(9, 0), kind="cubin").image
    buf = dev.alloc(64)
    fn = dev.function(dev.load_module(cubin, "cubin"), "k")
    dev.launch(fn, 1, 16, [harp.BufferArg(buf), np.int32(16)])
    dev.synchronize()
    args = cuda.launches[-1][3]
    from harp.backends.cuda.device import PAD_PARAMS
    assert len(args) == 2 + PAD_PARAMS
    assert all(isinstance(a, np.ndarray) and a.size == 1 and a.nbytes == 32768
               and not a.tobytes().strip(b"\0") for a in args[2:])
    # the same kernel as cuda-source: parameters known from NVRTC's PTX, so checked, not padded
    fn2 = dev.function(dev.load_module(src, "cuda-source"), "k")
    dev.launch(fn2, 1, 16, [harp.BufferArg(buf)])
    with pytest.raises(harp.ArgumentError, match="takes 2 parameters of \\[8, 4\\] bytes"):
        dev.synchronize()
    dev.launch(fn2, 1, 16, [harp.BufferArg(buf), np.int32(16)])
    dev.synchronize()
    assert len(cuda.launches[-1][3]) == 2
