"""HARP's numba.cuda, in this process, on a real local cpu device (trusted for numba-python).

The shim module is used directly (`harp.client.numba_shim.module()`), without interposing
on `numba.cuda`, so numba's own module stays available to the rest of the suite.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from numba import float32

import harp
from harp.client import numba_shim
from harp.client.numba_shim import UnsupportedAttributeError
from harp.trace import open_trace

cuda = numba_shim.module()


@pytest.fixture
def dev():
    device = harp.connect("local:cpu", memory="1GiB", trust_client_code=True)
    numba_shim.use_device(device)
    yield device
    numba_shim.close_current()
    device.close()


# -- kernels (module level: a cpu device runs them from their source) ------------------

SCALE = 3


@cuda.jit(device=True)
def triple(v):
    return v * SCALE


@cuda.jit
def add_triple(out, x):
    i = cuda.grid(1)
    if i < out.size:
        out[i] += triple(x[i])


@cuda.jit
def fill_index(x):
    i = cuda.grid(1)
    if i < x.shape[0]:
        x[i] = i


@cuda.jit
def slow_fill(x, value):
    # each thread spins a little, so that a read that did not wait would see zeros
    i = cuda.grid(1)
    acc = 0.0
    for k in range(300):
        acc += math.sin(k)
    if i < x.size:
        x[i] = value + 0 * acc


@cuda.jit
def copy_kernel(dst, src):
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] = src[i]


@cuda.jit("void(float32[:], float32)")
def scale_f32(x, a):
    i = cuda.grid(1)
    if i < x.size:
        x[i] = x[i] * a


@cuda.jit
def dyn_shared_sum(x, out):
    buf = cuda.shared.array(0, dtype=float32)
    i = cuda.threadIdx.x
    buf[i] = x[i]
    cuda.syncthreads()
    if i == 0:
        s = 0.0
        for k in range(cuda.blockDim.x):
            s += buf[k]
        out[0] = s


@cuda.jit
def out_of_bounds(x):
    x[x.size + cuda.grid(1)] = 1


@cuda.jit
def fill_record(record, value):
    record.a = value


@cuda.jit
def uses_shfl(x):
    x[0] = cuda.shfl_sync(0xffffffff, x[0], 0)


TABLE = {"a": 1}


@cuda.jit
def reads_a_dict(x):
    x[0] = TABLE["a"]


def plain_helper(v):
    return v + 1


@cuda.jit
def calls_plain_python(x):
    x[0] = plain_helper(x[0])


LUT = np.array([10, 20, 30, 40], dtype=np.int64)


@cuda.jit
def lookup(out, idx):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = LUT[idx[i]]


# -- device arrays ---------------------------------------------------------------------

@pytest.mark.parametrize("host", [
    np.arange(10, dtype=np.float32),
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.array([True, False, True]),
    (np.arange(6) + 1j * np.arange(6)).astype(np.complex128),
    np.zeros(0, dtype=np.int32),
])
def test_round_trip_keeps_values_shape_dtype_and_layout(dev, host):
    d = cuda.to_device(host)
    assert (d.shape, d.dtype, d.size, d.ndim, d.nbytes) == \
        (host.shape, host.dtype, host.size, host.ndim, host.nbytes)
    back = d.copy_to_host()
    np.testing.assert_array_equal(back, host)
    assert back.flags["F_CONTIGUOUS"] == host.flags["F_CONTIGUOUS"]
    assert d.is_c_contiguous() == host.flags["C_CONTIGUOUS"]


def test_views_share_the_buffer_and_index_like_numpy(dev):
    host = np.arange(48, dtype=np.int32).reshape(6, 8)
    d = cuda.to_device(host)
    for item in [(slice(1, 5), slice(None, None, 3)), (2,), (slice(None), 5),
                 (Ellipsis, slice(None, None, -1)), (slice(4, 1, -2), slice(2, 7))]:
        view = d[item]
        assert view.buffer == d.buffer
        np.testing.assert_array_equal(view.copy_to_host(), host[item])
    assert d[3, 4] == host[3, 4] and isinstance(d[3, 4], np.int32)
    assert d[-1][-2] == host[-1][-2]
    assert len(d) == 6 and len(d[2]) == 8
    with pytest.raises(IndexError):
        d[6]


def test_assignment_to_elements_slices_and_strided_views(dev):
    host = np.zeros((4, 6), dtype=np.float64)
    d = cuda.to_device(host)
    d[1, 2] = 7
    d[0] = np.arange(6)
    d[2:, ::2] = -1            # strided: read, change, write back
    d[:, 5] = cuda.to_device(np.full(4, 9.0))
    host[1, 2] = 7
    host[0] = np.arange(6)
    host[2:, ::2] = -1
    host[:, 5] = 9
    np.testing.assert_array_equal(d.copy_to_host(), host)


def test_split_reshape_ravel_view_squeeze_transpose_bind(dev):
    host = np.arange(24, dtype=np.float32)
    d = cuda.to_device(host)
    parts = list(d.split(10))
    assert [p.size for p in parts] == [10, 10, 4]
    np.testing.assert_array_equal(parts[1].copy_to_host(), host[10:20])
    m = d.reshape(4, 6)
    np.testing.assert_array_equal(m.copy_to_host(), host.reshape(4, 6))
    np.testing.assert_array_equal(d.reshape((2, 3, 4), order="F").copy_to_host(),
                                  host.reshape((2, 3, 4), order="F"))
    np.testing.assert_array_equal(m.ravel().copy_to_host(), host)
    np.testing.assert_array_equal(d.view(np.int32).copy_to_host(), host.view(np.int32))
    assert m[1:2].squeeze().shape == (6,)
    t = m.T
    assert t.buffer != m.buffer and t.is_c_contiguous()
    np.testing.assert_array_equal(t.copy_to_host(), host.reshape(4, 6).T)
    with pytest.raises(NotImplementedError):
        m[:, ::2].reshape(12)
    s = cuda.stream()
    assert m.bind(s).stream is s
    np.testing.assert_array_equal(np.asarray(m), host.reshape(4, 6))


def test_copies_into_given_arrays_and_between_device_arrays(dev):
    a = cuda.to_device(np.arange(8, dtype=np.int16))
    b = cuda.device_array(8, dtype=np.int16)
    b.copy_to_device(a)
    out = np.empty(8, dtype=np.int16)
    assert b.copy_to_host(out) is out
    np.testing.assert_array_equal(out, np.arange(8))
    like = cuda.device_array_like(np.asfortranarray(np.zeros((3, 2))))
    assert like.is_f_contiguous() and not like.is_c_contiguous()
    with pytest.raises(TypeError, match="incompatible dtype"):
        b.copy_to_device(np.zeros(8, dtype=np.float32))
    with pytest.raises(ValueError, match="incompatible shape"):
        b.copy_to_device(np.zeros(9, dtype=np.int16))
    assert cuda.to_device(np.arange(8, dtype=np.int16) * 2, to=b) is b
    np.testing.assert_array_equal(b.copy_to_host(), np.arange(8) * 2)


def test_fancy_indexing_and_object_arrays_are_refused_by_name(dev):
    d = cuda.to_device(np.arange(5))
    with pytest.raises(harp.UnsupportedError, match="indexing a device array with list"):
        d[[0, 2]]
    with pytest.raises(harp.UnsupportedError, match="cuda.to_device with dtype object"):
        cuda.to_device(np.array([object()]))
    assert not hasattr(d, "__cuda_array_interface__")
    with pytest.raises(UnsupportedAttributeError, match="__cuda_array_interface__"):
        d.__cuda_array_interface__


# -- kernels ---------------------------------------------------------------------------

def test_kernel_with_device_function_and_module_constants(dev):
    x = np.arange(100, dtype=np.float64)
    out = cuda.to_device(np.ones(100))
    add_triple[4, 32](out, cuda.to_device(x))
    np.testing.assert_array_equal(out.copy_to_host(), 1 + 3 * x)


def test_kernel_on_strided_views_and_global_arrays(dev):
    d = cuda.to_device(np.zeros(20, dtype=np.int64))
    fill_index[1, 32](d[1::2])
    np.testing.assert_array_equal(d.copy_to_host()[1::2], np.arange(10))
    assert not d.copy_to_host()[::2].any()
    idx = np.array([3, 0, 2, 1, 3], dtype=np.int32)
    out = cuda.device_array(5, dtype=np.int64)
    lookup[1, 8](out, cuda.to_device(idx))
    np.testing.assert_array_equal(out.copy_to_host(), LUT[idx])


def test_host_arrays_are_copied_in_and_back_as_numba_does(dev):
    x = np.zeros(16, dtype=np.int64)
    fill_index[1, 16](x)
    np.testing.assert_array_equal(x, np.arange(16))
    y = np.zeros(16, dtype=np.int64)
    fill_index[1, 16](cuda.In(y))
    assert not y.any()
    src = np.arange(16, dtype=np.int64)
    dst = np.zeros(16, dtype=np.int64)
    copy_kernel[1, 16](cuda.Out(dst), cuda.In(src))
    np.testing.assert_array_equal(dst, src)


def test_explicit_signature_casts_scalars(dev):
    x = cuda.to_device(np.full(8, 3, dtype=np.float32))
    scale_f32[1, 8](x, 0.1)
    np.testing.assert_array_equal(x.copy_to_host(), np.float32(3) * np.float32(0.1))
    with pytest.raises(TypeError, match="no matching definition"):
        scale_f32[1, 8](cuda.to_device(np.zeros(8)), 0.1)


def test_dynamic_shared_memory_and_forall(dev):
    x = np.arange(32, dtype=np.float32)
    out = cuda.device_array(1, dtype=np.float32)
    dyn_shared_sum[1, 32, 0, 32 * 4](cuda.to_device(x), out)
    assert out.copy_to_host()[0] == x.sum()
    d = cuda.device_array(300, dtype=np.int64)
    fill_index.forall(300)(d)
    np.testing.assert_array_equal(d.copy_to_host(), np.arange(300))


def test_kernel_is_loaded_once_per_session(tmp_path):
    trace = tmp_path / "t.harptrace"
    device = harp.connect("local:cpu", trust_client_code=True, trace=str(trace))
    numba_shim.use_device(device)
    try:
        d = cuda.device_array(8, dtype=np.int64)
        for _ in range(3):
            fill_index[1, 8](d)
        fill_index[1, 8](cuda.device_array(8, dtype=np.int32))   # another signature
        cuda.synchronize()
    finally:
        numba_shim.close_current()
        device.close()
    with open_trace(trace) as t:
        apis = [c.api for c in t.calls()]
    assert apis.count("load_module") == 1 and apis.count("function") == 1
    assert apis.count("launch") == 4
    assert (("array", "<i8", 1, "C"),) in fill_index.signatures
    assert (("array", "<i4", 1, "C"),) in fill_index.signatures


def test_kernel_failure_is_raised_at_the_next_sync_as_its_own_type_naming_the_kernel(dev):
    d = cuda.device_array(4, dtype=np.int64)
    out_of_bounds[1, 4](d)
    with pytest.raises(IndexError, match="out of bounds") as ei:
        cuda.synchronize()
    cause = ei.value.__cause__              # the device's report: the launch that failed
    assert isinstance(cause, harp.DeviceError) and "out_of_bounds" in str(cause)
    assert cause.call == "launch"
    fill_index[1, 4](d)                      # the session goes on
    np.testing.assert_array_equal(d.copy_to_host(), np.arange(4))


# -- streams and events ------------------------------------------------------------------

def test_default_stream_waits_for_other_streams_and_they_for_it(dev):
    for value in (1.0, 2.0, 3.0):
        s = cuda.stream()
        d = cuda.device_array(64)
        slow_fill[1, 64, s](d, value)
        # a read on the default stream waits for the kernel on s (legacy default stream)
        np.testing.assert_array_equal(d.copy_to_host(), np.full(64, value))
        # and a kernel on s waits for default-stream work before it
        e = cuda.device_array(64)
        slow_fill[1, 64](e, value + 10)
        f = cuda.device_array(64, stream=s)
        copy_kernel[1, 64, s](f, e)
        np.testing.assert_array_equal(f.copy_to_host(stream=s), np.full(64, value + 10))


def test_events_order_streams_and_time_them(dev):
    s1, s2 = cuda.stream(), cuda.stream()
    a, b = cuda.device_array(64), cuda.device_array(64)
    start, done = cuda.event(), cuda.event()
    start.record(s1)
    slow_fill[1, 64, s1](a, 5.0)
    done.record(s1)
    done.wait(s2)
    copy_kernel[1, 64, s2](b, a)
    s2.synchronize()
    np.testing.assert_array_equal(b.copy_to_host(stream=s2), np.full(64, 5.0))
    done.synchronize()
    assert done.query() is True
    assert start.elapsed_time(done) >= 0
    assert cuda.event_elapsed_time(start, done) >= 0
    with s1.auto_synchronize():
        fill_index[1, 64, s1](cuda.device_array(64, dtype=np.int64))
    cuda.event().synchronize()           # never recorded: complete at once
    cuda.default_stream().synchronize()
    cuda.synchronize()


# -- device facts ------------------------------------------------------------------------

def test_device_facts(dev, capsys):
    assert cuda.is_available()
    d = cuda.get_current_device()
    assert d.name == dev.info.name and d.id == 0 and d.compute_capability == (5, 2)
    assert d.host_cores == dev.info.extra["host_cores"]
    with pytest.raises(UnsupportedAttributeError, match="MAX_THREADS_PER_BLOCK"):
        d.MAX_THREADS_PER_BLOCK
    assert cuda.select_device(0).name == d.name
    assert [x.name for x in cuda.list_devices()] == [d.name]
    free, total = cuda.current_context().get_memory_info()
    assert total == 1 << 30 and 0 <= free <= total
    assert cuda.detect() is True
    assert "HARP cpu device" in capsys.readouterr().out


def test_untrusted_cpu_device_cannot_run_kernels_and_says_why():
    device = harp.connect("local:cpu")
    numba_shim.use_device(device)
    try:
        with pytest.warns(RuntimeWarning, match="trust"):
            assert cuda.is_available() is False
        with pytest.raises(harp.UnsupportedError, match="trust-client-code"):
            fill_index[1, 1](cuda.device_array(1))
    finally:
        numba_shim.close_current()
        device.close()


def test_close_ends_the_session_and_its_arrays(dev):
    d = cuda.to_device(np.arange(3))
    session = numba_shim.current()
    cuda.close()
    assert session.closed
    with pytest.raises(harp.HarpError, match="session is closed"):
        d.copy_to_host()
    numba_shim.use_device(dev)
    np.testing.assert_array_equal(cuda.to_device(np.arange(3)).copy_to_host(), np.arange(3))


# -- what is not supported says so ------------------------------------------------------

@pytest.mark.parametrize("use, api", [
    (lambda: cuda.managed_array(4), "numba.cuda.managed_array"),
    (lambda: cuda.gpus[0], "numba.cuda.gpus"),
    (lambda: len(cuda.gpus), "numba.cuda.gpus"),
    (lambda: cuda.select_device(1), "cuda.select_device(1)"),
    (lambda: cuda.external_stream(0), "numba.cuda.external_stream"),
    (lambda: cuda.as_cuda_array(None), "numba.cuda.as_cuda_array"),
    (lambda: cuda.compile_ptx(None, ()), "numba.cuda.compile_ptx"),
    (lambda: cuda.cg.this_grid(), "numba.cuda.cg"),
    (lambda: cuda.devicearray, "numba.cuda.devicearray is not supported under HARP: HARP's "
                               "numba.cuda does not provide it"),
    (lambda: cuda.managed_array(4), "managed (unified) memory would have kernels read"),
    (lambda: cuda.jit(link=["x.cu"]), "cuda.jit(link=...)"),
    (lambda: cuda.stream().add_callback(print), "Stream.add_callback"),
])
def test_unsupported_api_raises_naming_it(dev, use, api):
    with pytest.raises(harp.UnsupportedError) as ei:
        use()
    assert api in str(ei.value)


def test_unknown_attributes_are_attribute_errors_too():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_api'"):
        cuda.no_such_api
    assert not hasattr(cuda, "no_such_api")
    assert getattr(cuda, "no_such_api", 42) == 42
    assert cuda.float32 is __import__("numba").float32


@pytest.mark.parametrize("use, message", [
    (lambda: cuda.grid(1), "numba.cuda.grid exists only inside"),
    (lambda: cuda.threadIdx.x, "numba.cuda.threadIdx exists only inside"),
    (lambda: cuda.atomic.add(None, 0, 1), "numba.cuda.atomic.add exists only inside"),
    (lambda: cuda.syncthreads(), "numba.cuda.syncthreads exists only inside"),
    (lambda: triple(2.0), "device function triple can be called only from a kernel"),
    (lambda: fill_index(np.zeros(1)), "launch configuration was not specified"),
])
def test_kernel_side_api_outside_kernels_fails_clearly(use, message):
    with pytest.raises((harp.UnsupportedError, TypeError, ValueError), match=message):
        use()


@pytest.mark.parametrize("kernel, message", [
    (uses_shfl, "uses numba.cuda.shfl_sync"),
    (reads_a_dict, "reads the global 'TABLE', a dict"),
    (calls_plain_python, "calls the plain Python function plain_helper"),
])
def test_kernels_using_what_a_cpu_device_cannot_run_are_refused_by_name(dev, kernel, message):
    with pytest.raises(harp.UnsupportedError, match=message):
        kernel[1, 1](cuda.device_array(1))


def test_a_record_argument_is_passed_by_reference_as_numba_does(dev):
    records = np.zeros(2, [("a", np.int64)])
    fill_record[1, 1](records[1], 5)       # the kernel writes into the program's record
    assert records["a"].tolist() == [0, 5]


def make_adder(n):
    @cuda.jit
    def add_n(x):
        i = cuda.grid(1)
        if i < x.size:
            x[i] += n
    return add_n


def test_kernels_made_in_a_function_carry_their_closure(dev):
    d = cuda.to_device(np.zeros(8, dtype=np.int64))
    make_adder(5)[1, 8](d)
    make_adder(7)[1, 8](d)
    np.testing.assert_array_equal(d.copy_to_host(), np.full(8, 12))


@cuda.jit("void(float64[::1])")
def contiguous_only(x):
    x[0] = 1


def test_explicit_signature_layout_is_checked(dev):
    contiguous_only[1, 1](cuda.device_array(4))
    with pytest.raises(TypeError, match="no matching definition"):
        contiguous_only[1, 1](cuda.device_array(8)[::2])


@cuda.jit
def prints(x):
    if cuda.grid(1) == 0:
        print("value", x[0])


def test_print_in_kernels_works_locally_and_is_refused_remotely(dev, pool_server, capfd):
    prints[1, 2](cuda.to_device(np.array([7])))
    cuda.synchronize()
    assert "value 7" in capfd.readouterr().out
    remote = pool_server.connect()
    numba_shim.use_device(remote)
    try:
        with pytest.raises(harp.UnsupportedError, match="print\\(\\) in kernel prints on a "
                                                        "remote device"):
            prints[1, 2](cuda.to_device(np.array([7])))
        fill_index[1, 4](d := cuda.device_array(4, dtype=np.int64))   # others run remotely
        np.testing.assert_array_equal(d.copy_to_host(), np.arange(4))
    finally:
        numba_shim.close_current()
        remote.close()
