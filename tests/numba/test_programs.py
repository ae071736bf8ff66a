"""Unmodified numba programs under `harp run`, against a local cpu device and a remote pool
server, print exactly what they print in Numba's simulator without HARP."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harp.trace import open_trace

from .conftest import (HARP, PROGRAMS, base_env, harp_run_cmd, reference_cmd, remote_options,
                       run)


@pytest.mark.parametrize("mode", ["local", "remote"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_program_prints_the_same_as_in_the_simulator(program_runs, program, mode):
    ref = program_runs[(program, "reference")]
    got = program_runs[(program, mode)]
    assert ref.returncode == 0, ref.stderr
    assert got.returncode == 0, got.stderr
    assert len(ref.stdout.splitlines()) >= 2
    assert got.stdout == ref.stdout


def test_remote_run_goes_through_the_pool_server_and_is_traced(pool_server, tmp_path):
    trace = tmp_path / "saxpy.harptrace"
    out = run(harp_run_cmd("saxpy", *remote_options(pool_server), "--trace", str(trace)),
              base_env(), tmp_path)
    assert out.returncode == 0, out.stderr
    with open_trace(trace) as t:
        calls = list(t.calls())
        apis = [c.api for c in calls]
        assert apis.count("launch") == 1 and apis.count("load_module") == 1
        load = next(c for c in calls if c.api == "load_module")
        assert load["format"] == "numba-python"
        assert b"def saxpy(out, a, x, y):" in t.blob(load["blob"])
        assert "cpu" in str(t.device)


def test_child_processes_are_covered(pool_server, tmp_path):
    ref = run(reference_cmd("child"), base_env(NUMBA_ENABLE_CUDASIM="1"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    assert "child numba.cuda: module" in ref.stdout
    for options in (["--device", "local:cpu"], remote_options(pool_server)):
        got = run(harp_run_cmd("child", *options), base_env(), tmp_path)
        assert got.returncode == 0, got.stderr
        assert "child numba.cuda: ShimModule" in got.stdout
        strip = lambda text: [l for l in text.splitlines()   # noqa: E731
                              if not l.startswith("child numba.cuda")]
        assert strip(got.stdout) == strip(ref.stdout)


def test_traces_of_a_parent_and_its_child_do_not_collide(tmp_path):
    trace = tmp_path / "run.harptrace"
    got = run(harp_run_cmd("child", "--device", "local:cpu", "--trace", str(trace)),
              base_env(), tmp_path)
    assert got.returncode == 0, got.stderr
    files = sorted(p.name for p in tmp_path.glob("run*.harptrace"))
    # the parent opens no session; its child writes run.harptrace
    assert files == ["run.harptrace"]
    with open_trace(trace) as t:
        assert "launch" in [c.api for c in t.calls()]


def test_hook_does_nothing_without_the_variable(hook_installed, tmp_path):
    code = ("import sys\nloaded = sorted(m for m in sys.modules if m in ('harp', "
            "'_harp_run_hook') or m.startswith('harp.'))\n"
            "import numba.cuda\n"
            "print(type(sys.modules['numba.cuda']).__name__, loaded)")
    out = run([sys.executable, "-c", code], base_env(), tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "module []"


def test_hook_imports_no_harp_or_numpy_at_start_up_even_with_the_variable(hook_installed,
                                                                             tmp_path):
    # a program may set thread counts before importing numpy: the hook must not import it
    code = "import sys\nprint(sorted(m for m in ('numpy', 'harp', 'grpc') if m in sys.modules))"
    out = run([sys.executable, "-c", code], base_env(HARP_RUN_DEVICE="local:cpu"), tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_program_submodule_imports_are_refused_saying_why(tmp_path):
    code = "import numba.cuda.kernels.transpose"
    out = run([HARP, "run", "--device", "local:cpu", "--", "python", "-c", code], base_env(),
              tmp_path)
    assert out.returncode != 0
    # the import system asks for the package first
    assert "UnsupportedError: import numba.cuda.kernels is not supported under HARP: numba's " \
        "ready-made kernels" in out.stderr


@pytest.mark.parametrize("remote", [False, True])
def test_kernels_defined_in_python_c_run(tmp_path, pool_server, remote):
    """No source file: the kernel travels as its code object."""
    code = ("import numpy as np\nfrom numba import cuda\n"
            "@cuda.jit\ndef k(x):\n    x[cuda.grid(1)] = 7\n"
            "d = cuda.device_array(2)\nk[1, 2](d)\nprint(d.copy_to_host().tolist())\n")
    options = remote_options(pool_server) if remote else ["--device", "local:cpu"]
    out = run([HARP, "run", *options, "--", "python", "-c", code], base_env(), tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[7.0, 7.0]"


def test_harp_run_says_what_it_needs(tmp_path):
    env = base_env(HARP_LEASE=str(tmp_path / "no-lease.json"))
    no_target = run([HARP, "run", "--", "python", "-c", "pass"], env, tmp_path)
    assert no_target.returncode == 1 and "--device" in no_target.stderr
    no_program = run([HARP, "run", "--device", "local:cpu"], env, tmp_path)
    assert no_program.returncode == 1 and "give the program after --" in no_program.stderr
    bad = run([HARP, "run", "--device", "gpu0", "--", "python", "-c", "pass"], env, tmp_path)
    assert bad.returncode == 1 and "local:BACKEND" in bad.stderr
    missing = run([HARP, "run", "--device", "local:cpu", "--", "no-such-program-xyz"], env,
                  tmp_path)
    assert missing.returncode == 127 and "cannot run no-such-program-xyz" in missing.stderr
    lease = run([HARP, "run", "--lease", str(tmp_path / "nope.json"), "--", "python", "-c",
                 "pass"], env, tmp_path)
    assert lease.returncode == 1 and "no such lease file" in lease.stderr


def test_exit_status_is_the_programs(tmp_path):
    out = run([HARP, "run", "--device", "local:cpu", "--", "python", "-c",
               "import sys; sys.exit(7)"], base_env(), tmp_path)
    assert out.returncode == 7


def test_install_hook_reports_where(hook_installed):
    assert "start-up hook installed in" in hook_installed
    directory = Path(hook_installed.rsplit(" in ", 1)[1].strip())
    from harp import runhook
    assert (directory / runhook.PTH_NAME).read_text() == runhook.PTH_LINE
    assert (directory / f"{runhook.HOOK_MODULE}.py").read_text() == \
        Path(runhook.__file__).read_text()


def test_program_through_a_lease_from_the_scheduler(tmp_path, program_runs):
    """harp run --lease FILE: a lease from `harp attach`, on a pool server that trusts client
    code and admits only sessions with the lease's token."""
    from harp import security
    certs = tmp_path / "certs"
    security.init_ca(certs)
    security.issue(certs, "server", "server")
    security.issue(certs, "server", "trusted")      # the pool server's: its name is its cert's
    security.issue(certs, "client", "client")
    env = base_env(HARP_CERT_DIR=str(certs), HARP_LEASE=str(tmp_path / "stored.json"),
                   XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    procs = []

    def spawn(*args):
        proc = subprocess.Popen([HARP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        procs.append(proc)
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stdout.read()
        return line.split("listening on ")[1].split()[0]

    try:
        url = spawn("scheduler", "serve", "--listen", "127.0.0.1:0", "--data-dir",
                    str(tmp_path / "sched"), "--cert-dir", str(certs))
        env["HARP_SCHEDULER"] = url
        spawn("server", "serve", "--listen", "127.0.0.1:0", "--name", "trusted",
              "--scheduler", url, "--memory", "256MiB", "--trust-client-code",
              "--cert-dir", str(certs), "--cert-name", "trusted")
        lease = tmp_path / "lease.json"
        for _ in range(50):   # the server registers with its first heartbeat
            attach = run([HARP, "attach", "--kind", "cpu", "--memory", "128MiB", "--save",
                          str(lease)], env, tmp_path)
            if attach.returncode == 0:
                break
            time.sleep(0.2)
        assert attach.returncode == 0, attach.stderr
        got = run(harp_run_cmd("saxpy", "--lease", str(lease)), env, tmp_path)
        assert got.returncode == 0, got.stderr
        assert got.stdout == program_runs[("saxpy", "reference")].stdout
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def test_harp_run_warns_when_the_program_is_another_python(tmp_path):
    other = tmp_path / "bin" / "python3"
    other.parent.mkdir()
    other.symlink_to(sys.executable)
    out = run([HARP, "run", "--device", "local:cpu", "--", str(other), "-c", "pass"],
              base_env(), tmp_path)
    assert out.returncode == 0
    assert "is not the Python that HARP is installed in" in out.stderr
