"""`harp trace ...` as a user runs it: subprocesses on a trace recorded from `harp demo`."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import HARP


def harp_cli(*args, env=None, check=True):
    result = subprocess.run([HARP, *map(str, args)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **(env or {})))
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def demo_cli_trace(tmp_path_factory):
    """`HARP_TRACE=... harp demo --local-only`: the demo's own session, recorded by the env."""
    path = tmp_path_factory.mktemp("cli") / "demo.harptrace"
    harp_cli("demo", "--local-only", "--size", "65536", "--gemm", "64",
             env={"HARP_TRACE": str(path), "HARP_TRACE_PAYLOADS": "1"})
    return path


def test_report_json_and_table(demo_cli_trace):
    rep = json.loads(harp_cli("trace", "report", demo_cli_trace, "--json").stdout)
    assert rep["trace"]["payloads"] is True and rep["trace"]["complete"] is True
    assert {a["api"] for a in rep["apis"]} >= {"launch", "read", "write", "synchronize"}
    assert len(rep["kernels"]) == 4 and rep["sync_stalls"]
    text = harp_cli("trace", "report", demo_cli_trace).stdout
    assert "kernels by device time" in text and "gemm_f32" in text


def test_export_writes_chrome_json(demo_cli_trace, tmp_path):
    out = tmp_path / "demo.json"
    harp_cli("trace", "export", demo_cli_trace, "--chrome", out)
    events = json.loads(out.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and all({"ph", "ts", "dur", "pid", "tid", "name"} <= e.keys() for e in slices)


def test_whatif_json(demo_cli_trace):
    res = json.loads(harp_cli("trace", "whatif", demo_cli_trace, "--rtt", "200us",
                              "--bandwidth", "10Gbit", "--json").stdout)
    assert res["link"]["rtt_us"] == pytest.approx(200)
    assert res["predicted_ms"] > res["recorded_ms"] > 0 and res["blame"]
    text = harp_cli("trace", "whatif", demo_cli_trace, "--rtt", "1ms", "--bandwidth",
                    "1Gbit").stdout
    assert "calls the prediction blames most" in text and "round trip" in text
    bad = harp_cli("trace", "whatif", demo_cli_trace, "--rtt", "soon", "--bandwidth", "1Gbit",
                   check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_replay_local_and_remote_json(demo_cli_trace, pool_server):
    local = json.loads(harp_cli("trace", "replay", demo_cli_trace, "--device", "local:cpu",
                                "--json").stdout)
    assert local["ok"] and local["digests_checked"] == local["digests_matched"] == 3
    tls = pool_server.client_tls
    remote = harp_cli("trace", "replay", demo_cli_trace, "--device", pool_server.url,
                      "--tls-ca", tls.ca, "--tls-cert", tls.cert, "--tls-key", tls.key,
                      "--progress", "--json")
    out = json.loads(remote.stdout)                          # the bar never breaks --json
    assert out["ok"] and out["digests_matched"] == 3 and out["calls"] == local["calls"]
    assert "replay [" in remote.stderr and "100%" in remote.stderr


def test_truncated_and_corrupt_files_on_the_command_line(demo_cli_trace, tmp_path):
    data = demo_cli_trace.read_bytes()
    torn = tmp_path / "torn.harptrace"
    torn.write_bytes(data[:-10])
    res = harp_cli("trace", "report", torn, "--json")
    assert "warning:" in res.stderr and "truncated at byte offset" in res.stderr
    assert json.loads(res.stdout)["trace"]["warnings"]
    bad = tmp_path / "bad.harptrace"
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(damaged))
    res = harp_cli("trace", "report", bad, check=False)
    assert res.returncode == 1 and "corrupt trace" in res.stderr and "byte offset" in res.stderr


def test_record_runs_a_command_with_tracing_on(tmp_path):
    out = tmp_path / "rec.harptrace"
    harp_cli("trace", "record", "-o", out, "--payloads", "--", HARP, "demo", "--local-only",
             "--size", "4096", "--gemm", "16")
    rep = json.loads(harp_cli("trace", "report", out, "--json").stdout)
    assert rep["trace"]["payloads"] and rep["trace"]["calls"] > 20
