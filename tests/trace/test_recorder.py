"""The recorder is invisible to the program, and every way of turning it on works."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import harp
from harp.trace import TraceRecorder, open_trace, session_recorder

from .conftest import mixed_workload


def test_recording_changes_nothing_the_program_sees(device, tmp_path):
    rec = TraceRecorder(device, tmp_path / "t.harptrace")     # wraps the session from its start
    seen = mixed_workload(rec)
    assert rec.info == device.info
    lib = rec.load_module(harp.CATALOG_IMAGE, "catalog")
    fn = rec.function(lib, "axpy_f32")
    buf = rec.alloc(16)
    with pytest.raises(TypeError, match="needs an explicit dtype"):    # immediate: same error
        rec.launch(fn, 1, 1, [buf, buf, 2, np.int64(4)])
    with pytest.raises(harp.ArgumentError, match="outside the buffer"):
        rec.write(buf, 8, b"x" * 16)
    rec.launch(fn, 1, 1, [buf, harp.Buffer(12345, 16), np.float32(1), np.int64(4)])
    with pytest.raises(harp.InvalidHandleError) as deferred:           # deferred: same call #
        rec.synchronize()
    assert mixed_workload(device) == seen     # the same workload straight on the device
    rec.close()
    with open_trace(tmp_path / "t.harptrace") as t:
        calls = t.read_all()
    launches = [c for c in calls if c.api == "launch"]
    assert launches[-2].error.type == "TypeError" and launches[-1].error is None
    sync = [c for c in calls if c.api == "synchronize"][-1]
    assert (sync.error.call, sync.error.seq) == ("launch", launches[-1].seq) \
        == (deferred.value.call, deferred.value.seq)
    assert [c.seq for c in calls] == list(range(1, len(calls) + 1))


def test_seq_numbers_match_the_devices_own(device, tmp_path):
    rec = TraceRecorder(device, tmp_path / "t.harptrace")
    buf = rec.alloc(8)
    rec.stream()
    rec.free(buf)
    rec.free(buf)                                   # call #4 fails, deferred
    with pytest.raises(harp.InvalidHandleError) as info:
        rec.mem_info()
    assert (info.value.call, info.value.seq) == ("free", 4)
    rec.close()
    with open_trace(tmp_path / "t.harptrace") as t:
        calls = t.read_all()
    assert [(c.seq, c.api) for c in calls[:5]] == [(1, "alloc"), (2, "stream"), (3, "free"),
                                                   (4, "free"), (5, "mem_info")]
    assert calls[4].error.seq == 4


def test_connect_trace_option_env_and_payloads(tmp_path, monkeypatch):
    path = tmp_path / "opt.harptrace"
    with harp.connect("local:cpu", trace=str(path), trace_payloads=True) as dev:
        assert isinstance(dev, TraceRecorder)
        dev.write(dev.alloc(4), 0, b"abcd")
    with open_trace(path) as t:
        assert t.payloads and t.header["meta"]["target"] == "local:cpu"
        write = next(c for c in t.calls() if c.api == "write")
        assert t.blob(write["blob"]) == b"abcd"

    monkeypatch.setenv("HARP_TRACE", str(tmp_path / "env.harptrace"))
    monkeypatch.setenv("HARP_TRACE_PAYLOADS", "1")
    first, second = harp.connect("local:cpu"), harp.connect("local:cpu")
    third = harp.connect("local:cpu", trace=False)
    assert isinstance(first, TraceRecorder) and isinstance(second, TraceRecorder)
    assert not isinstance(third, TraceRecorder)
    for dev in (first, second, third):
        dev.close()
    assert first.path.name == "env.harptrace" and second.path.name == "env.2.harptrace"
    with open_trace(second.path) as t:
        assert t.payloads and t.complete


def test_session_recorder_writes_one_file_per_session(pool_server, tmp_path):
    inner = pool_server.connect()
    dev = session_recorder(inner, tmp_path / "traces", "s7-abc/def", payloads=True)
    dev.write(dev.alloc(8), 0, b"12345678")
    dev.synchronize()
    assert dev.session_id == inner.session_id       # extras of the wrapped device show through
    dev.close()
    path = tmp_path / "traces" / "s7-abc_def.harptrace"
    with open_trace(path) as t:
        assert t.header["meta"]["session"] == "s7-abc/def" and t.payloads
        assert [c.api for c in t.calls()] == ["alloc", "write", "synchronize", "close"]


def test_threads_sharing_a_remote_device_get_distinct_numbers(pool_server, tmp_path):
    rec = TraceRecorder(pool_server.connect(), tmp_path / "threads.harptrace")
    lib = rec.load_module(harp.CATALOG_IMAGE, "catalog")
    noop = rec.function(lib, "noop")

    def work():
        for _ in range(300):
            rec.launch(noop, 1, 1, [])
        rec.synchronize()
    threads = [threading.Thread(target=work) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rec.close()
    with open_trace(tmp_path / "threads.harptrace") as t:
        seqs = sorted(c.seq for c in t.calls())
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == 2 + 3 * 301 + 1
