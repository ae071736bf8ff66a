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
