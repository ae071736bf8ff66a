"""Report, Chrome export and what-if on real recordings, and the what-if checked against a
real replay over loopback."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

import harp
from harp.trace import open_trace
from harp.trace.export import write_chrome
from harp.trace.replay import replay
from harp.trace.report import build_report, render_report
from harp.trace.timeline import estimate
from harp.trace.whatif import Link, measure_link, parse_bandwidth, parse_duration, whatif


def test_report_on_the_demo_trace(demo_trace):
    with open_trace(demo_trace) as t:
        rep = build_report(t)
    apis = {a["api"]: a for a in rep["apis"]}
    assert apis["launch"]["calls"] == 4 and apis["write"]["calls"] == 4
    assert apis["read"]["calls"] == 3 and apis["synchronize"]["calls"] == 3
    moved = {x["direction"]: x for x in rep["transfers"]}
    n, m = 1 << 16, 64
    assert moved["host->device"]["bytes"] == 2 * 4 * n + 2 * 4 * m * m
    assert moved["device->host"]["bytes"] == 4 * n + 4 + 4 * m * m
    assert moved["host->device"]["bytes_per_s"] > 0
    kernels = [k["kernel"] for k in rep["kernels"]]
    assert sorted(kernels) == ["axpy_f32", "gemm_f32", "mul_f32", "reduce_sum_f32"]
    assert all(k["total_ms"] > 0 for k in rep["kernels"])
    d = rep["device_time"]
    assert d["busy_ms"] > 0 and d["idle_ms"] >= 0
    assert abs(d["busy_ms"] + d["idle_ms"] - d["span_ms"]) < 1e-6 * max(d["span_ms"], 1)
    stalls = rep["sync_stalls"]
    assert stalls and stalls == sorted(stalls, key=lambda s: -s["waited_ms"])
    json.dumps(rep)                                       # JSON-ready as it is
    text = render_report(rep)
    for heading in ("calls by API", "bytes moved", "kernels by device time", "device: busy",
                    "sync points that stalled longest"):
        assert heading in text


def test_chrome_export_has_tracks_and_slices(demo_trace):
    out = io.StringIO()
    with open_trace(demo_trace) as t:
        n = write_chrome(t, out)
    doc = json.loads(out.getvalue())
    events = doc["traceEvents"]
    assert len(events) == n
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and all({"ts", "dur", "pid", "tid", "name"} <= e.keys() for e in slices)
    assert all(e["dur"] >= 0 for e in slices)
    device = [e for e in slices if e["pid"] == 2]
    assert {e["name"] for e in device if e["cat"] == "kernel"} == \
        {"axpy_f32", "mul_f32", "reduce_sum_f32", "gemm_f32"}
    assert any(e["cat"] == "copy" and e["name"].startswith("write H2D") for e in device)
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names[(1, 1)] == "calls" and "stream default" in names.values()


def test_whatif_on_the_demo_trace_blames_round_trips(demo_trace):
    with open_trace(demo_trace) as t:
        tl = estimate(t.calls())
    near = whatif(tl, Link(parse_duration("10us"), parse_bandwidth("100Gbit"),
                           parse_bandwidth("100Gbit")))
    far = whatif(tl, Link(parse_duration("2ms"), parse_bandwidth("1Gbit"),
                          parse_bandwidth("1Gbit")))
    assert far["predicted_ms"] > near["predicted_ms"] >= 0.5 * near["recorded_ms"]
    syncs = sum(1 for c in tl.calls if c.sync)
    assert far["round_trips"] == syncs
    assert far["predicted_ms"] >= syncs * 2.0           # at least one round trip per sync call
    assert far["blame"][0]["api"] in ("read", "synchronize", "close", "mem_info", "elapsed")
    assert "round trip" in far["blame"][0]["why"]


def test_units():
    assert parse_duration("200us") == pytest.approx(200e-6)
    assert parse_duration("1.5ms") == pytest.approx(1.5e-3)
    assert parse_bandwidth("10Gbit") == pytest.approx(1.25e9)
    assert parse_bandwidth("1.2GB/s") == pytest.approx(1.2e9)
    assert parse_bandwidth("800MiB/s") == pytest.approx(800 * 2**20)
    with pytest.raises(ValueError):
        parse_bandwidth("fast")


def _chatty_workload(dev: harp.Device) -> None:
    """What a network hurts: bulk transfers and many small sync reads between launches."""
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    axpy = dev.function(lib, "axpy_f32")
    n = 1 << 21                                               # 8 MiB of float32
    x = np.ones(n, np.float32)
    bx, by = dev.alloc(4 * n), dev.alloc(4 * n)
    dev.write(bx, 0, x)
    dev.write(by, 0, x)
    for _ in range(60):
        dev.launch(axpy, 1, 256, [by, bx, np.float32(1), np.int64(1024)])
        dev.read(by, 0, 4096)
    for _ in range(20):
        dev.launch(axpy, 4, 256, [by, bx, np.float32(1), np.int64(1 << 18)])
    dev.synchronize()
    dev.read(by, 0, 4 * n)
    dev.free(bx)
    dev.free(by)
    dev.synchronize()


def test_whatif_charges_one_round_trip_per_sync_call_and_bytes_at_link_speed(tmp_path):
    """The model, checked exactly on a real recording (no timing involved): a longer round
    trip adds that much per round trip, a slower link adds the payload's bytes at its
    speed. How close the model comes to a real replay is a benchmark, not a test:
    `python benchmarks/whatif_accuracy.py`."""
    path = tmp_path / "chatty.harptrace"
    with harp.connect("local:cpu", trace=str(path)) as dev:
        _chatty_workload(dev)
    with open_trace(path) as t:
        tl = estimate(t.calls())
    fast, slow = parse_bandwidth("100Gbit"), parse_bandwidth("1Gbit")
    base = whatif(tl, Link(100e-6, fast, fast), timing="asap")
    rtt2 = whatif(tl, Link(300e-6, fast, fast), timing="asap")
    assert rtt2["round_trips"] == base["round_trips"] == sum(1 for c in tl.calls if c.sync)
    assert rtt2["breakdown_ms"]["round_trips"] - base["breakdown_ms"]["round_trips"] == \
        pytest.approx(base["round_trips"] * 0.2, rel=1e-9)
    narrow = whatif(tl, Link(100e-6, slow, slow), timing="asap")
    # Bytes a sync call returns cross the link after the device is done, so the last 8 MiB
    # read alone adds its bytes at the narrower link's speed, whatever the recorded timings
    # (transfers before it may hide behind device time, and are not counted here).
    delta_ms = (4 << 21) * (1 / slow - 1 / fast) * 1e3
    assert narrow["predicted_ms"] - base["predicted_ms"] >= delta_ms * 0.999
    assert narrow["breakdown_ms"]["round_trips"] == pytest.approx(
        base["breakdown_ms"]["round_trips"], rel=1e-9)
