"""Failure paths a pool must survive: dead links, busy servers, hostile names, signals."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import harp
from harp import security
from harp.backends import load_backend
from harp.security import ephemeral_pool, server_credentials
from harp.server import PoolServer


class BlackHoleProxy:
    """A TCP relay between a client and a server that can stop relaying, silently (the
    link goes dead without a reset, as a cut cable or a partition would)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.dead = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self.dead.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def sync_fails_once_keepalive_finds_the_link_dead(dev, dead: threading.Event) -> None:
    """Cut the link (`dead`); the next `synchronize()` must fail with gRPC's ping timeout
    within the keepalive bound the device was opened with (1 s + 1 s), with room."""
    dead.set()                                            # the link goes silent
    t0 = time.monotonic()
    with pytest.raises(harp.TransportError, match="ping timeout"):
        dev.synchronize()
    took = time.monotonic() - t0
    print(f"dead link noticed after {took:.2f} s (keepalive 1 s + 1 s)")
    assert took < 8
    dev.close()


def test_a_dead_link_fails_a_sync_call_within_the_keepalive_bound(fresh_pool):
    """The frames on the stream (the stream's own keepalive; with the frames on the data
    channel: test_frames_on_data.py)."""
    proxy = BlackHoleProxy(fresh_pool.address)
    try:
        dev = harp.connect(f"harp://{proxy.address}", tls=fresh_pool.client_tls,
                           keepalive_s=1, keepalive_timeout_s=1, frames_on_data=False)
        buf = dev.alloc(1024)
        dev.write(buf, 0, b"x" * 1024)
        dev.synchronize()
        sync_fails_once_keepalive_finds_the_link_dead(dev, proxy.dead)
    finally:
        proxy.close()


def test_a_long_call_on_a_live_server_is_not_mistaken_for_a_dead_link(fresh_pool):
    """gRPC core answers keepalive pings while a long call runs, so a call longer than the
    keepalive bound still returns."""
    dev = fresh_pool.connect(keepalive_s=1, keepalive_timeout_s=1)
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    gemm = dev.function(lib, "gemm_f64")
    m = 1024
    buf = dev.alloc(m * m * 8)
    for _ in range(150):                                  # several seconds of work
        dev.launch(gemm, 1, 1, [buf, buf, buf, np.int64(m), np.int64(m), np.int64(m),
                                np.float64(1), np.float64(0)])
    t0 = time.monotonic()
    dev.synchronize()
    assert time.monotonic() - t0 > 3                      # longer than the bound, and fine
    dev.close()


def test_client_names_cannot_forge_server_log_lines(fresh_pool, caplog):
    caplog.set_level(logging.INFO, logger="harp.server")
    with fresh_pool.connect(client_name="alice\n2026-12-01 harp.server INFO session s9 "
                                        "opened by root") as dev:
        dev.synchronize()
    lines = [r.getMessage() for r in caplog.records if "opened by" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)
    assert any("alice\\n2026" in line for line in lines)


def _pin(pid: int, cpu: int) -> None:
    os.sched_setaffinity(pid, {cpu})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_fifty_concurrent_connects_to_a_busy_server_all_succeed(tmp_path):
    """The server's process and a busy loop share one core; 50 clients connect at once."""
    server_files, client_files = ephemeral_pool(tmp_path)
    code = ("import sys, time\nfrom harp.backends import load_backend\n"
            "from harp.security import TlsFiles, server_credentials\n"
            "from harp.server import PoolServer\n"
            "tls = TlsFiles(*sys.argv[1:4])\n"
            "s = PoolServer(load_backend('cpu', memory='1GiB'), max_sessions_per_identity=64)\n"
            "print(s.start(['127.0.0.1:0'], server_credentials(tls))[0], flush=True)\n"
            "time.sleep(3600)\n")
    server = subprocess.Popen([sys.executable, "-c", code, str(server_files.ca),
                               str(server_files.cert), str(server_files.key)],
                              stdout=subprocess.PIPE, text=True)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        address = server.stdout.readline().strip()
        cpu = sorted(os.sched_getaffinity(0))[0]
        _pin(server.pid, cpu)
        _pin(hog.pid, cpu)
        opened, failed = [], []
        gate = threading.Barrier(50)

        def one():
            gate.wait()
            try:
                dev = harp.connect(f"harp://{address}", tls=client_files, connect_timeout=60)
                dev.synchronize()
                opened.append(dev)
            except Exception as exc:
                failed.append(exc)
        threads = [threading.Thread(target=one) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for dev in opened:
            dev.close()
        assert not failed, failed[:3]
        assert len(opened) == 50
    finally:
        hog.kill()
        server.kill()
        hog.wait()
        server.wait()
        server.stdout.close()


def test_a_foreign_ca_and_plain_text_are_told_apart_from_a_dead_server(fresh_pool, tmp_path):
    other = ephemeral_pool(tmp_path / "other")[1]
    with pytest.raises(harp.AuthError, match="pool CA"):
        harp.connect(fresh_pool.url, tls=other)
    plain = PoolServer(load_backend("cpu", memory="64MiB"))
    address = plain.start(["127.0.0.1:0"], None)[0]
    try:
        with pytest.raises(harp.AuthError, match=f"harp\\+insecure://{address}"):
            harp.connect(f"harp://{address}", tls=fresh_pool.client_tls)
    finally:
        plain.stop()
    with socket.socket() as s:                        # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(harp.TransportError) as info:
        harp.connect(f"harp://127.0.0.1:{port}", tls=fresh_pool.client_tls, connect_timeout=3)
    assert not isinstance(info.value, harp.AuthError)


def _serve(tmp_path, *extra):
    certs = tmp_path / "certs"
    security.init_ca(certs)
    security.issue(certs, "server", "server")
    security.issue(certs, "client", "client")
    harp_cli = os.path.join(os.path.dirname(sys.executable), "harp")
    proc = subprocess.Popen([harp_cli, "server", "serve", "--listen", "127.0.0.1:0",
                             "--cert-dir", str(certs), *extra], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, line.split("listening on ")[1].split()[0], \
        security.tls_files("client", directory=certs)


NUMBA_SPIN = '''
from numba import cuda

@cuda.jit
def spin(out):
    i = 0
    while i < 200000000:
        i += 1
    out[0] = i
'''


@pytest.mark.parametrize("isolation, sig", [("process", signal.SIGTERM),
                                            ("process", signal.SIGINT),
                                            ("thread", signal.SIGTERM)])
def test_a_signal_stops_a_server_while_client_code_runs_on_it(tmp_path, isolation, sig):
    pytest.importorskip("numba.cuda.simulator")
    proc, url, tls = _serve(tmp_path, "--trust-client-code", "--isolation", isolation)
    dev = harp.connect(url, tls=tls)
    try:
        fn = dev.function(dev.load_module(NUMBA_SPIN, "numba-python"), "spin")
        out = dev.alloc(8)
        dev.launch(fn, 1, 1, [harp.ArrayArg(out, "int64", (1,))])
        thread = threading.Thread(target=lambda: _swallow(dev.synchronize), daemon=True)
        thread.start()
        time.sleep(1.0)                                   # the kernel is spinning
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        _swallow(dev.close)


def _swallow(fn):
    try:
        fn()
    except harp.HarpError:
        pass
