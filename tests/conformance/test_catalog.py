"""Every catalog kernel (harp.catalog.KERNELS) against a NumPy model.

The test iterates over the catalog, so a new kernel is covered as soon as it
is added; a new *operation* needs a NumPy reference in REFERENCE below, and
test_every_op_has_a_reference fails until it has one.
"""
from __future__ import annotations

import numpy as np
import pytest

import harp
from harp import catalog as cat

TAIL = 16          # guard bytes after each buffer's elements, which no kernel may touch
SIZES = {"n": 37, "m": 5, "k": 3}
GEMM_N = 7


def _ref_fill(a, s):
    a["out"][:s["n"]] = s["value"]


def _ref_scale(a, s):
    n = s["n"]
    a["out"][:n] = s["alpha"] * a["x"][:n]


def _ref_axpy(a, s):
    n = s["n"]
    a["y"][:n] = s["alpha"] * a["x"][:n] + a["y"][:n]


def _binary(ufunc):
    def ref(a, s):
        n = s["n"]
        a["out"][:n] = ufunc(a["a"][:n], a["b"][:n])
    return ref


def _ref_reduce_sum(a, s):
    a["out"][0] = a["x"][:s["n"]].sum(dtype=a["x"].dtype)


def _ref_gemm(a, s):
    m, n, k = s["m"], s["n"], s["k"]
    A = a["a"][:m * k].reshape(m, k).astype(np.float64)
    B = a["b"][:k * n].reshape(k, n).astype(np.float64)
    C = a["c"][:m * n].reshape(m, n)
    C[...] = (float(s["alpha"]) * (A @ B) + float(s["beta"]) * C.astype(np.float64))


REFERENCE = {
    "noop": lambda a, s: None,
    "fill": _ref_fill,
    "scale": _ref_scale,
    "axpy": _ref_axpy,
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "div": _binary(np.divide),
    "reduce_sum": _ref_reduce_sum,
    "gemm": _ref_gemm,
}


def test_every_op_has_a_reference():
    assert set(cat.OPS) <= set(REFERENCE), sorted(set(cat.OPS) - set(REFERENCE))


def _elements_needed(kernel: cat.Kernel, pname: str) -> int:
    op = kernel.op.name
    if op == "gemm":
        m, k, n = SIZES["m"], SIZES["k"], GEMM_N
        return {"a": m * k, "b": k * n, "c": m * n}[pname]
    if op == "reduce_sum" and pname == "out":
        return 1
    return SIZES["n"]


def _scalar(kernel: cat.Kernel, p: cat.Param):
    dtype = np.dtype(kernel.param_dtype(p))
    if p.name in SIZES:
        value = GEMM_N if (kernel.op.name == "gemm" and p.name == "n") else SIZES[p.name]
        return dtype.type(value)
    floaty = dtype.kind == "f"
    return dtype.type({"alpha": 2.5 if floaty else 3, "beta": -0.5 if floaty else 2,
                       "value": 7.25 if floaty else -7}.get(p.name, 1))


def _random_elements(rng, dtype: np.dtype, count: int) -> np.ndarray:
    sign = rng.choice(np.array([-1, 1]), count)
    if dtype.kind == "f":
        return (rng.uniform(0.5, 2.0, count) * sign).astype(dtype)
    return (rng.integers(1, 50, count) * sign).astype(dtype)


def _tolerance(dtype: np.dtype) -> dict:
    if dtype == np.float32:
        return dict(rtol=1e-5, atol=1e-4)
    if dtype == np.float64:
        return dict(rtol=1e-12, atol=1e-10)
    return dict(rtol=0, atol=0)


def _run_kernel(device, module, kernel: cat.Kernel, rng, grid=(2,), block=(32,), stream=None):
    """Launch `kernel` on random inputs at non-zero offsets; return (model, device result)."""
    dtype = np.dtype(kernel.dtype) if kernel.dtype else np.dtype(np.uint8)
    fn = device.function(module, kernel.name)
    args, scalars, bufs, model, guards = [], {}, {}, {}, {}
    for i, p in enumerate(kernel.op.params):
        if p.kind == "scalar":
            value = _scalar(kernel, p)
            assert value.dtype == np.dtype(kernel.param_dtype(p))
            scalars[p.name] = value
            args.append(value)
            continue
        count = _elements_needed(kernel, p.name)
        offset = dtype.itemsize * (3 + 2 * i)            # non-zero and aligned to T
        data = _random_elements(rng, dtype, count)
        head = rng.integers(0, 256, offset, dtype=np.uint8).tobytes()
        tail = rng.integers(0, 256, TAIL, dtype=np.uint8).tobytes()
        buf = device.alloc(offset + data.nbytes + TAIL)
        device.write(buf, 0, head + data.tobytes() + tail, stream=stream)
        bufs[p.name] = (buf, offset, count)
        model[p.name] = data.copy()
        guards[p.name] = (head, tail)
        args.append(harp.BufferArg(buf, offset))
    ints = {k: int(v) for k, v in scalars.items() if k in SIZES}
    REFERENCE[kernel.op.name](model, {**scalars, **ints})
    device.launch(fn, grid, block, args, stream=stream)
    got = {}
    for name, (buf, offset, count) in bufs.items():
        raw = device.read(buf, 0, buf.nbytes, stream=stream)
        head, tail = guards[name]
        assert bytes(raw[:offset]) == head, f"{kernel.name} wrote before {name}"
        assert bytes(raw[offset + count * dtype.itemsize:]) == tail, \
            f"{kernel.name} wrote past {name}"
        got[name] = np.frombuffer(raw, dtype, count, offset)
    return model, got, dtype


@pytest.mark.parametrize("name", sorted(cat.KERNELS))
def test_catalog_kernel_matches_numpy(device, catalog, rng, name):
    kernel = cat.KERNELS[name]
    model, got, dtype = _run_kernel(device, catalog, kernel, rng)
    device.synchronize()
    for pname, expected in model.items():
        if dtype.kind == "f":
            np.testing.assert_allclose(got[pname], expected, **_tolerance(dtype),
                                       err_msg=f"{name}: {pname}")
        else:
            np.testing.assert_array_equal(got[pname], expected, err_msg=f"{name}: {pname}")


@pytest.mark.parametrize("grid,block", [(1, 1), (4, 64), ((2, 2), (8, 4)), (1000, 1)])
def test_grid_and_block_do_not_change_the_result(device, catalog, rng, grid, block):
    kernel = cat.KERNELS[cat.kernel_name("axpy", "float32")]
    model, got, dtype = _run_kernel(device, catalog, kernel, rng, grid=grid, block=block)
    np.testing.assert_allclose(got["y"], model["y"], **_tolerance(dtype))


def test_catalog_on_a_stream(device, catalog, rng):
    s = device.stream()
    kernel = cat.KERNELS["gemm_f64"]
    model, got, dtype = _run_kernel(device, catalog, kernel, rng, stream=s)
    np.testing.assert_allclose(got["c"], model["c"], **_tolerance(dtype))


def test_integer_reduce_wraps(device, catalog):
    n = 1000
    x = np.full(n, 2**30, dtype=np.int32)
    xb, out = device.alloc(x.nbytes + 8), device.alloc(16)
    device.write(xb, 8, x)
    device.fill(out, 0)
    fn = device.function(catalog, "reduce_sum_i32")
    device.launch(fn, 1, 64, [harp.BufferArg(out, 4), harp.BufferArg(xb, 8), np.int64(n)])
    got = np.frombuffer(device.read(out, 4, 4), np.int32)[0]
    assert got == x.sum(dtype=np.int32)


def test_gemm_larger(device, catalog, rng):
    m, n, k = 64, 48, 80
    A = rng.standard_normal((m, k)).astype(np.float32)
    B = rng.standard_normal((k, n)).astype(np.float32)
    C = rng.standard_normal((m, n)).astype(np.float32)
    ab, bb, cb = device.alloc(A.nbytes + 64), device.alloc(B.nbytes + 64), device.alloc(C.nbytes + 64)
    device.write(ab, 64, A)
    device.write(bb, 64, B)
    device.write(cb, 64, C)
    fn = device.function(catalog, "gemm_f32")
    device.launch(fn, (4, 4), (16, 16), [
        harp.BufferArg(cb, 64), harp.BufferArg(ab, 64), harp.BufferArg(bb, 64),
        np.int64(m), np.int64(n), np.int64(k), np.float32(0.75), np.float32(1.5)])
    got = np.frombuffer(device.read(cb, 64, C.nbytes), np.float32).reshape(m, n)
    expected = 0.75 * (A.astype(np.float64) @ B.astype(np.float64)) + 1.5 * C
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_explicit_scalar_type_is_accepted(device, catalog):
    buf = device.alloc(64)
    fn = device.function(catalog, "fill_i64")
    device.launch(fn, 1, 8, [harp.BufferArg(buf, 8), harp.Scalar(-3, "int64"),
                             harp.Scalar(4, "int64")])
    device.launch(fn, 1, 8, [harp.BufferArg(buf, 0), np.int64(5), np.int64(1)])
    got = np.frombuffer(device.read(buf, 0, 48), np.int64)
    np.testing.assert_array_equal(got, [5, -3, -3, -3, -3, 0])


def test_noop_with_no_args(device, catalog):
    fn = device.function(catalog, "noop")
    for _ in range(10):
        device.launch(fn, 1, 1, [])
    device.synchronize()


# -- argument errors ----------------------------------------------------------------

def _axpy_args(device, dtype=np.float32, n=8):
    x, y = device.alloc(64), device.alloc(64)
    return [harp.BufferArg(y, 0), harp.BufferArg(x, 0), dtype(2.0), np.int64(n)]


@pytest.mark.parametrize("bad", [
    "too-few", "too-many", "alpha-f64", "alpha-i32", "n-int32", "n-f32",
    "buffer-for-scalar", "scalar-for-buffer", "empty",
])
def test_bad_catalog_arguments_are_deferred(device, catalog, bad):
    fn = device.function(catalog, "axpy_f32")       # 2 (catalog is 1)
    args = _axpy_args(device)                       # 3, 4
    if bad == "too-few":
        args = args[:3]
    elif bad == "too-many":
        args = args + [np.int64(1)]
    elif bad == "alpha-f64":
        args[2] = np.float64(2.0)
    elif bad == "alpha-i32":
        args[2] = np.int32(2)
    elif bad == "n-int32":
        args[3] = np.int32(8)
    elif bad == "n-f32":
        args[3] = np.float32(8)
    elif bad == "buffer-for-scalar":
        args[2] = args[0]
    elif bad == "scalar-for-buffer":
        args[1] = np.float32(1)
    elif bad == "empty":
        args = []
    device.launch(fn, 1, 32, args)                  # 5: returns at once
    with pytest.raises(harp.ArgumentError) as ei:
        device.synchronize()                        # 6
    assert ei.value.call == "launch"
    assert ei.value.seq == 5
    assert "launch" in str(ei.value)
    device.synchronize()
    # the session goes on: a correct launch works
    x, y = device.alloc(16), device.alloc(16)
    device.write(x, 0, np.ones(4, np.float32))
    device.write(y, 0, np.ones(4, np.float32))
    device.launch(fn, 1, 32, [harp.BufferArg(y), harp.BufferArg(x), np.float32(2), np.int64(4)])
    np.testing.assert_array_equal(np.frombuffer(device.read(y, 0, 16), np.float32), [3] * 4)


@pytest.mark.parametrize("kernel,value", [
    ("fill_i32", harp.Scalar(2**40, "int32")),
    ("fill_i32", harp.Scalar(-2**31 - 1, "int32")),
    ("fill_f32", harp.Scalar(1e300, "float32")),
])
def test_scalar_value_that_does_not_fit_its_dtype_is_deferred(device, catalog, kernel, value):
    fn = device.function(catalog, kernel)              # 2
    buf = device.alloc(16)                              # 3
    device.fill(buf, 0)                                 # 4
    device.launch(fn, 1, 4, [harp.BufferArg(buf), value, np.int64(4)])   # 5
    with pytest.raises(harp.ArgumentError) as ei:
        device.synchronize()                            # 6
    assert ei.value.call == "launch" and ei.value.seq == 5
    assert device.read(buf, 0, 16) == bytes(16)


def test_kernel_range_past_buffer_is_a_deferred_error(device, catalog):
    fn = device.function(catalog, "fill_f32")      # 2
    buf = device.alloc(64)                          # 3
    device.fill(buf, 0)                             # 4
    # 16 floats fit; 17 floats from offset 0, or 16 from offset 4, do not
    device.launch(fn, 1, 32, [harp.BufferArg(buf, 0), np.float32(1), np.int64(17)])   # 5
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                        # 6
    assert ei.value.call == "launch" and ei.value.seq == 5
    device.launch(fn, 1, 32, [harp.BufferArg(buf, 4), np.float32(1), np.int64(16)])   # 7
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                        # 8
    assert ei.value.call == "launch" and ei.value.seq == 7
    device.launch(fn, 1, 32, [harp.BufferArg(buf, 0), np.float32(1), np.int64(16)])
    assert np.frombuffer(device.read(buf, 0, 64), np.float32).tolist() == [1.0] * 16


def test_argument_offset_past_buffer_is_deferred(device, catalog):
    fn = device.function(catalog, "fill_i32")
    buf = device.alloc(16)
    device.launch(fn, 1, 1, [harp.BufferArg(buf, 1000), np.int32(1), np.int64(0)])
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()
    assert ei.value.call == "launch"
    device.synchronize()


def test_unknown_kernel_name_is_deferred(device, catalog):
    fn = device.function(catalog, "no_such_kernel_f32")   # 2: returns a handle at once
    assert isinstance(fn, harp.Function)
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                              # 3
    assert ei.value.call == "function"
    assert ei.value.seq == 2
    assert "function" in str(ei.value)
    device.synchronize()
    # launching the failed function is itself a deferred error, naming launch
    device.launch(fn, 1, 1, [])                           # 5
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                              # 6
    assert ei.value.call == "launch" and ei.value.seq == 5


def test_python_scalar_is_refused_at_once(device, catalog):
    fn = device.function(catalog, "axpy_f32")
    args = _axpy_args(device)
    for bad in (2.0, 2, True):
        wrong = list(args)
        wrong[2] = bad
        with pytest.raises(TypeError):
            device.launch(fn, 1, 32, wrong)
    wrong = list(args)
    wrong[3] = 8
    with pytest.raises(TypeError):
        device.launch(fn, 1, 32, wrong)
    device.synchronize()          # nothing was deferred


def test_bad_catalog_image_is_deferred(device):
    module = device.load_module(b"not the catalog", "catalog")   # 1
    assert isinstance(module, harp.Module)
    with pytest.raises(harp.HarpError) as ei:
        device.synchronize()                                     # 2
    assert ei.value.call == "load_module" and ei.value.seq == 1
    device.synchronize()


def test_unaccepted_format_is_deferred(device):
    others = [f for f in harp.types.FORMATS if f not in device.info.formats]
    if not others:
        pytest.skip("device accepts every format")
    device.load_module(b"\x00\x01", others[0])                  # 1
    with pytest.raises(harp.UnsupportedError) as ei:
        device.synchronize()                                     # 2
    assert ei.value.call == "load_module" and ei.value.seq == 1
    device.synchronize()


@pytest.mark.parametrize("n", [-1, -2, -(1 << 40)])
def test_a_negative_size_is_refused_and_writes_nothing(device, catalog, n):
    fill = device.function(catalog, "fill_f32")
    buf = device.alloc(64)
    device.write(buf, 0, np.zeros(16, np.float32))
    device.launch(fill, 1, 16, [buf, np.float32(7), np.int64(n)])
    with pytest.raises(harp.ArgumentError, match="n must be >= 0"):
        device.synchronize()
    assert not np.frombuffer(device.read(buf, 0, 64), np.float32).any()
