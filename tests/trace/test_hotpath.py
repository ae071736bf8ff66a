"""The recorded launch path: arguments stored as passed and encoded when a block is packed
decode to exactly the calls made, from several threads, across blocks written while they run."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import harp
from harp.trace import TraceRecorder, open_trace
from harp.trace import recorder

LAUNCHES = 400        # per thread: enough for many interleavings and several blocks


@pytest.fixture(params=["local", "remote"])
def session(request):
    """A session on local:cpu, and one through the shared pool server (its worker process)."""
    if request.param == "local":
        dev = harp.connect("local:cpu", trace=False)
    else:
        dev = request.getfixturevalue("pool_server").connect()
    try:
        yield dev
    finally:
        dev.close()


def _arg(value):
    """What a trace holds for one argument (docs/trace-format.md)."""
    if isinstance(value, harp.Buffer):
        return [0, value.id, value.nbytes, 0]
    if isinstance(value, harp.BufferArg):
        return [0, value.buffer.id, value.buffer.nbytes, value.offset]
    if isinstance(value, harp.Scalar):
        return [1, value.value, value.dtype]
    return [1, value.item(), value.dtype.name]


def test_two_threads_launching_while_blocks_are_written(session, tmp_path, monkeypatch):
    monkeypatch.setattr(recorder, "BLOCK_FIELDS", 11 * 16)    # launches write blocks too
    path = tmp_path / "threads.harptrace"
    rec = TraceRecorder(session, path)
    lib = rec.load_module(harp.CATALOG_IMAGE, "catalog")
    axpy, scale = rec.function(lib, "axpy_f32"), rec.function(lib, "scale_f32")
    x, y = rec.alloc(4096), rec.alloc(4096)
    side = rec.stream()
    made: dict[str, list] = {"a": [], "b": []}
    reused = (y, x, np.float32(0.5), np.int64(16))     # one tuple object, launched again and again

    def thread_a():        # fresh lists: the recorder must freeze each before the caller goes on
        for i in range(LAUNCHES):
            args = [x, harp.BufferArg(y, 4 * (i % 8)), np.float32(i), np.int64(i % 32)]
            rec.launch(axpy, 1, (i % 4) + 1, args)
            made["a"].append((axpy.id, 1, (i % 4) + 1, None, [_arg(a) for a in args]))
            args[2] = np.float32(-1)                  # changed after the call: not recorded

    def thread_b():        # the same tuple on a stream, and Scalar arguments in tuples
        for i in range(LAUNCHES):
            if i % 2:
                rec.launch(scale, (2, 1), 1, reused, stream=side)
                made["b"].append((scale.id, [2, 1], 1, side.id, [_arg(a) for a in reused]))
            else:
                args = (x, x, harp.Scalar(float(i), "float32"), harp.Scalar(i, "int64"))
                rec.launch(scale, 2, 1, args, stream=side)
                made["b"].append((scale.id, 2, 1, side.id, [_arg(a) for a in args]))

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for th in threads:
        th.start()
    while any(th.is_alive() for th in threads):
        rec.flush()                                    # blocks packed while the threads launch
    for th in threads:
        th.join()
    rec.synchronize()
    rec.close()

    with open_trace(path) as t:
        calls = t.read_all()
        blocks = t.call_blocks
    assert blocks >= 3
    assert sorted(c.seq for c in calls) == list(range(1, len(calls) + 1))
    launches = [c for c in calls if c.api == "launch"]
    assert len(launches) == 2 * LAUNCHES and all(c.error is None for c in launches)
    for name, fn in (("a", axpy), ("b", scale)):
        got = [(c["function"], c["grid"], c["block"], c["stream"], c["args"])
               for c in launches if c["function"] == fn.id]
        assert got == made[name]                      # each thread's calls, in its order
        mine = [c for c in launches if c["function"] == fn.id]
        assert all(a.seq < b.seq for a, b in zip(mine, mine[1:]))


def test_a_launch_that_fills_the_queue_writes_the_block(tmp_path, monkeypatch):
    monkeypatch.setattr(recorder, "BLOCK_FIELDS", 11 * 5)
    path = tmp_path / "blocks.harptrace"
    rec = TraceRecorder(harp.connect("local:cpu", trace=False), path)
    lib = rec.load_module(harp.CATALOG_IMAGE, "catalog")
    noop = rec.function(lib, "noop")
    for _ in range(60):
        rec.launch(noop, 1, 1, [])
    with open_trace(path, warn=False) as t:        # read while recording: no sync call yet
        written = t.read_all()
        blocks = t.call_blocks
    assert blocks >= 10
    assert [c.seq for c in written] == list(range(1, len(written) + 1))
    assert len(written) >= 2 + 55 and {c.api for c in written[2:]} == {"launch"}
    rec.close()
    with open_trace(path) as t:
        assert [c.api for c in t.calls()] == ["load_module", "function"] + ["launch"] * 60 \
            + ["close"]


def test_one_shot_and_failing_arguments(tmp_path):
    path = tmp_path / "args.harptrace"
    rec = TraceRecorder(harp.connect("local:cpu", trace=False), path)
    lib = rec.load_module(harp.CATALOG_IMAGE, "catalog")
    fill = rec.function(lib, "axpy_f32")
    buf = rec.alloc(64)
    values = [buf, buf, np.float32(2), np.int64(16)]
    rec.launch(fill, 1, 1, (a for a in values))        # a generator: both sides see every value
    TraceRecorder.launch(rec, fill, 1, 1, values)      # through the class, as any Device method
    with pytest.raises(TypeError):                     # a bare float argument is refused
        rec.launch(fill, 1, 1, [buf, buf, 2.0, np.int64(16)])
    rec.synchronize()
    out = np.frombuffer(rec.read(buf, 0, 64), np.float32)
    rec.close()
    assert np.all(out == 0)            # 0 + 2 * 0, twice: both launches ran with their values
    with open_trace(path) as t:
        launches = [c for c in t.calls() if c.api == "launch"]
    want = [_arg(a) for a in values]
    assert [c["args"] for c in launches[:2]] == [want, want]
    assert launches[2].error.type == "TypeError" and launches[2]["args"][2] == 2.0
