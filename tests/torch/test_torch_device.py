"""PyTorch programs on torch's `harp` device: local, and remote through a pool server
over mutual TLS (sessions in worker processes), checked against torch on the CPU; on the
cpu backend, and on the cuda backend driving the CuPy stand-in (`cuda-local`,
`cuda-remote`: torch's CPU build over the stand-in's memory through DLPack, one shared
session each, see conftest.py)."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'harp[torch]')")

import harp  # noqa: E402
import harp.torch as ht  # noqa: E402
from training import train  # noqa: E402  (tests/torch is on the path: see conftest)


SHARED = {"cuda-local": "cuda_stand_in", "cuda-remote": "cuda_stand_in_remote"}


@pytest.fixture(params=["local", "remote", *SHARED])
def session(request):
    if request.param == "local":
        dev = harp.connect("local:cpu")
    elif request.param == "remote":
        dev = request.getfixturevalue("pool_server").connect()
    else:
        dev = request.getfixturevalue(SHARED[request.param])
    ht.use(dev)
    try:
        yield dev
    finally:
        if request.param in SHARED:          # the shared session goes on: leave it clean
            ht.empty_cache()
            ht.reset()
            try:
                dev.synchronize()
            except harp.HarpError:
                pass
        else:
            ht.reset()
            dev.close()


def same(harp_value, cpu_value, tol=1e-6):
    got = harp_value.cpu() if isinstance(harp_value, torch.Tensor) else harp_value
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, cpu_value, rtol=tol, atol=tol)


def test_tensors_live_on_the_harp_device(session):
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    h = x.to("harp")
    assert h.device == torch.device("harp", 0) and h.is_leaf
    assert isinstance(h, ht.HarpTensor)
    assert h.harp_storage.buffer in [h.harp_storage.buffer]
    same(h, x)
    same(x.harp(), x)
    assert torch.nn.Linear(3, 2).harp().weight.device.type == "harp"
    assert "device='harp:0'" in repr(h)


def test_creation(session):
    same(torch.zeros(2, 3, device="harp"), torch.zeros(2, 3))
    same(torch.ones(4, dtype=torch.int64, device="harp"), torch.ones(4, dtype=torch.int64))
    same(torch.arange(2, 11, 3, device="harp"), torch.arange(2, 11, 3))
    same(torch.full((2, 2), 7.5, device="harp"), torch.full((2, 2), 7.5))
    e = torch.empty(3, 4, device="harp")
    assert e.shape == (3, 4) and e.device.type == "harp"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    same(torch.randn(5, device="harp", generator=g1), torch.randn(5, generator=g2))
    assert torch.equal(torch.randn(2, generator=g1), torch.randn(2, generator=g2))


def test_arithmetic_comparisons_and_reductions(session):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=g), torch.randn(4, generator=g)
    ha, hb = a.to("harp"), b.to("harp")
    same(ha + hb * 2 - 1, a + b * 2 - 1)
    same(ha / (hb.abs() + 1), a / (b.abs() + 1))
    same(torch.where(ha > hb, ha, hb), torch.where(a > b, a, b))
    same(ha == ha, a == a)
    same((ha < 0).sum(), (a < 0).sum())
    same(ha.sum(1), a.sum(1))
    same(ha.mean(), a.mean())
    same(ha.max(dim=0).values, a.max(dim=0).values)
    same(ha.argmax(1), a.argmax(1))
    same(ha.exp().log1p().sqrt(), a.exp().log1p().sqrt())
    assert abs(ha.sum().item() - a.sum().item()) < 1e-5
    assert bool(ha.sum() == ha.sum())


def test_matmul_and_views(session):
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, 5, generator=g),
               torch.randn(4, 4, generator=g))
    ha, hb, hc = a.to("harp"), b.to("harp"), c.to("harp")
    same(torch.bmm(ha, hb), torch.bmm(a, b))
    same(ha @ hc, a @ c)
    same(torch.mm(hc, hc.t()), torch.mm(c, c.t()))
    same(ha.view(6, 4), a.view(6, 4))
    same(ha.reshape(3, 8), a.reshape(3, 8))
    same(ha.transpose(1, 2), a.transpose(1, 2))
    same(ha.permute(2, 0, 1).contiguous(), a.permute(2, 0, 1).contiguous())
    same(ha[:, 1:, ::2], a[:, 1:, ::2])
    same(ha[1, 2], a[1, 2])
    view = hc[1:3]
    assert view.harp_storage is hc.harp_storage           # a view sends nothing
    view.mul_(10)                                          # and writes through
    c[1:3].mul_(10)
    same(hc, c)


def test_indexing_and_joining(session):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 3, generator=g)
    idx = torch.tensor([4, 0, 2])
    ha, hidx = a.to("harp"), idx.to("harp")
    same(ha.index_select(0, hidx), a.index_select(0, idx))
    same(ha[hidx], a[idx])
    gi = torch.tensor([[0, 2], [1, 0], [2, 2], [0, 0], [1, 1]])
    same(ha.gather(1, gi.to("harp")), a.gather(1, gi))
    src = torch.ones(5, 2)
    same(torch.zeros(5, 3, device="harp").scatter(1, gi.to("harp"), src.to("harp")),
         torch.zeros(5, 3).scatter(1, gi, src))
    same(torch.cat([ha, ha * 2], 0), torch.cat([a, a * 2], 0))
    same(torch.stack([ha, ha + 1], 1), torch.stack([a, a + 1], 1))


def test_nn_layers_and_losses(session):
    torch.manual_seed(5)
    x = torch.randn(2, 3, 6, 6)
    conv, bn, ln = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.LayerNorm(6)
    hconv, hbn, hln = (copy.deepcopy(m).to("harp") for m in (conv, bn, ln))
    bn.train()
    with torch.no_grad():
        want = bn(conv(x)).relu()
        want_ln = torch.nn.functional.gelu(ln(x))
    with torch.no_grad():
        same(hbn(hconv(x.to("harp"))).relu(), want, 1e-5)
        same(torch.nn.functional.gelu(hln(x.to("harp"))), want_ln, 1e-5)
    same(hbn.running_mean, bn.running_mean, 1e-5)       # updated in place on the device
    logits, target = torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    hl = logits.to("harp")
    same(torch.softmax(hl, -1), torch.softmax(logits, -1))
    same(torch.log_softmax(hl, -1), torch.log_softmax(logits, -1))
    same(torch.nn.functional.cross_entropy(hl, target.to("harp")),
         torch.nn.functional.cross_entropy(logits, target))
    same(torch.nn.functional.mse_loss(hl, hl * 0.5), torch.nn.functional.mse_loss(logits, logits * 0.5))


def test_autograd_and_no_grad(session):
    w = torch.randn(3, 2, requires_grad=True)
    hw = w.detach().to("harp").requires_grad_()
    x = torch.randn(4, 3)
    (x @ w).tanh().sum().backward()
    (x.to("harp") @ hw).tanh().sum().backward()
    same(hw.grad, w.grad, 1e-6)
    with torch.no_grad():
        y = x.to("harp") @ hw
    assert not y.requires_grad


def test_dropout_is_seeded_like_the_cpu(session):
    x = torch.ones(1000)
    torch.manual_seed(11)
    want = torch.nn.functional.dropout(x, 0.3)
    torch.manual_seed(11)
    got = torch.nn.functional.dropout(x.to("harp"), 0.3)
    same(got, want)


@pytest.mark.parametrize("session, kind, optimizer", [
    (where, kind, optimizer) for where in ("local", "remote")
    for kind, optimizer in [("mlp", "adam"), ("cnn", "sgd"), ("cnn", "adam")]
] + [(where, "mlp", "adam") for where in SHARED], indirect=["session"])
def test_training_matches_the_cpu_at_every_step(session, kind, optimizer):
    want = train(kind, "cpu", optimizer=optimizer)
    got = train(kind, "harp", optimizer=optimizer)
    assert len(got) == 50
    for step, (a, b) in enumerate(zip(want, got)):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


def test_state_dict_saves_and_loads_through_the_cpu(session):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).to("harp")
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
    other = torch.nn.Linear(4, 2).to("harp")
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(3, 4).to("harp")
    same(other(x), model(x).cpu())


def test_an_operator_harp_does_not_run_is_named(session):
    x = torch.randn(4, 4).to("harp")
    with pytest.raises(harp.UnsupportedError, match="aten::linalg_qr|linalg_qr"):
        torch.linalg.qr(x)


def test_errors_come_back_deferred_and_name_the_operator(session):
    from harp.torch.session import current
    s = current()
    a = torch.ones(2, device="harp")
    # An out-of-range index is found by torch on the server, when the call runs.
    bad = torch.tensor([5]).to("harp")
    picked = a.index_select(0, bad)            # queued: no error yet
    with pytest.raises(harp.HarpError, match="index_select"):
        picked.cpu()
    s.device.synchronize()                     # reported once; the session goes on
    same(a + 1, torch.full((2,), 2.0))


def test_the_server_refuses_operators_outside_its_list(session):
    from harp.torch.session import current
    s = current()
    fn = s.device.function(s.module, '["from_file.default",1,["/etc/passwd"],{}]')
    with pytest.raises(harp.HarpError, match="from_file"):
        s.device.synchronize()
    del fn
    with pytest.raises(harp.ArgumentError, match="session's own device"):
        s.device.function(s.module, '["_to_copy.default",1,[{"t":1}],{"device":"cuda:1"}]')
        s.device.synchronize()
    with pytest.raises(harp.HarpError, match="format does not know"):
        s.device.function(s.module, '["add.Tensor",1,[{"t":1},{"x":"os.system"}],{}]')
        s.device.synchronize()


def test_outputs_are_checked_before_anything_runs(session):
    """A call whose result would be bigger than the output it names is refused, so it can
    make the server hold nothing beyond the buffers the session was given."""
    from harp.torch.session import current
    s = current()
    out = s.device.alloc(8)
    arg = harp.ArrayArg(out, "float32", (2,), 0, (4,))
    fn = s.device.function(s.module, '["full.default",1,[[100000000],{"s":1}],{}]')
    s.device.launch(fn, 1, 1, [arg, np.float64(1.0)])
    with pytest.raises(harp.ArgumentError, match="result 0"):
        s.device.synchronize()


def test_harp_torch_1_registers_the_device_when_torch_is_imported():
    code = ("import harp, torch\n"
            "print(torch.ones(2, device='harp').sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "HARP_TORCH": "1",
                                           "HARP_DEVICE": "local:cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2.0"]


def test_harp_run_gives_a_program_the_harp_device(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        "x = torch.arange(4.0).to(sys.argv[1])\n"
        "print(x.device, (x * 2).sum().item())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "harp"), "run",
                          "--device", "local:cpu", "--", sys.executable, str(script), "harp"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["harp:0", "12.0"]


def test_a_trace_shows_operators_by_device_time(tmp_path):
    from harp.trace import open_trace
    from harp.trace.report import build_report
    path = tmp_path / "torch.harptrace"
    dev = harp.connect("local:cpu", trace=str(path))
    ht.use(dev)
    try:
        a = torch.randn(32, 32).to("harp")
        for _ in range(5):
            a = torch.relu(a @ a * 0.1)
        a.sum().item()
    finally:
        ht.reset()
        dev.close()
    rep = build_report(open_trace(str(path)))
    names = {k["kernel"]: k["launches"] for k in rep["kernels"]}
    assert names.get("aten::mm.default") == 5 and names.get("aten::relu.default") == 5, names


def test_freed_tensors_buffers_are_reused_and_given_back(session):
    from harp.torch.session import current
    s = current()
    s.empty_cache()
    a = torch.ones(1024, device="harp")
    buffer = a.harp_storage.buffer
    used = session.mem_info()
    del a                                          # kept for reuse, not freed
    b = torch.zeros(1024, device="harp")          # the same size: the same buffer
    assert b.harp_storage.buffer == buffer
    same(b, torch.zeros(1024))                      # and its old values are gone
    del b
    s.take(1)                                       # (collects what died)
    assert s.cached_bytes >= 4096
    harp.torch.empty_cache()
    assert s.cached_bytes == 0
    assert session.mem_info().free > used.free      # back to the device


def test_a_program_that_exits_with_operators_queued_exits_cleanly():
    code = ("import torch, harp, harp.torch as ht\n"
            "ht.use(harp.connect('local:cpu'))\n"
            "a = torch.ones(4096, device='harp')\n"
            "for _ in range(300):\n"
            "    a = a * 1.0001\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr


def test_tensors_that_die_free_their_buffers_without_the_collector(session):
    import gc
    import weakref
    a = torch.ones(256, device="harp")
    storages = []
    gc.disable()
    try:
        for _ in range(100):
            a = a * 1.0001
            storages.append(weakref.ref(a.harp_storage))
        alive = sum(r() is not None for r in storages)
    finally:
        gc.enable()
    assert alive <= 2                       # the latest results, not all 100: the others went at once
