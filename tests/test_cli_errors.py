"""What a new user types wrong gets one clear line, never a traceback."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from harp import security

HARP = os.path.join(os.path.dirname(sys.executable), "harp")


def harp(*args, env=None, timeout=60, **kw):
    return subprocess.run([HARP, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ, **kw)


def _one_line_error(out, *words):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    for word in words:
        assert word in out.stderr, out.stderr


@pytest.mark.parametrize("args, words", [
    (["demo", "--size", "-5"], ["--size", "at least 1"]),
    (["demo", "--gemm", "0"], ["--gemm", "at least 1"]),
    (["attach", "--memory", "lots"], ["not a size"]),
    (["attach", "--count", "two"], ["not a whole number"]),
    (["attach", "--share", "2"], ["(0, 1]"]),
    (["server", "serve", "--listen", "127.0.0.1"], ["HOST:PORT"]),
    (["server", "serve", "--listen", "localhost:99999"], ["0 to 65535"]),
    (["certs", "issue", "client", "x", "--days", "-5"], ["at least 1"]),
    (["certs", "issue", "client", "x", "--days", "0"], ["at least 1"]),
    (["scheduler", "serve", "--store", "mysql://db/harp"], ["unknown store"]),
    (["scheduler", "serve", "--advertise", "sched-a:50050"], ["harp://HOST:PORT"]),
    (["leases", "--scheduler", " , "], ["no scheduler address"]),
    (["server", "serve", "--metrics-listen", "unix:/tmp/m.sock"], ["over TCP"]),
    (["scheduler", "serve", "--metrics-listen", "127.0.0.1"], ["HOST:PORT"]),
])
def test_bad_values_are_usage_errors(args, words):
    _one_line_error(harp(*args), *words)


def test_an_unreachable_scheduler_database_is_one_line(tmp_path):
    out = harp("scheduler", "serve", "--insecure", "--listen", "127.0.0.1:0", "--data-dir",
               str(tmp_path), "--store", f"host={tmp_path}/no-such-dir dbname=harp password=x9z")
    _one_line_error(out, "the scheduler's database", f"postgresql://{tmp_path}/no-such-dir")
    assert len(out.stderr.strip().splitlines()) == 1 and "x9z" not in out.stderr


def test_sizes_as_the_help_writes_them_are_accepted():
    from harp.units import parse_size
    assert parse_size("1Mi") == 1 << 20 and parse_size("4GiB") == 4 << 30
    assert parse_size("0") == 0 and parse_size("1.5GB") == 1_500_000_000
    # never a traceback, and never rounded down to 0 (which often means "no limit")
    for bad, words in (("1e999", "too large"), ("1e400GiB", "too large"),
                       ("0.5", "less than one byte"), ("0.9", "less than one byte")):
        with pytest.raises(ValueError, match=words):
            parse_size(bad)
    out = harp("demo", "--size", "1Ki", "--gemm", "16", "--local-only", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["size"] == 1024, out.stderr


def test_grpc_core_log_lines_stay_off_stderr(tmp_path, fresh_pool):
    """A TLS refusal is HARP's one-line error, without gRPC core's own log lines."""
    from harp.security import ephemeral_pool
    other = ephemeral_pool(tmp_path / "other")[1]
    code = ("import sys, harp\nfrom harp.security import TlsFiles\n"
            f"t = TlsFiles({str(other.ca)!r}, {str(other.cert)!r}, {str(other.key)!r})\n"
            "try:\n"
            f"    harp.connect({fresh_pool.url!r}, tls=t)\n"
            "except harp.AuthError as e:\n    print('refused', file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "refused" in out.stderr
    assert "ssl_transport_security" not in out.stderr and "I1" not in out.stderr, out.stderr


def test_without_certificates_the_error_says_how_to_get_them(tmp_path):
    env = dict(os.environ, HARP_CERT_DIR=str(tmp_path / "none"), XDG_CONFIG_HOME=str(tmp_path))
    out = harp("pool", "ls", env=env)
    _one_line_error(out, "harp up", "harp certs init")


def test_a_server_will_not_start_on_a_client_certificate(tmp_path):
    certs = tmp_path / "certs"
    security.init_ca(certs)
    security.issue(certs, "client", "alice")
    out = harp("server", "serve", "--listen", "127.0.0.1:0", "--cert-dir", str(certs),
               "--cert-name", "alice")
    _one_line_error(out, "client certificate", "harp certs issue server")


def test_a_port_in_use_is_one_line(tmp_path):
    certs = tmp_path / "certs"
    security.init_ca(certs)
    security.issue(certs, "server", "server")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = harp("server", "serve", "--listen", f"127.0.0.1:{port}", "--cert-dir", str(certs))
    _one_line_error(out, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_output_into_a_closed_pipe_stops_quietly(tmp_path):
    certs = tmp_path / "certs"
    security.init_ca(certs)
    for i in range(40):
        security.issue(certs, "client", f"user{i}")
    shell = subprocess.run(f"{HARP} certs --dir {certs} ls --json | head -c 10",
                           shell=True, capture_output=True, text=True, timeout=60)
    assert shell.stdout and "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr


def test_a_duration_without_a_unit_is_refused(tmp_path):
    trace = tmp_path / "t.harptrace"
    import harp as h
    with h.connect("local:cpu", trace=str(trace)) as dev:
        dev.synchronize()
    out = harp("trace", "whatif", str(trace), "--rtt", "200", "--bandwidth", "10Gbit")
    _one_line_error(out, "needs its unit", "200us")


def test_help_imports_no_subcommand():
    code = ("import sys\nfrom harp.cli.main import build_parser\nbuild_parser()\n"
            "print([m for m in sys.modules if m.startswith('harp.cli.') and "
            "m != 'harp.cli.main'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert harp("--help").returncode == 0


def test_harp_run_checks_the_device_before_the_program(tmp_path):
    marker = tmp_path / "ran"
    program = ["--", sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    out = harp("run", "--device", "local:cpuu", *program)
    _one_line_error(out, "unknown backend 'cpuu'")
    env = dict(os.environ, HARP_CERT_DIR=str(tmp_path))
    security.init_ca(tmp_path)
    security.issue(tmp_path, "client", "client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = harp("run", "--device", f"harp://127.0.0.1:{port}", *program, env=env)
    _one_line_error(out, "cannot open the device")
    assert not marker.exists()                       # the program never started


def test_a_second_attach_does_not_overwrite_a_live_lease(tmp_path):
    from harp.lease import Lease, LeaseDevice
    stored = tmp_path / "lease.json"
    Lease(lease_id="lease-old", state="active", expires_at=time.time() + 600, ttl_s=600,
          memory=0, share=1.0, devices=[LeaseDevice("s", 0, [], "h", "t")]).save(stored)
    env = dict(os.environ, HARP_LEASE=str(stored), HARP_SCHEDULER="harp://127.0.0.1:1",
               HARP_CERT_DIR=str(tmp_path))
    security.init_ca(tmp_path)
    security.issue(tmp_path, "client", "client")
    out = harp("attach", env=env)
    _one_line_error(out, "lease-old", "--replace", "--save")
    assert json.loads(stored.read_text())["lease_id"] == "lease-old"


NUMBA_LOOP = """
import numpy as np
from numba import cuda
@cuda.jit
def k(x):
    i = cuda.grid(1)
    if i < x.size:
        x[i] += 1
d = cuda.to_device(np.zeros(256, np.float32))
print("running", flush=True)
while True:
    k[1, 256](d)
    d.copy_to_host()
"""


def test_ctrl_c_of_a_remote_program_gives_one_traceback(fresh_pool, tmp_path):
    pytest.importorskip("numba.cuda.simulator")
    program = tmp_path / "loop.py"
    program.write_text(NUMBA_LOOP)
    fresh_pool.connect().close()     # its fork server is up (numba imported), even when loaded
    proc = subprocess.Popen([HARP, "run", "--device", fresh_pool.url, "--cert-dir",
                             str(fresh_pool.client_tls.ca.parent), "--", sys.executable,
                             str(program)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                       signal.SIG_DFL))
    try:
        first = proc.stdout.readline().strip()
        if first != "running":
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"the program did not start: {first!r}\n{err}")
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err.count("Traceback") == 1 and "KeyboardInterrupt" in err, err
    assert "gRPC" not in err, err
