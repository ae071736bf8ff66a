"""Process isolation: each session in a worker process of its own.

Workers are killed with SIGKILL mid-launch and mid-transfer, crash, and exit on
their own; each time only their own session ends, with a `DeviceError` saying
what happened, while other sessions go on and new ones open at once. A
session's memory goes back to the server's ledger, and to the operating system
with its worker.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import harp
from harp import security
from tests.conftest import wait_until as _wait_until



def _round_trip(dev):
    buf = dev.alloc(64)
    dev.write(buf, 0, bytes(range(64)))
    assert dev.read(buf, 0, 64) == bytes(range(64))
    dev.free(buf)


def _stats(pool, dev):
    return next(s for s in pool.server.session_stats() if s["session"] == dev.session_id)


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _long_gemms(dev, count=200, m=1024):
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = dev.function(lib, "gemm_f64")
    buf = dev.alloc(m * m * 8)
    for _ in range(count):
        dev.launch(gemm, 1, 1, [buf, buf, buf, np.int64(m), np.int64(m), np.int64(m),
                                np.float64(1), np.float64(0)])


def test_each_session_has_a_worker_process_of_its_own(fresh_pool):
    with fresh_pool.connect() as a, fresh_pool.connect() as b:
        pa, pb = _stats(fresh_pool, a)["pid"], _stats(fresh_pool, b)["pid"]
        assert pa and pb and pa != pb != os.getpid()
        assert _stats(fresh_pool, a)["isolation"] == "process"
    assert _wait_until(lambda: not _alive(pa) and not _alive(pb), 10)   # and they exit


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:                # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def test_a_worker_killed_mid_launch_ends_only_its_session(fresh_pool):
    bystander = fresh_pool.connect()
    _round_trip(bystander)
    victim = fresh_pool.connect()
    _long_gemms(victim)
    pid = _stats(fresh_pool, victim)["pid"]
    thread, box = _in_thread(victim.synchronize)
    time.sleep(0.5)                                      # the gemms are running
    assert thread.is_alive()
    os.kill(pid, signal.SIGKILL)
    thread.join(15)
    error = box.get("error")
    assert isinstance(error, harp.DeviceError), box
    assert "killed by SIGKILL" in str(error) and "other sessions" in str(error)
    with pytest.raises(harp.DeviceError):               # and it stays over, clearly
        victim.mem_info()
    victim.close()
    _round_trip(bystander)                               # the other session goes on
    with fresh_pool.connect() as again:                  # and a new one opens at once
        _round_trip(again)
    assert _wait_until(lambda: len(fresh_pool.server.sessions) == 1)
    bystander.synchronize()                              # its free has run
    assert _wait_until(lambda: fresh_pool.server.ledger.used(0) == 0)
    bystander.close()


def test_a_worker_killed_mid_transfer_ends_only_its_session(fresh_pool):
    bystander = fresh_pool.connect()
    victim = fresh_pool.connect()
    buf = victim.alloc(256 << 20)
    data = np.ones(256 << 20, np.uint8)

    def write_forever():
        while True:
            victim.write(buf, 0, data)
    thread, box = _in_thread(write_forever)
    time.sleep(0.5)
    assert fresh_pool.server.ledger.used(0) == 256 << 20
    os.kill(_stats(fresh_pool, victim)["pid"], signal.SIGKILL)
    thread.join(15)
    assert isinstance(box.get("error"), (harp.DeviceError, harp.TransportError)), box
    assert _wait_until(lambda: fresh_pool.server.ledger.used(0) == 0)
    victim.close()
    _round_trip(bystander)
    bystander.close()


@pytest.mark.parametrize("source, what", [
    ("import os\nos._exit(3)\n", "exited with status 3"),
    ("import ctypes\nctypes.string_at(0)\n", "crashed by SIGSEGV"),
])
def test_a_worker_that_dies_by_itself_says_how(fresh_pool, source, what):
    bystander = fresh_pool.connect()
    with fresh_pool.connect() as victim:
        victim.load_module(source, "numba-python")       # runs client code: a trusted pool
        with pytest.raises(harp.DeviceError, match=what):
            victim.synchronize()
    _round_trip(bystander)
    bystander.close()


def test_a_closed_session_gives_its_memory_back(fresh_pool):
    with fresh_pool.connect() as dev:
        buf = dev.alloc(64 << 20)
        dev.fill(buf, 7)
        dev.synchronize()
        assert fresh_pool.server.ledger.used(0) == 64 << 20
        pid = _stats(fresh_pool, dev)["pid"]
        rss = _rss_kib(pid)
        assert rss > 64 << 10                            # the worker holds the bytes
    assert _wait_until(lambda: not _alive(pid), 10)      # and its exit gives them back
    assert _wait_until(lambda: fresh_pool.server.ledger.used(0) == 0, 5)


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def _start_server(tmp_path, *extra):
    certs = tmp_path / "certs"
    security.init_ca(certs)
    security.issue(certs, "server", "server")
    security.issue(certs, "client", "client")
    harp_cli = os.path.join(os.path.dirname(sys.executable), "harp")
    proc = subprocess.Popen([harp_cli, "server", "serve", "--listen", "127.0.0.1:0",
                             "--cert-dir", str(certs), "--memory", "4GiB", *extra],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    url = line.split("listening on ")[1].split()[0]
    return proc, url, security.tls_files("client", directory=certs)


def _session_round(url, tls, sessions, work):
    errors = []

    def one():
        try:
            with harp.connect(url, tls=tls) as dev:
                work(dev)
        except Exception as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one) for _ in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]


@pytest.mark.slow
def test_sessions_that_end_leave_the_server_as_small_as_idle(tmp_path):
    """60 sessions at once, five rounds, each session holding 16 MiB and moving 32 MiB:
    the server's own memory comes back to within 1.2x of the idle server's.

    The idle figure is the server's after it has served one burst of 60 sessions (its
    gRPC and TLS machinery sized for them); the figure of a server that never served a
    burst is printed too (README). Sessions' memory lives in their workers, which exit."""
    proc, url, tls = _start_server(tmp_path, "--max-sessions-per-identity", "64")
    try:
        def work(dev):
            buf = dev.alloc(16 << 20)
            dev.write(buf, 0, np.full(16 << 20, 3, np.uint8))
            assert dev.read(buf, 0, 16 << 20)[-1] == 3

        _session_round(url, tls, 2, work)                # gRPC and TLS loaded
        time.sleep(1)
        fresh = _rss_kib(proc.pid)
        _session_round(url, tls, 60, work)               # one burst, then idle
        time.sleep(2)
        idle = _rss_kib(proc.pid)
        rounds = []
        for _ in range(5):
            _session_round(url, tls, 60, work)
            time.sleep(1)
            rounds.append(_rss_kib(proc.pid))
        # idle handler threads leave after 10 s, and take their stacks with them
        settled = _wait_until(lambda: _rss_kib(proc.pid) <= 1.2 * idle, 30)
        print(f"server RSS: fresh {fresh} KiB, idle after a burst {idle} KiB, 1 s after each "
              f"of five rounds of 60 sessions {rounds} KiB, then {_rss_kib(proc.pid)} KiB")
        assert settled, (fresh, idle, rounds, _rss_kib(proc.pid))
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stdout.close()


@pytest.mark.slow
def test_server_threads_do_not_grow_with_streams(tmp_path):
    """64 sessions x 256 streams, each stream given work: the server process keeps a
    few threads per session, and each worker a few threads, whatever its streams."""
    proc, url, tls = _start_server(tmp_path, "--max-sessions", "64",
                                   "--max-sessions-per-identity", "64")
    counts: dict[str, list[int]] = {"workers": []}
    try:
        ready = threading.Barrier(65)
        done = threading.Event()
        errors = []

        def one():
            try:
                with harp.connect(url, tls=tls, connect_timeout=60) as dev:
                    buf = dev.alloc(1024)
                    for s in [dev.stream() for _ in range(256)]:
                        dev.fill(buf, 1, stream=s)
                    dev.synchronize()
                    ready.wait(120)
                    done.wait(120)
            except Exception as exc:
                errors.append(exc)
                ready.abort()
        threads = [threading.Thread(target=one) for _ in range(64)]
        for t in threads:
            t.start()
        try:
            ready.wait(180)
        except threading.BrokenBarrierError:
            done.set()
            for t in threads:
                t.join(60)
            raise AssertionError(errors[:3]) from None
        server_threads = _threads(proc.pid)
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_worker(int(p))]
        worker_threads = [_threads(p) for p in workers]
        done.set()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        print(f"64 sessions x 256 streams: server process {server_threads} threads, "
              f"{len(workers)} workers with {min(worker_threads)}-{max(worker_threads)} threads "
              f"each, {server_threads + sum(worker_threads)} in all")
        assert server_threads <= 64 * 3 + 40
        assert len(workers) >= 64 and max(worker_threads) <= 12
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stdout.close()


def _is_worker(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"harp.server.forkserver" in cmd and _parent(pid) != os.getpid() and \
        _is_forkserver(_parent(pid)) and bool(comm)


def _parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().split(")")[-1].split()[1])


def _is_forkserver(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"harp.server.forkserver" in f.read()
    except OSError:
        return False
