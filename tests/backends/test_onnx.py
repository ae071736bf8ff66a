"""The onnx backend: ONNX Runtime as an NPU-class device (the conformance suite runs on it
too, as local-onnx, traced-onnx and remote-onnx).

Models are built here with onnx.helper and run on the real onnxruntime; the tests of
availability stand a fake module in for it, and need neither.
"""
from __future__ import annotations

import importlib.util
import types

import numpy as np
import pytest

import harp
from harp import catalog as cat
from harp.backends import load_backend
from harp.backends.onnx import CPU, PREFERENCE, PROBE_MODEL, select_providers

HAVE_RUNTIME = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
needs_runtime = pytest.mark.skipif(
    not HAVE_RUNTIME, reason="needs onnxruntime and onnx (pip install 'harp[onnx]')")


# -- models ---------------------------------------------------------------------------

def _model(nodes, inputs, outputs, initializers=(), opset=17):
    from onnx import helper
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8)


def _linear(w: np.ndarray, b: np.ndarray):
    """Y = MatMul(X, W) + B, W and B initializers; X is float32[N, K]."""
    from onnx import TensorProto as T, helper, numpy_helper
    k, n = w.shape
    return _model([helper.make_node("MatMul", ["X", "W"], ["XW"]),
                   helper.make_node("Add", ["XW", "B"], ["Y"])],
                  [helper.make_tensor_value_info("X", T.FLOAT, ["N", k])],
                  [helper.make_tensor_value_info("Y", T.FLOAT, ["N", n])],
                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])


def _add(dtype=None, shape=(4,), b_shape=None):
    """C = A + B, of int32 (or `dtype`, an ONNX element type) elements."""
    from onnx import TensorProto as T, helper
    elem = T.INT32 if dtype is None else dtype
    return _model([helper.make_node("Add", ["A", "B"], ["C"])],
                  [helper.make_tensor_value_info("A", elem, list(shape)),
                   helper.make_tensor_value_info("B", elem, list(b_shape or shape))],
                  [helper.make_tensor_value_info("C", elem, list(shape))])


@pytest.fixture
def dev():
    if not HAVE_RUNTIME:
        pytest.skip("needs onnxruntime and onnx (pip install 'harp[onnx]')")
    device = load_backend("onnx", memory="1GiB").open(0)
    yield device
    device.close()


def _put(dev, array: np.ndarray, pad: int = 0):
    """A buffer holding `array` at byte offset `pad`, and its ArrayArg."""
    buf = dev.alloc(pad + array.nbytes + 16)
    dev.write(buf, pad, np.ascontiguousarray(array))
    return buf, harp.ArrayArg(buf, array.dtype.name, array.shape, offset=pad)


def _out(dev, dtype, shape, pad: int = 0):
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = dev.alloc(pad + nbytes + 16)
    return buf, harp.ArrayArg(buf, np.dtype(dtype).name, shape, offset=pad)


def _get(dev, buf, arg):
    nbytes = int(np.prod(arg.shape)) * np.dtype(arg.dtype).itemsize
    return np.frombuffer(dev.read(buf, arg.offset, nbytes), arg.dtype).reshape(arg.shape)


def _main(dev, model):
    module = dev.load_module(model.SerializeToString(), "onnx")
    return dev.function(module, "main")


def _deferred(dev, error=harp.ArgumentError, call="launch"):
    with pytest.raises(error) as ei:
        dev.synchronize()
    assert ei.value.call == call, ei.value
    dev.synchronize()                   # reported once; the session goes on
    return str(ei.value)


# -- the device -------------------------------------------------------------------------

@needs_runtime
def test_info_is_an_npu_with_its_providers(dev):
    info = dev.info
    assert info.kind == "npu" and info.backend == "onnx"
    assert info.formats == ("catalog", "onnx")
    import onnxruntime
    assert info.name == f"ONNX Runtime {onnxruntime.__version__} ({info.extra['providers'][0]})"
    providers = info.extra["providers"]
    assert providers[-1] == CPU and "AzureExecutionProvider" not in providers
    assert set(providers) <= set(onnxruntime.get_available_providers())
    assert info.extra["onnxruntime_version"] == onnxruntime.__version__
    assert info.extra["opsets"]["ai.onnx"] >= 17
    assert info.memory == 1 << 30


@needs_runtime
def test_connect_local_onnx_runs_the_catalog():
    with harp.connect("local:onnx", memory="64MiB") as dev:
        assert dev.info.backend == "onnx"
        lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        fn = dev.function(lib, "add_i32")
        a, b, out = dev.alloc(16), dev.alloc(16), dev.alloc(16)
        dev.write(a, 0, np.array([1, 2, 3, 2**31 - 1], np.int32))
        dev.write(b, 0, np.array([10, 20, 30, 1], np.int32))
        dev.launch(fn, 1, 1, [out, a, b, np.int64(4)])
        got = np.frombuffer(dev.read(out, 0, 16), np.int32)
        assert got.tolist() == [11, 22, 33, -2**31]          # wraps, like the cpu backend


def test_probe_model_is_what_onnx_helper_builds():
    pytest.importorskip("onnx")
    from onnx import TensorProto as T, helper
    model = _model([helper.make_node("Identity", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [1])])
    model.graph.name = "probe"
    assert model.SerializeToString() == PROBE_MODEL


# -- models -------------------------------------------------------------------------------

@needs_runtime
def test_a_linear_model_matches_numpy(dev):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    fn = _main(dev, _linear(w, b))
    _, xa = _put(dev, x, pad=12)                       # not at the buffer's start
    yb, ya = _out(dev, np.float32, (5, 3), pad=4)
    dev.launch(fn, 7, 3, [xa, ya])                     # grid and block are ignored
    np.testing.assert_allclose(_get(dev, yb, ya), x @ w + b, rtol=1e-5, atol=1e-5)
    # the same function again, another batch size (N is dynamic), on a stream
    s = dev.stream()
    x2 = rng.standard_normal((2, 8)).astype(np.float32)
    _, xa2 = _put(dev, x2)
    yb2, ya2 = _out(dev, np.float32, (2, 3))
    dev.launch(fn, 1, 1, [xa2, ya2], stream=s)
    dev.synchronize(s)
    np.testing.assert_allclose(_get(dev, yb2, ya2), x2 @ w + b, rtol=1e-5, atol=1e-5)


@needs_runtime
def test_a_two_input_model_and_a_scalar_input(dev):
    from onnx import TensorProto as T
    fn = _main(dev, _add())
    a = np.array([1, 2, 3, 2**31 - 1], np.int32)
    b = np.array([5, 6, 7, 1], np.int32)
    _, aa = _put(dev, a)
    _, ba = _put(dev, b)
    cb, ca = _out(dev, np.int32, (4,))
    dev.launch(fn, 1, 1, [aa, ba, ca])
    with np.errstate(over="ignore"):
        assert _get(dev, cb, ca).tolist() == (a + b).tolist()
    # a one-element input takes a Scalar
    fn = _main(dev, _add(T.FLOAT, shape=(3,), b_shape=(1,)))
    _, xa = _put(dev, np.array([1, 2, 3], np.float32))
    yb, ya = _out(dev, np.float32, (3,))
    dev.launch(fn, 1, 1, [xa, harp.Scalar(0.5, "float32"), ya])
    assert _get(dev, yb, ya).tolist() == [1.5, 2.5, 3.5]


@needs_runtime
def test_an_output_may_be_an_input_buffer(dev):
    fn = _main(dev, _add())
    buf, aa = _put(dev, np.array([1, 2, 3, 4], np.int32))
    _, ba = _put(dev, np.array([10, 10, 10, 10], np.int32))
    dev.launch(fn, 1, 1, [aa, ba, aa])                 # A += B
    assert _get(dev, buf, aa).tolist() == [11, 12, 13, 14]


@needs_runtime
def test_a_model_counts_against_the_quota(dev):
    w = np.ones((64, 64), np.float32)                  # 16 KiB of initializer
    image = _linear(w, np.zeros(64, np.float32)).SerializeToString()
    before = dev.mem_info().free
    module = dev.load_module(image, "onnx")
    assert dev.mem_info().free == before - len(image)
    dev.function(module, "main")
    dev.synchronize()
    backend = load_backend("onnx", memory="1GiB")
    with backend.open(0, memory_quota=len(image) // 2) as small:
        small.load_module(image, "onnx")
        with pytest.raises(harp.QuotaError) as ei:
            small.synchronize()
        assert ei.value.call == "load_module"
        assert small.mem_info().free == len(image) // 2   # nothing stays reserved


@needs_runtime
def test_a_failed_load_keeps_no_memory(dev):
    before = dev.mem_info().free
    dev.load_module(b"\x08\x07" + b"garbage" * 100, "onnx")
    _deferred(dev, call="load_module")
    assert dev.mem_info().free == before


@needs_runtime
@pytest.mark.parametrize("image", [b"definitely not a protobuf \xff\xff\xff", b"\x08\x07"])
def test_garbage_is_a_deferred_argument_error(dev, image):
    dev.load_module(image, "onnx")
    message = _deferred(dev, call="load_module")
    assert "ONNX" in message


@needs_runtime
def test_a_str_image_is_refused(dev):
    dev.load_module("ir_version: 8", "onnx")
    assert "not a str" in _deferred(dev, call="load_module")


def _external(model, name="W"):
    from onnx import TensorProto
    for t in model.graph.initializer:
        if t.name == name:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.data_location = TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", "/etc/passwd"
    return model


@needs_runtime
def test_external_data_is_refused(dev):
    model = _external(_linear(np.ones((4, 2), np.float32), np.zeros(2, np.float32)))
    dev.load_module(model.SerializeToString(), "onnx")
    message = _deferred(dev, call="load_module")
    assert "external data" in message and "'W'" in message


@needs_runtime
def test_external_data_in_a_subgraph_is_refused(dev):
    from onnx import TensorProto as T, helper
    const = helper.make_tensor("hidden", T.FLOAT, [2], [1.0, 2.0])
    const.ClearField("float_data")
    const.data_location = T.EXTERNAL
    const.external_data.add(key="location", value="secret.bin")
    branch = helper.make_graph([helper.make_node("Constant", [], ["v"], value=const)], "then",
                               [], [helper.make_tensor_value_info("v", T.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Constant", [], ["w"], value_floats=[0, 0])],
                              "else", [], [helper.make_tensor_value_info("w", T.FLOAT, [2])])
    model = _model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                   [helper.make_tensor_value_info("c", T.BOOL, [])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    dev.load_module(model.SerializeToString(), "onnx")
    assert "'hidden'" in _deferred(dev, call="load_module")


@needs_runtime
def test_an_epcontext_node_is_refused(dev):
    from onnx import TensorProto as T, helper
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", embed_mode=0,
                            ep_cache_context="/etc/shadow")
    model = _model([node], [helper.make_tensor_value_info("x", T.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", T.FLOAT, [1])])
    dev.load_module(model.SerializeToString(), "onnx")
    assert "EPContext node" in _deferred(dev, call="load_module")


@needs_runtime
def test_a_model_of_unsupported_elements_is_refused(dev):
    from onnx import TensorProto as T, helper
    model = _model([helper.make_node("Identity", ["s"], ["t"])],
                   [helper.make_tensor_value_info("s", T.STRING, [1])],
                   [helper.make_tensor_value_info("t", T.STRING, [1])])
    dev.load_module(model.SerializeToString(), "onnx")
    assert "STRING elements" in _deferred(dev, call="load_module")


@needs_runtime
def test_the_one_function_is_main(dev):
    module = dev.load_module(_add().SerializeToString(), "onnx")
    dev.function(module, "forward")
    message = _deferred(dev, call="function")
    assert "'main'" in message and "'forward'" in message


@needs_runtime
@pytest.mark.parametrize("bad,named", [
    ("too-few", "takes 3 arguments"), ("too-many", "takes 3 arguments"),
    ("dtype", "'B'"), ("shape", "'A'"), ("rank", "'A'"), ("output-shape", "'C'"),
    ("buffer-arg", "'A'"), ("scalar-for-array", "'A'"), ("scalar-output", "'C'"),
    ("past-the-buffer", "'B'"), ("strided", "C-contiguous"), ("scalar-dtype", "'A'"),
])
def test_bad_model_arguments_are_deferred(dev, bad, named):
    fn = _main(dev, _add())
    abuf, aa = _put(dev, np.arange(4, dtype=np.int32))
    _, ba = _put(dev, np.arange(4, dtype=np.int32))
    cbuf, ca = _out(dev, np.int32, (4,))
    dev.fill(cbuf, 0)
    args = [aa, ba, ca]
    if bad == "too-few":
        args = args[:2]
    elif bad == "too-many":
        args = args + [ca]
    elif bad == "dtype":
        args[1] = harp.ArrayArg(ba.buffer, "float32", (4,))
    elif bad == "shape":
        args[0] = harp.ArrayArg(aa.buffer, "int32", (3,))
    elif bad == "rank":
        args[0] = harp.ArrayArg(aa.buffer, "int32", (2, 2))
    elif bad == "output-shape":
        args[2] = harp.ArrayArg(ca.buffer, "int32", (5,))
    elif bad == "buffer-arg":
        args[0] = harp.BufferArg(aa.buffer)
    elif bad == "scalar-for-array":
        args[0] = harp.Scalar(1, "int32")
    elif bad == "scalar-output":
        args[2] = harp.Scalar(1, "int32")
    elif bad == "past-the-buffer":
        args[1] = harp.ArrayArg(ba.buffer, "int32", (4,), offset=ba.buffer.nbytes - 8)
    elif bad == "strided":
        args[0] = harp.ArrayArg(aa.buffer, "int32", (4,), strides=(8,))
    elif bad == "scalar-dtype":
        fn = _main(dev, _add(shape=(1,)))
        args = [harp.Scalar(1, "int64"), harp.ArrayArg(ba.buffer, "int32", (1,)),
                harp.ArrayArg(ca.buffer, "int32", (1,))]
    dev.launch(fn, 1, 1, args)
    message = _deferred(dev)
    assert named in message, message
    assert _get(dev, cbuf, ca).tolist() == [0, 0, 0, 0]       # nothing ran


@needs_runtime
def test_a_result_that_does_not_fit_its_output_is_a_deferred_error(dev):
    from onnx import TensorProto as T, helper
    # Y's shape is left open; at run time it is X's, which differs from the output arg's
    model = _model([helper.make_node("Neg", ["X"], ["Y"])],
                   [helper.make_tensor_value_info("X", T.FLOAT, ["n"])],
                   [helper.make_tensor_value_info("Y", T.FLOAT, ["m"])])
    fn = _main(dev, model)
    _, xa = _put(dev, np.ones(4, np.float32))
    yb, ya = _out(dev, np.float32, (3,))
    dev.fill(yb, 0)
    dev.launch(fn, 1, 1, [xa, ya])
    message = _deferred(dev)
    assert "'Y'" in message and "nothing was written" in message
    assert _get(dev, yb, ya).tolist() == [0, 0, 0]


@needs_runtime
def test_a_run_that_fails_in_onnx_runtime_is_deferred(dev):
    fn = _main(dev, _linear(np.ones((4, 2), np.float32), np.zeros(2, np.float32)))
    # X's second dimension is 4 in the model: a wrong one is caught before the run
    _, xa = _put(dev, np.ones((3, 5), np.float32))
    _, ya = _out(dev, np.float32, (3, 2))
    dev.launch(fn, 1, 1, [xa, ya])
    assert "'X'" in _deferred(dev)


@needs_runtime
def test_model_sessions_use_few_threads():
    import onnxruntime
    from harp.backends.onnx import graphs
    from harp.backends.onnx.device import MODEL_THREADS
    assert graphs.session_options(onnxruntime, threads=1).intra_op_num_threads == 1
    assert 1 <= MODEL_THREADS <= 2


# -- the catalog as graphs ------------------------------------------------------------------

@needs_runtime
def test_every_catalog_kernel_has_a_valid_graph():
    import onnx
    from harp.backends.onnx import graphs
    for name, kernel in cat.KERNELS.items():
        model = graphs.build(kernel)
        if kernel.op.name == "noop":
            assert model is None
            continue
        onnx.checker.check_model(model, full_check=True)
        assert [o.name for o in model.graph.output] == [graphs.OUTPUT], name
        plan = graphs.PLANS[kernel.op.name]
        params = {p.name: p.kind for p in kernel.op.params}
        assert set(plan.reads) <= set(params) and params[plan.writes] == "buffer", name
    assert set(graphs.PLANS) == set(cat.OPS) - {"noop"}


@needs_runtime
def test_catalog_sessions_are_shared_by_device_sessions():
    import onnxruntime
    from harp.backends.onnx import graphs
    kernel = cat.KERNELS["scale_f64"]
    with harp.connect("local:onnx", memory="16MiB") as a, \
            harp.connect("local:onnx", memory="16MiB") as b:
        for d in (a, b):
            d.function(d.load_module(harp.CATALOG_IMAGE, "catalog"), "scale_f64")
            d.synchronize()
    one = graphs.session(onnxruntime, (CPU,), kernel)
    assert graphs.session(onnxruntime, (CPU,), kernel) is one


def _catalog_run(dev, name, buffers, scalars):
    """Launch catalog kernel `name` with `buffers` (param -> array) and `scalars`; return
    the buffers' contents after it."""
    kernel = cat.KERNELS[name]
    fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), name)
    args, bufs = [], {}
    for p in kernel.op.params:
        if p.kind == "scalar":
            args.append(np.dtype(kernel.param_dtype(p)).type(scalars[p.name]))
        else:
            data = buffers[p.name]
            bufs[p.name] = (dev.alloc(data.nbytes + 3 + 8), data)
            dev.write(bufs[p.name][0], 3, data)         # misaligned: host memory allows it
            args.append(harp.BufferArg(bufs[p.name][0], 3))
    dev.launch(fn, 1, 1, args)
    return {k: np.frombuffer(dev.read(b, 3, d.nbytes), d.dtype) for k, (b, d) in bufs.items()}


@needs_runtime
def test_integer_reduce_sum_is_exact_and_wraps(dev):
    # ONNX Runtime's own integer ReduceSum goes through double: 2**53 + 3 would be wrong
    x = np.array([2**53, 1, 1, 1, 2**62, 2**62, 2**62], np.int64)
    got = _catalog_run(dev, "reduce_sum_i64", {"out": np.zeros(1, np.int64), "x": x},
                       {"n": len(x)})
    assert got["out"][0] == x.sum(dtype=np.int64)
    x32 = np.full(1000, 2**30, np.int32)
    got = _catalog_run(dev, "reduce_sum_i32", {"out": np.zeros(1, np.int32), "x": x32},
                       {"n": 1000})
    assert got["out"][0] == x32.sum(dtype=np.int32)


@needs_runtime
def test_empty_launches(dev):
    got = _catalog_run(dev, "reduce_sum_f32", {"out": np.full(1, 9, np.float32),
                                               "x": np.ones(4, np.float32)}, {"n": 0})
    assert got["out"][0] == 0                          # the sum of nothing is written
    got = _catalog_run(dev, "fill_i32", {"out": np.full(4, 9, np.int32)},
                       {"value": 1, "n": 0})
    assert got["out"].tolist() == [9] * 4
    c = np.full(6, 2.0)
    got = _catalog_run(dev, "gemm_f64", {"c": c, "a": np.ones(0), "b": np.ones(0)},
                       {"m": 2, "n": 3, "k": 0, "alpha": 1.0, "beta": 0.5})
    assert got["c"].tolist() == [1.0] * 6              # alpha * 0 + beta * C


@needs_runtime
def test_gemm_beta_zero_keeps_nan_like_the_cpu_backend(dev):
    c = np.array([np.nan, 1.0, np.inf, 2.0], np.float32)
    a = np.ones(4, np.float32)
    got = _catalog_run(dev, "gemm_f32", {"c": c, "a": a, "b": a},
                       {"m": 2, "n": 2, "k": 2, "alpha": 1.0, "beta": 0.0})
    with np.errstate(invalid="ignore"):
        expected = 1.0 * (a.reshape(2, 2) @ a.reshape(2, 2)) + np.float32(0) * c.reshape(2, 2)
    np.testing.assert_array_equal(got["c"], expected.ravel())


@needs_runtime
def test_div_is_ieee(dev):
    got = _catalog_run(dev, "div_f64", {"out": np.zeros(3), "a": np.array([1.0, -1.0, 0.0]),
                                        "b": np.zeros(3)}, {"n": 3})
    assert got["out"][0] == np.inf and got["out"][1] == -np.inf and np.isnan(got["out"][2])


# -- remote -------------------------------------------------------------------------------

@needs_runtime
def test_a_model_through_a_pool_server(remote_onnx_pool):
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.array([1, -1], np.float32)
    with remote_onnx_pool.connect() as dev:
        assert dev.info.kind == "npu" and "onnx" in dev.info.formats
        fn = _main(dev, _linear(w, b))
        x = np.ones((2, 3), np.float32)
        _, xa = _put(dev, x)
        yb, ya = _out(dev, np.float32, (2, 2))
        dev.launch(fn, 1, 1, [xa, ya])
        np.testing.assert_allclose(_get(dev, yb, ya), x @ w + b)
        dev.load_module(_external(_linear(w, b)).SerializeToString(), "onnx")
        with pytest.raises(harp.ArgumentError, match="external data"):
            dev.synchronize()


# -- availability -----------------------------------------------------------------------------

class FakeSession:
    def __init__(self, model, options=None, providers=()):
        self._providers = [p for p in providers if p != "BrokenExecutionProvider"]

    def get_providers(self):
        return self._providers


def fake_ort(providers):
    """A stand-in for the onnxruntime module that lists `providers`."""
    ort = types.ModuleType("fake_onnxruntime")
    ort.__version__ = "0.0-fake"
    ort.get_available_providers = lambda: list(providers)
    ort.SessionOptions = types.SimpleNamespace
    ort.InferenceSession = FakeSession
    return ort


def test_without_onnxruntime_the_backend_says_why():
    backend = load_backend("onnx", ort="harp_no_such_onnxruntime")
    ok, reason = backend.available()
    assert not ok and "onnxruntime is not installed" in reason
    assert backend.device_count() == 0
    with pytest.raises(harp.BackendError, match="unavailable here: onnxruntime"):
        backend.open(0)
    with pytest.raises(harp.BackendError, match="unavailable here"):
        backend.describe(0)


def test_a_requested_provider_that_is_missing_says_which():
    backend = load_backend("onnx", ort=fake_ort(["CPUExecutionProvider"]),
                           providers="CUDAExecutionProvider")
    ok, reason = backend.available()
    assert not ok and "CUDAExecutionProvider" in reason and "CPUExecutionProvider" in reason
    with pytest.raises(harp.BackendError, match="CUDAExecutionProvider"):
        harp.connect("local:onnx", ort=fake_ort([CPU]), providers=["CUDAExecutionProvider"])


def test_providers_from_the_environment(monkeypatch):
    monkeypatch.setenv("HARP_ONNX_PROVIDERS", "OpenVINOExecutionProvider, CPUExecutionProvider")
    ort = fake_ort(["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    backend = load_backend("onnx", ort=ort)
    assert backend.available() == (True, "")
    info = backend.describe(0)
    assert info.extra["providers"] == ["OpenVINOExecutionProvider", CPU]
    assert info.name == "ONNX Runtime 0.0-fake (OpenVINOExecutionProvider)"
    assert info.extra["opsets"] == {}                  # the fake does not say


def test_azure_is_never_a_device():
    ok, reason = load_backend("onnx", ort=fake_ort(["AzureExecutionProvider", CPU]),
                              providers="AzureExecutionProvider").available()
    assert not ok and "not a device" in reason
    backend = load_backend("onnx", ort=fake_ort(["AzureExecutionProvider", CPU]))
    assert backend.describe(0).extra["providers"] == [CPU]


def test_a_listed_provider_that_does_not_initialise_is_skipped():
    backend = load_backend("onnx", ort=fake_ort(["BrokenExecutionProvider", CPU]))
    info = backend.describe(0)
    assert info.extra["providers"] == [CPU]
    assert "BrokenExecutionProvider" in info.extra["skipped_providers"]
    ok, reason = load_backend("onnx", ort=fake_ort(["BrokenExecutionProvider", CPU]),
                              providers="BrokenExecutionProvider").available()
    assert not ok and "does not initialise" in reason


def test_default_provider_order():
    listed = ["CPUExecutionProvider", "SomeNewExecutionProvider", "DmlExecutionProvider",
              "AzureExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"]
    chosen, why = select_providers(listed, None)
    assert why == ""
    assert chosen == ["CUDAExecutionProvider", "TensorrtExecutionProvider",
                      "DmlExecutionProvider", "SomeNewExecutionProvider", CPU]
    assert PREFERENCE.index("CUDAExecutionProvider") < PREFERENCE.index("OpenVINOExecutionProvider")
    assert select_providers([CPU], None) == ([CPU], "")
    assert select_providers(listed, ["DmlExecutionProvider"]) == (["DmlExecutionProvider", CPU], "")
    assert select_providers(listed, [CPU, "DmlExecutionProvider"]) == \
        (["DmlExecutionProvider", CPU], "")


def test_memory_option_and_environment(monkeypatch):
    ort = fake_ort([CPU])
    assert load_backend("onnx", ort=ort).describe(0).memory == 4 << 30
    monkeypatch.setenv("HARP_ONNX_MEMORY", "3GiB")
    assert load_backend("onnx", ort=ort).describe(0).memory == 3 << 30
    backend = load_backend("onnx", ort=ort, memory="1GiB", devices=2)
    assert backend.device_count() == 2 and backend.describe(1).memory == 1 << 30
    with pytest.raises(harp.BackendError, match="no device 2"):
        backend.describe(2)
