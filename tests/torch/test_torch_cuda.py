"""The cuda backend's own part of the `aten` format, on the CuPy stand-in: which drivers
offer it, tensors over the session's own buffers (no copy), the compute gate, and a
hostile tenant's arrays (past their buffer, backwards, another session's, an output too
small), locally and through a pool server (a worker process). The operators themselves
run in test_torch_device.py on these same sessions (`cuda-local`, `cuda-remote`)."""
from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'harp[torch]')")

import harp  # noqa: E402
import harp.torch as ht  # noqa: E402
from harp.backends import load_backend  # noqa: E402
from harp.tenancy import ComputeGate, Tenancy  # noqa: E402
from stand_ins import emulated_cupy  # noqa: E402

NEG = '["neg.default",1,[{"t":1}],{}]'
ADD = '["add.Tensor",1,[{"t":1},{"t":2}],{}]'


def test_the_stand_in_offers_aten_and_a_gpu_driver_needs_torch_with_cuda():
    fake = emulated_cupy()
    dev = load_backend("cuda", memory="64MiB", cupy=fake).open(0)
    try:
        assert "aten" in dev.info.formats
    finally:
        dev.close()
    # The same driver without its word that its memory is host memory: GPU memory, which
    # only torch with CUDA can compute on.
    gpu_like = types.SimpleNamespace(cuda=fake.cuda, ndarray=fake.ndarray,
                                     __version__=fake.__version__)
    dev = load_backend("cuda", memory="64MiB", cupy=gpu_like).open(0)
    try:
        assert ("aten" in dev.info.formats) == torch.cuda.is_available()
        if not torch.cuda.is_available():
            dev.load_module(b"", "aten")
            with pytest.raises(harp.UnsupportedError, match="no usable CUDA"):
                dev.synchronize()
    finally:
        dev.close()


class CountingGate(ComputeGate):
    def __init__(self) -> None:
        self.enters, self.charged, self.held = 0, [], False

    def enter(self) -> None:
        self.enters += 1
        self.held = True

    def exit(self, device_ns: int) -> None:
        self.held = False
        self.charged.append(device_ns)


def test_operators_hold_the_gate_are_charged_and_compute_on_the_sessions_buffers():
    backend = load_backend("cuda", memory="64MiB", cupy=emulated_cupy())
    gate = CountingGate()
    dev = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 64 << 20, None), gate))
    try:
        session = ht.use(dev)
        a = torch.randn(128, 128).to("harp")
        launches = session.ops
        b = a @ a
        assert session.ops == launches + 1
        assert gate.enters == session.ops and len(gate.charged) == session.ops
        assert gate.charged[-1] > 0 and not gate.held        # the mm's own time, then let go
        # The tensors the operator saw are the session's buffers themselves.
        call = dev._modules[session.module.id].payload.call(NEG)
        buf = dev.alloc(64)
        arg = harp.ArrayArg(buf, "float32", (4,), 16, (4,))
        from harp.backends.cuda.aten import AtenKernel
        out, x = AtenKernel(call, call.module.place, dev._cp).prepare([arg, arg], dev._mem)
        assert x.data_ptr() == dev._buffers[buf.id].ptr + 16 and x.device.type == "cpu"
        torch.testing.assert_close(b.cpu(), a.cpu() @ a.cpu())
    finally:
        ht.reset()
        dev.close()


@pytest.fixture(params=["cuda-local", "cuda-remote"])
def pair(request, cuda_stand_in_pool):
    """A session running operators, and another session of the same server."""
    if request.param == "cuda-local":
        backend = load_backend("cuda", memory="64MiB", cupy=emulated_cupy())
        dev, other = backend.open(0), backend.open(0)
    else:
        url, tls = cuda_stand_in_pool
        dev, other = harp.connect(url, tls=tls), harp.connect(url, tls=tls)
    session = ht.use(dev)
    try:
        yield session, dev, other
    finally:
        ht.reset()
        dev.close()
        other.close()


def _refused(dev, fn, args, error, match):
    dev.launch(fn, 1, 1, args)
    with pytest.raises(error, match=match) as info:
        dev.synchronize()
    assert info.value.call == "launch"


def test_hostile_arrays_are_refused_and_the_session_goes_on(pair):
    session, dev, other = pair
    neg, add = session.function(NEG), session.function(ADD)
    buf, out = dev.alloc(16), dev.alloc(16)
    dev.write(buf, 0, np.arange(4, dtype=np.float32))
    ok = harp.ArrayArg(out, "float32", (4,))
    # an array past its buffer, by its shape or its offset
    _refused(dev, neg, [ok, harp.ArrayArg(buf, "float32", (8,))], harp.ArgumentError,
             "outside its buffer")
    _refused(dev, neg, [ok, harp.ArrayArg(buf, "float32", (4,), 4)], harp.ArgumentError,
             "outside its buffer")
    # backwards strides (DLPack would abort the process on them): refused
    _refused(dev, neg, [harp.ArrayArg(out, "float32", (2,), 4, (-4,)),
                        harp.ArrayArg(buf, "float32", (2,), 4, (-4,))], harp.ArgumentError,
             "negative strides")
    # another session's buffer is not a buffer of this one
    theirs = other.alloc(16)
    other.write(theirs, 0, np.full(4, 7, np.float32))
    _refused(dev, neg, [harp.ArrayArg(theirs, "float32", (4,)), ok], harp.InvalidHandleError,
             "not allocated in this session")
    assert np.array_equal(np.frombuffer(other.read(theirs, 0, 16), np.float32),
                          np.full(4, 7, np.float32))
    # an output smaller than the result: refused before anything runs
    _refused(dev, add, [harp.ArrayArg(out, "float32", (2,)), harp.ArrayArg(buf, "float32", (4,)),
                        harp.ArrayArg(buf, "float32", (4,))], harp.ArgumentError, "result 0")
    # a buffer where an array belongs, and the wrong number of arguments
    _refused(dev, neg, [ok, harp.BufferArg(buf)], harp.ArgumentError, "array or a scalar")
    _refused(dev, neg, [ok], harp.ArgumentError, "takes 2 launch arguments")
    assert np.array_equal(np.frombuffer(dev.read(out, 0, 16), np.float32), np.zeros(4))
    dev.launch(neg, 1, 1, [ok, harp.ArrayArg(buf, "float32", (4,))])
    assert np.array_equal(np.frombuffer(dev.read(out, 0, 16), np.float32),
                          -np.arange(4, dtype=np.float32))
