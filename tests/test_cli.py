"""The command line as a user runs it: subprocesses, JSON output checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

HARP = os.path.join(os.path.dirname(sys.executable), "harp")


def run(*args, env=None, check=True):
    result = subprocess.run([HARP, *args], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **(env or {})))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_demo_runs_local_remote_and_leased_and_checks_against_numpy():
    out = json.loads(run("demo", "--size", "65536", "--gemm", "64", "--json").stdout)
    assert out["ok"] is True
    devices = [r["device"] for r in out["runs"]]
    assert devices[0] == "local:cpu" and devices[1].startswith("harp://127.0.0.1:")
    assert devices[2].startswith("lease ")
    assert all(all(r["checks"].values()) for r in out["runs"])
    # every other backend: a row where it is available, its reason where it is not
    for name in ("cuda", "opencl", "onnx"):
        assert (f"local:{name}" in devices) != (name in out["unavailable"]), name
    assert "local:onnx" in devices          # onnxruntime comes with the test extras


def test_demo_table_for_people():
    out = run("demo", "--size", "4096", "--gemm", "32").stdout
    assert "local:cpu" in out and "(mTLS)" in out and "MISMATCH" not in out


def test_certs_init_issue_ls(tmp_path):
    d = str(tmp_path / "certs")
    run("certs", "--dir", d, "init")
    run("certs", "--dir", d, "issue", "server", "gpu1", "--san", "gpu1.example.org")
    run("certs", "--dir", d, "issue", "client", "alice")
    rows = json.loads(run("certs", "--dir", d, "ls", "--json").stdout)
    roles = {os.path.basename(r["file"]): r["role"] for r in rows}
    assert roles == {"ca.pem": "ca", "gpu1.pem": "server", "alice.pem": "client"}
    assert "gpu1.example.org" in next(r for r in rows if r["file"].endswith("gpu1.pem"))["sans"]
    again = run("certs", "--dir", d, "init", check=False)
    assert again.returncode == 1 and "already exist" in again.stderr
    assert oct(os.stat(tmp_path / "certs" / "alice.key").st_mode & 0o777) == "0o600"


def test_connect_without_address_or_lease_says_what_to_do(tmp_path):
    code = "import harp\ntry:\n    harp.connect()\nexcept harp.ArgumentError as e:\n    print(e)"
    env = dict(os.environ, HARP_LEASE=str(tmp_path / "none.json"))
    env.pop("HARP_DEVICE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert "harp attach" in out.stdout


def test_harp_up_serves_a_one_machine_pool_and_stops_on_ctrl_c(tmp_path):
    """`harp up`: certificates on first use, a scheduler and a cpu pool server; a lease from
    it works through `harp.connect()`; one metrics endpoint shows both services to the
    monitor certificate it issued; SIGINT stops everything cleanly."""
    import signal
    env = dict(os.environ, HARP_DATA_DIR=str(tmp_path / "data"),
               HARP_CERT_DIR=str(tmp_path / "certs"), HARP_LEASE=str(tmp_path / "lease.json"))
    proc = subprocess.Popen([HARP, "up", "--scheduler-listen", "127.0.0.1:0",
                             "--server-listen", "127.0.0.1:0", "--memory", "256MiB",
                             "--metrics-listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = ""
        while "HARP is up" not in line:
            line = proc.stdout.readline()
            assert line, "harp up exited before it was up"
        env["HARP_SCHEDULER"] = line.split("scheduler ")[1].split(",")[0]
        while "HARP metrics on" not in line:
            line = proc.stdout.readline()
            assert line, "harp up exited before it served its metrics"
        metrics = line.split("HARP metrics on ")[1].split()[0]
        assert (tmp_path / "certs" / "ca.pem").exists()
        pool = json.loads(run("pool", "ls", "--json", env=env).stdout)
        assert pool[0]["state"] == "up" and pool[0]["devices"][0]["kind"] == "cpu"
        lease = json.loads(run("attach", "--kind", "cpu", "--memory", "64MiB", "--json",
                               env=env).stdout)
        code = ("import harp\nd = harp.connect()\nb = d.alloc(4)\nd.write(b, 0, b'abcd')\n"
                "print(bytes(d.read(b, 0, 4)).decode(), d.mem_info().total)\nd.close()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=60)
        assert out.stdout.split() == ["abcd", str(64 << 20)], out.stderr
        assert json.loads(run("detach", "--json", env=env).stdout)["state"] == "ended"
        assert lease["devices"][0]["server"] == pool[0]["name"]
        import ssl
        import urllib.request
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
        context.load_cert_chain(str(tmp_path / "certs" / "monitor.pem"),
                                str(tmp_path / "certs" / "monitor.key"))
        text = urllib.request.urlopen(metrics, context=context, timeout=15).read().decode()
        assert 'harp_scheduler_leases{state="ended"} 1.0' in text
        assert 'harp_device_sessions_opened_total{device="0"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        proc.stdout.close()
