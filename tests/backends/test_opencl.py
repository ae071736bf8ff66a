"""The opencl backend on a real OpenCL implementation (PoCL on the CPU in CI; the
conformance suite runs on it too, as local-opencl, traced-opencl and remote-opencl).

Tests that need a device skip, saying why, where PyOpenCL or an OpenCL device is
missing; the tests of availability stand a fake module in for PyOpenCL, and the
tests of the generated catalog source need neither.
"""
from __future__ import annotations

import time
import types

import numpy as np
import pytest

import harp
from harp import catalog as cat
from harp.backends import load_backend
from harp.backends.opencl import programs
from harp.errors import BackendError
from harp.tenancy import ComputeGate, Ledger, Tenancy

SAXPY = """
__kernel void saxpy(__global float* out, __global const float* x, const float a,
                    const int n)
{
    int i = get_global_id(0);
    if (i < n)
        out[i] = a * x[i] + out[i];
}
__kernel void first(__global int* out, __global const int* x) { out[0] = x[0]; }
"""


@pytest.fixture(scope="module")
def backend():
    """One opencl backend for the module (1 GiB per device), or a skip saying why not."""
    b = load_backend("opencl", memory="1GiB")
    ok, why = b.available()
    if not ok:
        pytest.skip(f"needs PyOpenCL and an OpenCL device (pip install 'harp[opencl]'): {why}")
    return b


@pytest.fixture
def dev(backend):
    device = backend.open(0)
    yield device
    device.close()


@pytest.fixture
def trusted(backend):
    device = backend.open(0, trust_client_code=True)
    yield device
    device.close()


def _cl_device(backend):
    return backend._devices[0]


def _floats(device, values):
    data = np.asarray(values, np.float32)
    buf = device.alloc(data.nbytes)
    device.write(buf, 0, data)
    return buf


def _read(device, buf, dtype, count, offset=0):
    return np.frombuffer(device.read(buf, offset, count * np.dtype(dtype).itemsize), dtype)


# -- facts ----------------------------------------------------------------------------

def test_info_describes_the_opencl_device(backend, dev, trusted):
    import pyopencl as cl
    cl_dev = _cl_device(backend)
    info = dev.info
    expected = "gpu" if cl_dev.type & cl.device_type.GPU else \
        "fpga" if cl_dev.type & cl.device_type.ACCELERATOR else "cpu"
    assert info.kind == expected
    assert info.backend == "opencl" and info.index == 0
    assert info.name == cl_dev.name.strip()
    assert info.memory == min(1 << 30, cl_dev.global_mem_size)
    assert info.formats == ("catalog", "opencl-binary")
    assert trusted.info.formats == ("catalog", "opencl-binary", "opencl-source")
    extra = info.extra
    assert extra["platform"] == cl_dev.platform.name.strip()
    assert extra["max_mem_alloc_size"] == cl_dev.max_mem_alloc_size
    assert extra["max_work_group_size"] == cl_dev.max_work_group_size
    assert extra["compute_units"] == cl_dev.max_compute_units
    assert extra["fp64"] is ("cl_khr_fp64" in cl_dev.extensions.split())
    for key in ("platform_version", "device_version", "driver_version"):
        assert isinstance(extra[key], str) and extra[key]
    assert harp.DeviceInfo.from_dict(info.to_dict()) == info
    assert backend.describe(0).memory == min(1 << 30, cl_dev.global_mem_size)


def test_memory_option_caps_mem_info(backend):
    small = load_backend("opencl", memory="64MiB")
    with small.open(0) as device:
        assert device.mem_info().total == 64 << 20
        device.alloc((64 << 20) + 1)
        with pytest.raises(harp.OutOfMemoryError, match="64.0 MiB"):
            device.synchronize()
    with backend.open(0, memory_quota=1 << 20) as device:
        assert device.info.memory == 1 << 20 and device.mem_info().total == 1 << 20


def test_memory_and_platform_from_the_environment(backend, monkeypatch):
    monkeypatch.setenv("HARP_OPENCL_MEMORY", "32MiB")
    monkeypatch.setenv("HARP_OPENCL_PLATFORM", _cl_device(backend).platform.name[:4].lower())
    env = load_backend("opencl")
    assert env.available() == (True, "")
    assert env.describe(0).memory == 32 << 20


def test_an_allocation_past_max_mem_alloc_size_is_a_deferred_out_of_memory(backend):
    limit = _cl_device(backend).max_mem_alloc_size
    roomy = load_backend("opencl", memory=limit + (1 << 20))
    with roomy.open(0) as device:
        if device.info.memory <= limit:
            pytest.skip("the device has no more memory than it allocates at once")
        device.alloc(limit + 1)
        with pytest.raises(harp.OutOfMemoryError, match="max_mem_alloc_size") as info:
            device.synchronize()
        assert info.value.call == "alloc"
        assert device.mem_info().free == device.mem_info().total


# -- availability ---------------------------------------------------------------------

def _broken_driver(exc: Exception) -> types.SimpleNamespace:
    def get_platforms():
        raise exc
    return types.SimpleNamespace(get_platforms=get_platforms)


def test_no_opencl_platform_is_unavailable_with_the_reason():
    b = load_backend("opencl", cl=_broken_driver(RuntimeError("clGetPlatformIDs failed: "
                                                              "PLATFORM_NOT_FOUND_KHR")))
    ok, why = b.available()
    assert not ok and "PLATFORM_NOT_FOUND_KHR" in why and "no OpenCL platform" in why
    assert b.device_count() == 0
    with pytest.raises(BackendError, match="unavailable"):
        b.open(0)
    with pytest.raises(BackendError, match="unavailable"):
        b.describe(0)


def test_platforms_without_devices_are_unavailable():
    def no_devices():
        raise RuntimeError("DEVICE_NOT_FOUND")
    platform = types.SimpleNamespace(name="Empty Platform", get_devices=no_devices)
    b = load_backend("opencl", cl=types.SimpleNamespace(get_platforms=lambda: [platform]))
    ok, why = b.available()
    assert not ok and "Empty Platform" in why and "no devices" in why


def test_an_unknown_platform_name_is_unavailable(backend):
    b = load_backend("opencl", platform="no-such-platform")
    ok, why = b.available()
    assert not ok and "no-such-platform" in why
    assert _cl_device(backend).platform.name.strip() in why


# -- client modules -------------------------------------------------------------------

def _run_saxpy(device, module):
    fn = device.function(module, "saxpy")
    out, x = _floats(device, np.ones(40)), _floats(device, np.arange(40))
    device.launch(fn, (3,), (16,), [harp.BufferArg(out), harp.BufferArg(x), np.float32(2),
                                    np.int32(40)])
    np.testing.assert_array_equal(_read(device, out, np.float32, 40), 2 * np.arange(40) + 1)


def test_opencl_source_is_refused_without_trust(dev):
    dev.load_module(SAXPY, "opencl-source")                        # 1
    with pytest.raises(harp.PermissionDeniedError) as info:
        dev.synchronize()                                         # 2
    assert (info.value.call, info.value.seq) == ("load_module", 1)
    assert "opencl-binary" in str(info.value) and "--trust-client-code" in str(info.value)
    dev.synchronize()


def test_opencl_source_runs_when_trusted(trusted):
    _run_saxpy(trusted, trusted.load_module(SAXPY, "opencl-source"))
    assert trusted.mem_info().free < trusted.mem_info().total     # the source counts


def test_opencl_binary_round_trip_on_an_untrusted_device(backend, dev):
    import pyopencl as cl
    ctx = cl.Context([_cl_device(backend)])                       # the client's own build
    binary = cl.Program(ctx, SAXPY).build().binaries[0]
    module = dev.load_module(binary, "opencl-binary")
    _run_saxpy(dev, module)
    first = dev.function(module, "first")
    a, b = dev.alloc(4), dev.alloc(4)
    dev.write(b, 0, np.int32(-7).tobytes())
    dev.launch(first, 1, 1, [a, b])
    assert _read(dev, a, np.int32, 1)[0] == -7


def test_installed_binaries_are_catalog_entries(backend, tmp_path):
    """An operator's program binaries (`binaries=DIR`) appear beside the catalog's own
    kernels, on sessions that trust no client code; a file the device refuses is listed
    with the reason and left out."""
    import pyopencl as cl
    ctx = cl.Context([_cl_device(backend)])
    (tmp_path / "saxpy.bin").write_bytes(cl.Program(ctx, SAXPY).build().binaries[0])
    (tmp_path / "broken.bin").write_bytes(b"not a program binary" * 8)
    (tmp_path / "notes.txt").write_text("not looked at")
    installed = load_backend("opencl", memory="1GiB", binaries=str(tmp_path))
    with installed.open(0) as device:
        extra = device.info.extra
        assert extra["installed_kernels"] == ["first", "saxpy"]
        assert list(extra["installed_refused"]) == ["broken.bin"]
        assert "opencl-source" not in device.info.formats
        _run_saxpy(device, device.load_module(harp.CATALOG_IMAGE, "catalog"))
        lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
        device.function(lib, "no_such_kernel")
        with pytest.raises(harp.ArgumentError, match="the catalog has no kernel"):
            device.synchronize()
    with backend.open(0) as plain:                 # a backend without them: not there
        lib = plain.load_module(harp.CATALOG_IMAGE, "catalog")
        plain.function(lib, "saxpy")
        with pytest.raises(harp.ArgumentError, match="the catalog has no kernel 'saxpy'"):
            plain.synchronize()


def test_a_bad_binary_is_a_deferred_argument_error(dev):
    dev.load_module(b"this is not a program binary" * 8, "opencl-binary")     # 1
    with pytest.raises(harp.ArgumentError, match="refused the opencl-binary") as info:
        dev.synchronize()
    assert (info.value.call, info.value.seq) == ("load_module", 1)
    dev.load_module("text", "opencl-binary")
    with pytest.raises(harp.ArgumentError, match="is bytes"):
        dev.synchronize()
    assert dev.mem_info().free == dev.mem_info().total           # nothing kept


def test_a_build_failure_carries_the_build_log(trusted):
    trusted.load_module("__kernel void k(__global int* x) { x[0] = missing; }",
                        "opencl-source")
    with pytest.raises(harp.ArgumentError, match="did not build") as info:
        trusted.synchronize()
    assert "missing" in str(info.value)


def test_kernel_lookup_and_launch_errors_are_deferred(trusted):
    module = trusted.load_module(SAXPY, "opencl-source")           # 1
    trusted.function(module, "nope")                               # 2
    with pytest.raises(harp.ArgumentError, match="first, saxpy") as info:
        trusted.synchronize()                                      # 3
    assert (info.value.call, info.value.seq) == ("function", 2)
    fn = trusted.function(module, "saxpy")                         # 4
    out = _floats(trusted, np.zeros(4))                            # 5, 6
    trusted.launch(fn, 1, 4, [harp.BufferArg(out), np.float32(1), np.int32(4)])    # 7
    with pytest.raises(harp.ArgumentError, match="takes 4 arguments, got 3") as info:
        trusted.synchronize()
    assert (info.value.call, info.value.seq) == ("launch", 7)
    args = [harp.BufferArg(out), harp.BufferArg(out), np.float32(1), np.int32(4)]
    trusted.launch(fn, 1, 4, args, shared_mem=256)
    with pytest.raises(harp.ArgumentError, match="__local"):
        trusted.synchronize()
    limit = trusted.info.extra["max_work_group_size"]
    trusted.launch(fn, 1, limit + 1, args)
    with pytest.raises(harp.ArgumentError, match="work-items"):
        trusted.synchronize()
    trusted.launch(fn, 1, 4, [harp.BufferArg(out), harp.BufferArg(out), np.int32(1),
                              np.float32(4)])      # the wrong sizes for float a, int n
    trusted.synchronize()   # both 4 bytes: OpenCL cannot tell; the kernel runs
    trusted.launch(fn, 1, 4, [harp.BufferArg(out), harp.BufferArg(out), np.float64(1),
                              np.int32(4)])
    with pytest.raises(harp.ArgumentError, match="do not fit"):
        trusted.synchronize()


def test_buffer_arguments_at_an_offset(trusted):
    module = trusted.load_module(SAXPY, "opencl-source")
    first = trusted.function(module, "first")
    align = trusted.info.extra["mem_base_addr_align"]
    src = trusted.alloc(2 * align)
    trusted.write(src, 0, np.arange(2 * align // 4, dtype=np.int32))
    out = trusted.alloc(4)
    trusted.launch(first, 1, 1, [out, harp.BufferArg(src, align)])          # a sub-buffer
    assert _read(trusted, out, np.int32, 1)[0] == align // 4
    trusted.launch(first, 1, 1, [out, harp.ArrayArg(src, "int32", (4,), offset=align)])
    assert _read(trusted, out, np.int32, 1)[0] == align // 4
    trusted.launch(first, 1, 1, [out, harp.BufferArg(src, 4)])
    with pytest.raises(harp.ArgumentError, match="mem_base_addr_align"):
        trusted.synchronize()
    trusted.launch(first, 1, 1, [out, harp.ArrayArg(src, "int32", (2 * align,))])
    with pytest.raises(harp.ArgumentError, match="does not fit"):
        trusted.synchronize()


# -- the catalog ----------------------------------------------------------------------

def test_the_generated_program_has_every_catalog_kernel():
    full, no_fp64 = programs.catalog_source(True), programs.catalog_source(False)
    for name, kernel in cat.KERNELS.items():
        assert f"__kernel void {name}(" in full
        assert (f"__kernel void {name}(" in no_fp64) == (kernel.dtype != "float64")
    assert set(programs.kernel_names(True)) == set(cat.KERNELS)
    assert "cl_khr_fp64" in full and "cl_khr_fp64" not in no_fp64
    assert "as_int((uint)a[i] + (uint)b[i])" in programs.kernel_source(cat.KERNELS["add_i32"])


def test_ndrange_is_chosen_from_the_sizes():
    axpy, reduce, gemm = (cat.KERNELS[n] for n in ("axpy_f32", "reduce_sum_f32", "gemm_f64"))
    assert programs.ndrange(axpy, {"n": 0}, 64) == (64, 64)
    assert programs.ndrange(axpy, {"n": 100}, 64) == (128, 64)
    assert programs.ndrange(axpy, {"n": 1 << 40}, 64) == (programs.MAX_GROUPS * 64, 64)
    assert programs.ndrange(reduce, {"n": 1 << 20}, 256) == (256, 256)
    assert programs.ndrange(gemm, {"m": 3, "n": 5, "k": 7}, 64) == (64, 64)
    assert programs.group_size(reduce, 200) == 128 and programs.group_size(axpy, 16) == 16


def _model(kernel: cat.Kernel, arrays: dict, scalars: dict) -> dict:
    dtype = np.dtype(kernel.dtype)
    out = {k: v.copy() for k, v in arrays.items()}
    with np.errstate(all="ignore"):
        op, n = kernel.op.name, scalars.get("n")
        if op == "fill":
            out["out"][:n] = scalars["value"]
        elif op == "scale":
            out["out"][:n] = scalars["alpha"] * out["x"][:n]
        elif op == "axpy":
            out["y"][:n] = scalars["alpha"] * out["x"][:n] + out["y"][:n]
        elif op in ("add", "sub", "mul", "div"):
            ufunc = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op]
            out["out"][:n] = ufunc(out["a"][:n], out["b"][:n])
        elif op == "reduce_sum":
            out["out"][0] = out["x"][:n].sum(dtype=dtype)
        elif op == "gemm":
            m, k = scalars["m"], scalars["k"]
            a, b = out["a"].reshape(m, k), out["b"].reshape(k, n)
            out["c"][:] = (scalars["alpha"] * (a @ b) + scalars["beta"] *
                           out["c"].reshape(m, n)).reshape(-1)
    return out


@pytest.mark.parametrize("name", sorted(cat.KERNELS))
def test_every_catalog_kernel_matches_numpy(dev, name):
    kernel = cat.KERNELS[name]
    if kernel.dtype is None:
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        dev.launch(dev.function(lib, name), 1, 1, [])
        dev.synchronize()
        return
    dtype, rng = np.dtype(kernel.dtype), np.random.default_rng(7)
    sizes = {"n": 1000, "m": 9, "k": 11} if kernel.op.name != "gemm" else \
        {"m": 9, "n": 13, "k": 11}
    scalars, arrays, args, bufs = {}, {}, [], {}
    need = cat.elements_needed(kernel, sizes)
    for p in kernel.op.params:
        if p.kind == "scalar":
            pdtype = np.dtype(kernel.param_dtype(p))
            value = sizes[p.name] if p.name in sizes else \
                {"alpha": 3, "beta": -2, "value": -5}[p.name]
            if pdtype.kind == "f":
                value = value + 0.25
            scalars[p.name] = pdtype.type(value)
            args.append(scalars[p.name])
            continue
        if dtype.kind == "f":
            data = rng.uniform(0.5, 2, need[p.name]).astype(dtype)
        else:   # large values: the integer kernels must wrap
            info = np.iinfo(dtype)
            data = rng.integers(info.min // 2, info.max // 2, need[p.name], dtype=dtype)
        offset = 2 * dtype.itemsize
        buf = dev.alloc(offset + data.nbytes)
        dev.write(buf, offset, data)
        arrays[p.name], bufs[p.name] = data, (buf, offset)
        args.append(harp.BufferArg(buf, offset))
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    dev.launch(dev.function(lib, name), (7,), (3,), args)
    expected = _model(kernel, arrays, {k: (int(v) if k in sizes else v)
                                       for k, v in scalars.items()})
    for pname, (buf, offset) in bufs.items():
        got = _read(dev, buf, dtype, len(arrays[pname]), offset)
        if dtype.kind == "f":
            rtol = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, expected[pname], rtol=rtol, err_msg=pname)
        else:
            np.testing.assert_array_equal(got, expected[pname], err_msg=pname)


def test_large_launches_loop_over_their_elements_and_reduce_deterministically(dev):
    n = programs.MAX_GROUPS * programs.GROUP + 12345    # more elements than work-items
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    xb, yb, out = dev.alloc(x.nbytes), dev.alloc(x.nbytes), dev.alloc(8)
    dev.write(xb, 0, x)
    dev.launch(dev.function(lib, "scale_f32"), 1, 1, [yb, xb, np.float32(2), np.int64(n)])
    np.testing.assert_array_equal(_read(dev, yb, np.float32, n), 2 * x)
    total = dev.function(lib, "reduce_sum_f32")
    sums = set()
    for grid in (1, 8, 100):
        dev.launch(total, grid, 32, [out, xb, np.int64(n)])
        sums.add(dev.read(out, 0, 4))
    assert len(sums) == 1                                 # the same bits every time
    assert np.frombuffer(sums.pop(), np.float32)[0] == pytest.approx(x.sum(dtype=np.float64),
                                                                     rel=1e-4, abs=1e-2)


def test_gemm_keeps_a_nan_of_c_when_beta_is_zero_as_numpy_does(dev):
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    a, b = _floats(dev, [1, 2, 3, 4]), _floats(dev, [1, 0, 0, 1])
    c = _floats(dev, [np.nan, 1, 1, 1])
    dev.launch(dev.function(lib, "gemm_f32"), 1, 1, [c, a, b, np.int64(2), np.int64(2),
                                                     np.int64(2), np.float32(1), np.float32(0)])
    got = _read(dev, c, np.float32, 4)
    assert np.isnan(got[0]) and got[1:].tolist() == [2, 3, 4]


def test_catalog_offsets_must_be_aligned(dev):
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    buf = dev.alloc(64)
    dev.launch(dev.function(lib, "fill_f32"), 1, 1, [harp.BufferArg(buf, 2), np.float32(1),
                                                     np.int64(4)])
    with pytest.raises(harp.ArgumentError, match="not aligned"):
        dev.synchronize()


def test_fp64_is_reported_and_its_kernels_need_it(backend):
    assert backend.describe(0).extra["fp64"] is \
        ("cl_khr_fp64" in _cl_device(backend).extensions.split())
    no_fp64 = load_backend("opencl", memory="64MiB")
    no_fp64.available()
    no_fp64._card(0).fp64 = False          # a device without cl_khr_fp64, as far as HARP knows
    with no_fp64.open(0) as device:
        lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
        device.function(lib, "axpy_f64")
        with pytest.raises(harp.ArgumentError, match="no fp64"):
            device.synchronize()
        y = _floats(device, [1, 2])
        device.launch(device.function(lib, "axpy_f32"), 1, 1,
                      [y, y, np.float32(1), np.int64(2)])
        np.testing.assert_array_equal(_read(device, y, np.float32, 2), [2, 4])


# -- lifetime and sharing -------------------------------------------------------------

def test_close_drops_the_queued_catalog_kernels(backend):
    device = backend.open(0)
    lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = device.function(lib, "gemm_f32")
    m = 384
    a = device.alloc(m * m * 4)
    s = device.stream()
    device.synchronize()
    queue = device._streams[s.id].queue          # to see what is left of its work after close
    t0 = time.monotonic()
    for _ in range(300):                         # about 15 s of work on PoCL with 2 cores
        device.launch(gemm, 1, 1, [a, a, a, np.int64(m), np.int64(m), np.int64(m),
                                   np.float32(1), np.float32(0)], stream=s)
    issued = time.monotonic() - t0
    t0 = time.monotonic()
    device.close()
    assert time.monotonic() - t0 < 0.5
    queue.finish()          # the kernels still queued find the session's cancel flag set
    assert time.monotonic() - t0 < 2 + issued


class _CountingGate(ComputeGate):
    def __init__(self) -> None:
        self.entered = self.exited = self.idles = 0
        self.device_ns = 0

    def enter(self) -> None:
        self.entered += 1

    def exit(self, device_ns: int) -> None:
        self.exited += 1
        self.device_ns += device_ns

    def idle(self) -> None:
        self.idles += 1


def test_launches_hold_the_compute_gate_and_are_charged_device_time(backend):
    ledger = Ledger()
    ledger.add_device(0, 1 << 30)
    gate = _CountingGate()
    with backend.open(0, tenancy=Tenancy(ledger.open("s", 0), gate)) as device:
        lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
        fill = device.function(lib, "fill_f32")
        buf = device.alloc(4 << 20)
        for _ in range(20):
            device.launch(fill, 1, 1, [buf, np.float32(1), np.int64(1 << 20)])
        device.synchronize()
        device.launch(fill, 1, 1, [buf, np.float32(2), np.int64(1)])    # harvests the rest
        assert ledger.session_used("s") == 4 << 20
    assert gate.entered == gate.exited == 21
    assert gate.device_ns > 0 and gate.idles >= 1
