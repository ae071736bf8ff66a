#!/usr/bin/env python3
"""bench.py -- HARP's figures beside the transport limits of this machine, in one run.

Every figure is a median over --reps repetitions (spread = (max-min)/median),
measured interleaved with the limit it is compared to, so that drift on a noisy
machine hits both sides alike. Each remote server runs in its own OS process on
127.0.0.1 (port 0) with mutual TLS, certificates from harp.security.ephemeral_pool
in a temporary directory:

  * HARP pool server      `harp server serve` (cpu backend)
  * bare gRPC server      a child of this script (--role grpc-server): generic
                          handlers on raw bytes, no protobuf; also serves the
                          "naive" design (one unary call per device call)
  * raw TLS server/client children of this script (--role raw-server/raw-client):
                          Python ssl, TLS 1.3, the cipher suite gRPC negotiates

Measurements (the client is this process unless said otherwise):
  1. bulk write/read of --bulk-mib MiB through a RemoteDevice, vs a bare gRPC
     stream of 1 MiB messages and vs a raw TLS socket.
  2. sync round trips: RemoteDevice.synchronize() and a 64-byte read, vs a bare
     gRPC bidi ping-pong of 64-byte messages.
  3. async launches: N x launch(noop) + synchronize(), vs N 64-byte records sent
     wire.BATCH_CALLS per message over a bare gRPC stream with one ack at the end,
     vs the target of 100,000/s, and vs
  4. the naive design: one unary gRPC call per launch.
  5. the local path: harp.connect("local:cpu") vs CpuBackend().open(0) directly
     (in-process): noop launches/s and 1 MiB write+synchronize/s.
  6. isolation: the same pool server with sessions in worker processes (the default)
     beside one with --isolation thread, interleaved: async launches, synchronize(),
     bulk write and read, and connect-to-first-sync (what the relay costs).
  7. same host: a pool server on a unix socket, sessions with a shared-memory window
     beside sessions that move bulk data over the stream, interleaved: 256 MiB write
     and read vs memcpy of the same bytes, synchronize() and 64-byte reads.
See benchmarks/README.md for what each row compares and how to read it.

Usage:
  python benchmarks/bench.py                      # full run (~1 min on 2 cores; < 4 min)
  python benchmarks/bench.py --quick              # smoke run (~20 s)
  python benchmarks/bench.py --reps 7 --json out.json
  python benchmarks/bench.py --sections bulk,sync # a subset
  python benchmarks/bench.py --profile results/profile   # py-spy + cProfile of the
                                                  # launch, bulk-write and sync paths
Deps: the HARP venv (grpcio, numpy, msgpack, cryptography); py-spy for --profile.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

MiB = 1 << 20
HERE = os.path.abspath(__file__)
Q = struct.Struct("<Q")
MSG64 = b"m" * 64
REC64 = b"r" * 64

#: Options of the bare gRPC channels and server (as in the transport-limits probe).
GRPC_OPTS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

LAUNCH_TARGET = 100_000.0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(obj):
    sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


#: CPU sets for server and client processes (--placement split); empty = unpinned.
PLACEMENT: dict[str, set] = {"server": set(), "client": set()}


def _pdeathsig():
    """Child processes die with this script, even if it is SIGKILLed (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ============================================================================
# TLS material
# ============================================================================

def tls_paths(cert_dir):
    """(server TlsFiles, client TlsFiles) of the ephemeral pool in cert_dir."""
    from pathlib import Path
    from harp.security import TlsFiles
    d = Path(cert_dir)
    return (TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key"),
            TlsFiles(d / "ca.pem", d / "client.pem", d / "client.key"))


def ssl_server_ctx(cert_dir):
    import ssl
    srv, _ = tls_paths(cert_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(srv.cert), str(srv.key))
    ctx.load_verify_locations(str(srv.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED          # mutual TLS, like HARP
    return ctx


def ssl_client_ctx(cert_dir):
    import ssl
    _, cli = tls_paths(cert_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(cli.ca))
    ctx.load_cert_chain(str(cli.cert), str(cli.key))
    return ctx


def suite_conf(cert_dir, suite):
    """An OpenSSL config that forces one TLS 1.3 suite (Python's ssl cannot set them)."""
    path = os.path.join(cert_dir, "openssl-suite.cnf")
    with open(path, "w") as f:
        f.write("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
                "[ssl_sect]\nsystem_default = sysdef\n[sysdef]\n"
                "Ciphersuites = %s\n" % suite)
    return path


def grpc_cipher_probe(cert_dir):
    """Which TLS 1.3 suite gRPC's BoringSSL client prefers: point a channel at a
    Python ssl server that honours the client's preference (as limits.py does)."""
    import ssl
    import grpc
    from harp.security import channel_credentials
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    srv, cli = tls_paths(cert_dir)
    ctx.load_cert_chain(str(srv.cert), str(srv.key))
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["h2"])
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(5)
    res = {"cipher": None}

    def srv_thread():
        try:
            c, _ = ls.accept()
            c.settimeout(5)
            t = ctx.wrap_socket(c, server_side=True)
            res["cipher"] = t.cipher()[0]
            t.close()
        except Exception as exc:  # informational only
            res["error"] = str(exc)
    th = threading.Thread(target=srv_thread, daemon=True)
    th.start()
    ch = grpc.secure_channel("127.0.0.1:%d" % ls.getsockname()[1], channel_credentials(cli))
    try:
        grpc.channel_ready_future(ch).result(timeout=3)
    except Exception:
        pass
    th.join(6)
    ch.close()
    ls.close()
    return res["cipher"]


# ============================================================================
# server / client roles (child processes)
# ============================================================================

def role_grpc_server(a):
    """Bare gRPC server: generic handlers on raw bytes, mutual TLS; plus the naive
    one-unary-call-per-device-call design on a cpu device."""
    from concurrent.futures import ThreadPoolExecutor
    import grpc
    import msgpack
    import harp
    from harp import wire
    from harp.backends.cpu import CpuBackend
    from harp.security import server_credentials

    chunks = {}

    def up(it, ctx):
        n = 0
        for m in it:
            n += len(m)
        return Q.pack(n)

    def down(req, ctx):
        count, size = Q.unpack_from(req, 0)[0], Q.unpack_from(req, 8)[0]
        chunk = chunks.get(size)
        if chunk is None:
            chunk = chunks[size] = os.urandom(size)
        for _ in range(count):
            yield chunk

    # The same transfers, doing the copies HARP's design cannot avoid: the data
    # lands in (or comes from) a "device memory" array, one copy per chunk.
    import numpy as np
    mem = {}

    def device_memory():
        if "a" not in mem:
            mem["a"] = np.empty(a.bulk, dtype=np.uint8)
            mem["a"].fill(1)
        return mem["a"]

    def up_copy(it, ctx):
        dst = device_memory()
        n = 0
        for m in it:
            dst[n:n + len(m)] = np.frombuffer(m, np.uint8)
            n += len(m)
        return Q.pack(n)

    def down_copy(req, ctx):
        count, size = Q.unpack_from(req, 0)[0], Q.unpack_from(req, 8)[0]
        src = device_memory()
        for i in range(count):
            yield src[i * size:(i + 1) * size].tobytes()

    def echo(it, ctx):
        for m in it:
            yield m

    def count(it, ctx):
        msgs = 0
        nbytes = 0
        for m in it:
            msgs += 1
            nbytes += len(m)
        yield Q.pack(msgs) + Q.pack(nbytes)

    # The naive design: each device call is one unary RPC carrying one msgpack
    # record; the handler decodes it and calls the cpu backend.
    dev = CpuBackend(memory=64 * MiB).open(0)
    mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    functions = {1: dev.function(mod, "noop")}
    unpackb = msgpack.unpackb

    def naive(req, ctx):
        rec = unpackb(req)
        op = rec[0]
        if op == wire.LAUNCH:    # [op, fn, grid, block, shared, stream, args]
            dev.launch(functions[rec[1]], rec[2], rec[3], rec[6], rec[4])
        elif op == wire.SYNCHRONIZE:
            dev.synchronize()
        return b""

    server = grpc.server(ThreadPoolExecutor(max_workers=16), options=GRPC_OPTS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.B", {
        "Up": grpc.stream_unary_rpc_method_handler(up),
        "Down": grpc.unary_stream_rpc_method_handler(down),
        "UpCopy": grpc.stream_unary_rpc_method_handler(up_copy),
        "DownCopy": grpc.unary_stream_rpc_method_handler(down_copy),
        "Echo": grpc.stream_stream_rpc_method_handler(echo),
        "Count": grpc.stream_stream_rpc_method_handler(count),
        "Naive": grpc.unary_unary_rpc_method_handler(naive),
    }),))
    srv_files, _ = tls_paths(a.cert_dir)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(srv_files))
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", port, flush=True)
    stop.wait()
    server.stop(0.5).wait(2)
    dev.close()


def _recv_exact_into(s, mv, n):
    got = 0
    while got < n:
        r = s.recv_into(mv[got:n])
        if not r:
            raise EOFError
        got += r


def role_raw_server(a):
    """Raw TLS 1.3 server (mutual TLS): 'B' receives N bytes into a preallocated,
    pre-touched buffer and acks; 'D' sends N bytes from one 1 MiB chunk; 'Q' quits."""
    import numpy as np
    ctx = ssl_server_ctx(a.cert_dir)
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    dst = np.empty(a.bulk, dtype=np.uint8)
    dst.fill(1)
    dmv = memoryview(dst).cast("B")
    chunk = os.urandom(MiB)
    hdr = bytearray(9)
    hmv = memoryview(hdr)
    print("READY", ls.getsockname()[1], flush=True)
    while True:
        c, _ = ls.accept()
        c.settimeout(120)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            c = ctx.wrap_socket(c, server_side=True)
            _recv_exact_into(c, hmv, 9)
            mode, total = hdr[0:1], Q.unpack_from(hdr, 1)[0]
            if mode == b"Q":
                break
            if mode == b"B":
                _recv_exact_into(c, dmv, min(total, a.bulk))
                c.sendall(Q.pack(total))
            elif mode == b"D":
                left = total
                while left >= MiB:
                    c.sendall(chunk)
                    left -= MiB
                if left:
                    c.sendall(chunk[:left])
                _recv_exact_into(c, hmv, 8)     # client's ack: all bytes arrived
        except (EOFError, OSError) as exc:
            log("raw-server: connection failed: %s" % exc)
        finally:
            c.close()


def role_raw_client(a):
    """Raw TLS 1.3 client driven over stdin: 'up N' / 'down N' / 'quit'. Each
    transfer opens a connection (handshake not timed), then times N bytes in
    1 MiB sendall()s from one hot chunk, or recv_into() a pre-touched buffer."""
    import numpy as np
    ctx = ssl_client_ctx(a.cert_dir)
    chunk = os.urandom(MiB)
    dst = np.empty(a.bulk, dtype=np.uint8)
    dst.fill(1)
    dmv = memoryview(dst).cast("B")
    ack = bytearray(8)
    print("READY", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        cmd, n = parts[0], int(parts[1])
        s = socket.create_connection(("127.0.0.1", int(a.port)), timeout=120)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(s, server_hostname="localhost")
        cipher = s.cipher()[0]
        if cmd == "up":
            t0 = time.perf_counter()
            s.sendall(b"B" + Q.pack(n))
            left = n
            while left >= MiB:
                s.sendall(chunk)
                left -= MiB
            if left:
                s.sendall(chunk[:left])
            _recv_exact_into(s, memoryview(ack), 8)
            dt = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            s.sendall(b"D" + Q.pack(n))
            _recv_exact_into(s, dmv, n)
            dt = time.perf_counter() - t0
            s.sendall(Q.pack(n))
        s.close()
        emit({"gbps": n / dt / 1e9, "cipher": cipher})
    try:
        s = socket.create_connection(("127.0.0.1", int(a.port)), timeout=10)
        s = ctx.wrap_socket(s, server_hostname="localhost")
        s.sendall(b"Q" + Q.pack(0))
        s.close()
    except OSError:
        pass


# ============================================================================
# process management
# ============================================================================

class Child:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, name, argv, env=None, stdin=False):
        self.name = name
        self.lines = queue.Queue()
        cpus = PLACEMENT["server" if "server" in name else "client"]

        def setup():
            _pdeathsig()
            if cpus:
                os.sched_setaffinity(0, cpus)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     preexec_fn=setup)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pred, timeout):
        """The first stdout line for which pred(line) holds, or RuntimeError."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("%s: no expected output within %.0f s" % (self.name, timeout))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("%s exited (rc=%s) before it was ready"
                                   % (self.name, self.proc.poll()))
            if pred(line):
                return line

    def command(self, text, timeout):
        """Send one command line; return the JSON of its RESULT line."""
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self.wait_line(lambda ln: ln.startswith("RESULT "), timeout)
        return json.loads(line[7:])

    def pid_to_signal(self):
        """The process to signal: under py-spy, the profiled grandchild."""
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                kids = f.read().split()
            if kids and os.path.basename(self.proc.args[0]).startswith("py-spy"):
                return int(kids[0])
        except OSError:
            pass
        return self.proc.pid

    def stop(self, timeout=10):
        if self.proc.poll() is not None:
            return
        try:
            if self.proc.stdin:
                try:
                    self.proc.stdin.write("quit\n")
                    self.proc.stdin.flush()
                    self.proc.stdin.close()
                except (OSError, ValueError):
                    pass
            try:
                os.kill(self.pid_to_signal(), signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Watchdog:
    """Bounds each section: when it runs late, kill the servers (so a blocked client
    call fails), and if that does not unblock us, exit the process."""

    def __init__(self, children):
        self.children = children
        self.timer = None
        self.fired = None

    def arm(self, seconds, what):
        self.disarm()
        self.timer = threading.Timer(seconds, self._fire, (what, seconds))
        self.timer.daemon = True
        self.timer.start()

    def disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self, what, seconds):
        self.fired = what
        log("!! watchdog: %s ran past %.0f s; killing the servers" % (what, seconds))
        for c in list(self.children):
            try:
                c.proc.kill()
            except Exception:
                pass

        def last_resort():
            log("!! watchdog: still stuck; exiting")
            import faulthandler
            faulthandler.dump_traceback(all_threads=True)
            os._exit(3)
        t = threading.Timer(30, last_resort)
        t.daemon = True
        t.start()


def harp_server_argv(cert_dir, memory="2GiB", extra=(), listen="127.0.0.1:0"):
    exe = os.path.join(os.path.dirname(sys.executable), "harp")
    head = [exe] if os.path.exists(exe) else \
        [sys.executable, "-c", "import sys; from harp.cli.main import main; sys.exit(main())"]
    return head + ["server", "serve", "--listen", listen, "--cert-dir", cert_dir,
                   "--memory", memory, *extra]


def start_harp_server(cert_dir, children, prefix=(), memory="2GiB", extra=(),
                      listen="127.0.0.1:0"):
    c = Child("harp server", list(prefix) + harp_server_argv(cert_dir, memory, extra, listen))
    children.append(c)
    line = c.wait_line(lambda ln: "listening on harp://" in ln, 60)
    url = line.split("listening on ")[1].split()[0]
    return c, url


def start_role(role, a, children, extra=(), env=None, stdin=False):
    argv = [sys.executable, HERE, "--role", role, "--cert-dir", a.cert_dir,
            "--bulk", str(a.bulk)] + list(extra)
    c = Child(role, argv, env=env, stdin=stdin)
    children.append(c)
    line = c.wait_line(lambda ln: ln.startswith("READY"), 60)
    return c, line.split()[1:]


# ============================================================================
# measurements
# ============================================================================

def timed_rate(fn, dur, per=1, batch=32):
    """Calls fn() in batches until dur seconds pass; returns calls/s * per."""
    cnt = 0
    t0 = time.perf_counter()
    deadline = t0 + dur
    while True:
        for _ in range(batch):
            fn()
        cnt += batch
        now = time.perf_counter()
        if now >= deadline:
            return cnt * per / (now - t0)


class Bench:
    def __init__(self, a):
        self.a = a
        self.series = {}      # name -> {"unit", "vals"}
        self.errors = {}      # section -> message
        self.meta = {}
        self.children = []
        self.dog = Watchdog(self.children)

    def put(self, name, val, unit):
        self.series.setdefault(name, {"unit": unit, "vals": []})["vals"].append(val)

    # -- bare gRPC helpers ---------------------------------------------------
    def grpc_channel(self, port):
        import grpc
        from harp.security import channel_credentials
        _, cli = tls_paths(self.a.cert_dir)
        ch = grpc.secure_channel("127.0.0.1:%s" % port, channel_credentials(cli),
                                 options=GRPC_OPTS)
        grpc.channel_ready_future(ch).result(timeout=20)
        return ch

    def connect_harp(self):
        import harp
        _, cli = tls_paths(self.a.cert_dir)
        return harp.connect(self.url, tls=cli)

    def bulk_pass(self, dev, mode, data, out):
        """One timed write and read of `data` (after a write that faults the pages in)."""
        n = data.nbytes
        buf = dev.alloc(n)
        dev.write(buf, 0, data)
        dev.synchronize()
        t0 = time.perf_counter()
        dev.write(buf, 0, data)
        dev.synchronize()
        self.put(f"{mode}: bulk write", n / (time.perf_counter() - t0) / 1e9, "GB/s")
        t0 = time.perf_counter()
        dev.read(buf, 0, n, out=out)
        self.put(f"{mode}: bulk read", n / (time.perf_counter() - t0) / 1e9, "GB/s")
        return buf

    # -- 1. bulk -----------------------------------------------------------------
    def sec_bulk(self):
        import numpy as np
        a = self.a
        n = a.bulk
        nmib = n // MiB
        data = os.urandom(MiB) * nmib
        out = np.empty(n, dtype=np.uint8)
        out.fill(1)
        dev = self.connect_harp()
        ch = self.grpc_channel(self.grpc_port)
        up = ch.stream_unary("/bench.B/Up")
        down = ch.unary_stream("/bench.B/Down")
        up_copy = ch.stream_unary("/bench.B/UpCopy")
        down_copy = ch.unary_stream("/bench.B/DownCopy")
        chunk = os.urandom(MiB)
        data_mv = memoryview(data)
        out_mv = memoryview(out).cast("B")
        try:
            buf = dev.alloc(n)

            def harp_write():
                t0 = time.perf_counter()
                dev.write(buf, 0, data)
                dev.synchronize()
                return n / (time.perf_counter() - t0) / 1e9

            def harp_read():
                t0 = time.perf_counter()
                dev.read(buf, 0, n, out=out)
                return n / (time.perf_counter() - t0) / 1e9

            def grpc_up():
                t0 = time.perf_counter()
                r = up((chunk for _ in range(nmib)), timeout=120)
                dt = time.perf_counter() - t0
                assert Q.unpack(r)[0] == n
                return n / dt / 1e9

            def grpc_down():
                t0 = time.perf_counter()
                got = 0
                for m in down(Q.pack(nmib) + Q.pack(MiB), timeout=120):
                    got += len(m)
                dt = time.perf_counter() - t0
                assert got == n
                return n / dt / 1e9

            def grpc_up_copy():     # client cuts the caller's data into bytes, server copies in
                t0 = time.perf_counter()
                r = up_copy((data_mv[p:p + MiB].tobytes() for p in range(0, n, MiB)),
                            timeout=120)
                dt = time.perf_counter() - t0
                assert Q.unpack(r)[0] == n
                return n / dt / 1e9

            def grpc_down_copy():   # server copies out of memory, client into `out`
                t0 = time.perf_counter()
                pos = 0
                for m in down_copy(Q.pack(nmib) + Q.pack(MiB), timeout=120):
                    out_mv[pos:pos + len(m)] = m
                    pos += len(m)
                dt = time.perf_counter() - t0
                assert pos == n
                return n / dt / 1e9

            def raw(cmd):
                r = self.raw_client.command("%s %d" % (cmd, n), 120)
                self.meta["raw_tls_cipher"] = r["cipher"]
                return r["gbps"]

            # warm-up: fault in the server's device pages, the raw buffers, TLS sessions
            harp_write(), harp_read(), grpc_up(), grpc_down(), raw("up"), raw("down")
            grpc_up_copy(), grpc_down_copy()
            for i in range(a.reps):
                log("  bulk rep %d/%d" % (i + 1, a.reps))
                self.put("harp bulk write", harp_write(), "GB/s")
                self.put("bare gRPC client-stream 1MiB msgs", grpc_up(), "GB/s")
                self.put("raw TLS send", raw("up"), "GB/s")
                self.put("bare gRPC client-stream + HARP's 2 copies", grpc_up_copy(), "GB/s")
                self.put("harp bulk read", harp_read(), "GB/s")
                self.put("bare gRPC server-stream 1MiB msgs", grpc_down(), "GB/s")
                self.put("raw TLS recv", raw("down"), "GB/s")
                self.put("bare gRPC server-stream + HARP's 2 copies", grpc_down_copy(), "GB/s")
            dev.free(buf)
        finally:
            dev.close()
            ch.close()

    # -- 2. sync round trips -------------------------------------------------------
    def sec_sync(self):
        a = self.a
        dev = self.connect_harp()
        ch = self.grpc_channel(self.grpc_port)
        echo = ch.stream_stream("/bench.B/Echo")
        try:
            small = dev.alloc(64)
            dev.write(small, 0, MSG64)
            out = bytearray(64)

            def harp_sync():
                return timed_rate(dev.synchronize, a.dur)

            def harp_read64():
                return timed_rate(lambda: dev.read(small, 0, 64, out=out), a.dur)

            def pingpong(dur):
                q = queue.SimpleQueue()

                def reqs():
                    while True:
                        m = q.get()
                        if m is None:
                            return
                        yield m
                q.put(MSG64)
                it = echo(reqs(), timeout=dur + 60)
                cnt = 0
                t0 = now = time.perf_counter()
                deadline = t0 + dur
                for _ in it:
                    cnt += 1
                    if (cnt & 31) == 0:
                        now = time.perf_counter()
                        if now >= deadline:
                            q.put(None)
                            break
                    q.put(MSG64)
                for _ in it:
                    pass
                return cnt / (now - t0)

            timed_rate(dev.synchronize, 0.2)            # warm-up
            timed_rate(lambda: dev.read(small, 0, 64, out=out), 0.2)
            pingpong(0.2)
            for i in range(a.reps):
                log("  sync rep %d/%d" % (i + 1, a.reps))
                self.put("harp synchronize()", harp_sync(), "rt/s")
                self.put("bare gRPC bidi ping-pong 64B", pingpong(a.dur), "rt/s")
                self.put("harp read 64B", harp_read64(), "rt/s")
        finally:
            dev.close()
            ch.close()

    # -- 3./4. async launches -------------------------------------------------------
    def sec_launch(self):
        import msgpack
        import harp
        from harp import wire
        a = self.a
        dev = self.connect_harp()
        ch = self.grpc_channel(self.grpc_port)
        count = ch.stream_stream("/bench.B/Count")
        naive = ch.unary_unary("/bench.B/Naive")
        try:
            mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
            noop = dev.function(mod, "noop")
            launch, sync = dev.launch, dev.synchronize

            def harp_launches(n):
                t0 = time.perf_counter()
                for _ in range(n):
                    launch(noop, 1, 1, [])
                sync()
                return n / (time.perf_counter() - t0)

            per = wire.BATCH_CALLS
            batch = REC64 * per

            def pipelined(n):
                msgs = -(-n // per)
                t0 = time.perf_counter()
                got = None
                for r in count((batch for _ in range(msgs)), timeout=120):
                    got = Q.unpack_from(r, 0)[0]
                dt = time.perf_counter() - t0
                assert got == msgs, got
                return msgs * per / dt

            rec = msgpack.packb([wire.LAUNCH, 1, [1, 1, 1], [1, 1, 1], 0, 0, []])
            sync_rec = msgpack.packb([wire.SYNCHRONIZE])

            def naive_rate(dur):
                def one():
                    naive(rec, timeout=30)
                cnt = 0
                t0 = time.perf_counter()
                deadline = t0 + dur
                while True:
                    for _ in range(32):
                        one()
                    cnt += 32
                    if time.perf_counter() >= deadline:
                        break
                naive(sync_rec, timeout=30)
                return cnt / (time.perf_counter() - t0)

            # calibrate N so that one HARP rep takes about launch_s seconds
            harp_launches(5000)
            rate = harp_launches(20000)
            n = int(min(max(rate * a.launch_s, 20000), 3_000_000))
            n = -(-n // per) * per
            self.meta["launch_n"] = n
            self.meta["launch_record_bytes"] = len(msgpack.packb(
                [wire.LAUNCH, 100_000, noop.id, [1, 1, 1], [1, 1, 1], 0, 0, []]))
            pipelined(min(n, 50000))
            naive_rate(0.2)
            for i in range(a.reps):
                log("  launch rep %d/%d (N=%d)" % (i + 1, a.reps, n))
                self.put("harp async launches", harp_launches(n), "launch/s")
                self.put("bare gRPC pipelined 64B records, %d/msg" % per, pipelined(n),
                         "rec/s")
                self.put("naive unary gRPC call per launch", naive_rate(a.dur), "launch/s")
        finally:
            dev.close()
            ch.close()

    # -- 6. process vs thread isolation --------------------------------------------------
    def sec_isolation(self):
        """The relay's cost: the same calls against a server whose sessions run in worker
        processes and against one whose sessions run in its own process, interleaved."""
        import numpy as np
        import harp
        a = self.a
        _, cli = tls_paths(self.a.cert_dir)
        urls = {"process": self.url, "thread": self.thread_url}
        n = a.bulk
        data = np.frombuffer(os.urandom(MiB) * (n // MiB), np.uint8)
        out = np.empty(n, np.uint8)
        launches = self.meta.get("launch_n") or 200_000

        def connect_time(url):
            t0 = time.perf_counter()
            with harp.connect(url, tls=cli) as dev:
                dev.synchronize()
                return time.perf_counter() - t0

        def one_mode(mode):
            url = urls[mode]
            times = sorted(connect_time(url) for _ in range(3))
            self.put(f"{mode}: connect + first sync", 1 / times[1], "connect/s")
            with harp.connect(url, tls=cli) as dev:
                noop = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
                dev.synchronize()
                t0 = time.perf_counter()
                for _ in range(launches):
                    dev.launch(noop, 1, 1, [])
                dev.synchronize()
                self.put(f"{mode}: async launches", launches / (time.perf_counter() - t0),
                         "launch/s")
                self.put(f"{mode}: synchronize()", timed_rate(dev.synchronize, a.dur), "rt/s")
                self.bulk_pass(dev, mode, data, out)

        one_mode("process")                              # warm both servers
        one_mode("thread")
        for key in [k for k in self.series if k.startswith(("process:", "thread:"))]:
            del self.series[key]
        for i in range(a.reps):
            log("  isolation rep %d/%d" % (i + 1, a.reps))
            for mode in (("process", "thread") if i % 2 == 0 else ("thread", "process")):
                one_mode(mode)

    # -- 7. same host: shared memory -------------------------------------------------
    def sec_samehost(self):
        """A pool server on a unix socket: sessions with a shared-memory window beside
        sessions that move bulk data over the stream, and memcpy of the same bytes."""
        import numpy as np
        import harp
        a = self.a
        _, cli = tls_paths(self.a.cert_dir)
        n = a.bulk
        data = np.frombuffer(os.urandom(MiB) * (n // MiB), np.uint8)
        out = np.empty(n, np.uint8)
        small = bytearray(64)
        out[:] = data                                   # fault the pages in

        def memcpy():
            t0 = time.perf_counter()
            np.copyto(out, data)
            self.put("memcpy (numpy copyto)", n / (time.perf_counter() - t0) / 1e9, "GB/s")

        def one_mode(mode):
            dev = harp.connect(self.unix_url, tls=cli, shared_memory=(mode == "shm"))
            try:
                assert dev.shared_memory == (mode == "shm"), "shared memory not as asked"
                buf = self.bulk_pass(dev, mode, data, out)
                self.put(f"{mode}: synchronize()", timed_rate(dev.synchronize, a.dur), "rt/s")
                self.put(f"{mode}: read 64B", timed_rate(
                    lambda: dev.read(buf, 0, 64, out=small), a.dur), "rt/s")
            finally:
                dev.close()

        one_mode("shm")                                  # warm-up
        one_mode("unix")
        for key in [k for k in self.series if k.startswith(("shm:", "unix:"))]:
            del self.series[key]
        for i in range(a.reps):
            log("  same-host rep %d/%d" % (i + 1, a.reps))
            memcpy()
            for mode in (("shm", "unix") if i % 2 == 0 else ("unix", "shm")):
                one_mode(mode)

    # -- 5. local path ---------------------------------------------------------------
    def sec_local(self):
        import harp
        from harp.backends.cpu import CpuBackend
        a = self.a
        data = os.urandom(MiB)
        saved_affinity = os.sched_getaffinity(0)

        # Both sides run the same code (connect returns the backend's own device),
        # so only noise separates them, and two kinds of it are systematic here:
        # - placement: a device whose stream thread shares the caller's core runs
        #   ~2x faster than one whose thread sits on the other core, and the
        #   scheduler keeps each thread where it is for seconds. So the caller and
        #   both devices' stream threads are pinned to one core (same for both).
        # - GC phase: the two are timed in short blocks interleaved in one window;
        #   with a fixed block order, collections (triggered every N allocations)
        #   fall on one side more than the other (~2% bias measured). So the
        #   order is shuffled per round and the heap that exists before the window
        #   is gc.freeze()d (full collections then cost what the devices' own
        #   garbage costs, as in a long-running program).
        # Each rep also opens a fresh pair of devices, in alternating order.
        def launch_block(side, n):
            dev, fn, _ = side
            launch = dev.launch
            for _ in range(n):
                launch(fn, 1, 1, [])
            dev.synchronize()
            return n

        def write_block(side, n):
            dev, _, buf = side
            for _ in range(n):
                dev.write(buf, 0, data)
                dev.synchronize()
            return n

        def interleaved(sides, block, n, dur, seed=0):
            """(rate of connect, rate of backend) over one window of ~dur seconds."""
            import random
            spent = {"connect": 0.0, "backend": 0.0}
            done = {"connect": 0, "backend": 0}
            order = ["connect", "backend"] * 2
            rnd = random.Random(seed)
            gc.collect()
            gc.freeze()
            try:
                end = time.perf_counter() + dur
                while time.perf_counter() < end:
                    rnd.shuffle(order)
                    for key in order:
                        t0 = time.perf_counter()
                        done[key] += block(sides[key], n)
                        spent[key] += time.perf_counter() - t0
            finally:
                gc.unfreeze()
            return done["connect"] / spent["connect"], done["backend"] / spent["backend"]

        def open_pair(i):
            opener = {"connect": lambda: harp.connect("local:cpu", memory="1GiB"),
                      "backend": lambda: CpuBackend(memory="1GiB").open(0)}
            sides = {}
            for key in (("connect", "backend") if i % 2 == 0 else ("backend", "connect")):
                dev = opener[key]()
                mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
                sides[key] = (dev, dev.function(mod, "noop"), dev.alloc(MiB))
            interleaved(sides, launch_block, 200, 0.05)   # starts both stream threads
            interleaved(sides, write_block, 4, 0.05)
            if len(saved_affinity) > 1:
                core = min(saved_affinity)
                os.sched_setaffinity(0, {core})
                for t in threading.enumerate():
                    if t.name.startswith("harp-cpu"):
                        os.sched_setaffinity(t.native_id, {core})
                self.meta["local_placement"] = ("caller and stream threads pinned to core %d"
                                                % core)
            return sides

        self.meta["local_blocks"] = ("noop: 1000 launches + synchronize; write: 8 x "
                                     "(1 MiB write + synchronize)")
        for i in range(a.reps + 1):          # pass 0 is a warm-up
            if i:
                log("  local rep %d/%d" % (i, a.reps))
            sides = open_pair(i)
            try:
                dur = 4 * a.local_s if i else 0.3
                c, b = interleaved(sides, launch_block, 1000, dur, seed=2 * i)
                if i:
                    self.put("local connect noop launches", c, "launch/s")
                    self.put("local backend noop launches", b, "launch/s")
                c, b = interleaved(sides, write_block, 8, dur, seed=2 * i + 1)
                if i:
                    self.put("local connect 1MiB write+sync", c, "op/s")
                    self.put("local backend 1MiB write+sync", b, "op/s")
            finally:
                os.sched_setaffinity(0, saved_affinity)
                for dev, _, _ in sides.values():
                    dev.close()

    # -- orchestration ---------------------------------------------------------------
    def run(self):
        a = self.a
        from harp.security import ephemeral_pool
        from pathlib import Path
        ephemeral_pool(Path(a.cert_dir))
        sections = [s for s in ("bulk", "sync", "launch", "isolation", "samehost", "local")
                    if s in a.sections]
        remote = any(s in sections for s in ("bulk", "sync", "launch", "isolation",
                                             "samehost"))
        try:
            if remote:
                self.dog.arm(120, "server start-up")
                log("starting servers ...")
                suite = grpc_cipher_probe(a.cert_dir)
                self.meta["grpc_tls_cipher"] = suite or "probe failed"
                self.meta["raw_tls_forced_suite"] = suite or "TLS_AES_128_GCM_SHA256"
                raw_env = dict(os.environ, OPENSSL_CONF=suite_conf(
                    a.cert_dir, suite or "TLS_AES_128_GCM_SHA256"))
                self.harp_server, self.url = start_harp_server(a.cert_dir, self.children)
                if "isolation" in sections:
                    _, self.thread_url = start_harp_server(
                        a.cert_dir, self.children, extra=["--isolation", "thread"])
                if "samehost" in sections:
                    sock = os.path.join(tempfile.mkdtemp(prefix="harp-b-"), "pool.sock")
                    _, self.unix_url = start_harp_server(a.cert_dir, self.children,
                                                         listen="unix:" + sock)
                _, ready = start_role("grpc-server", a, self.children)
                self.grpc_port = ready[0]
                if "bulk" in sections:
                    _, ready = start_role("raw-server", a, self.children, env=raw_env)
                    self.raw_client, _ = start_role("raw-client", a, self.children,
                                                    ["--port", ready[0]], env=raw_env, stdin=True)
                self.meta["harp_url"] = self.url
            budgets = {"bulk": 60 + 16 * a.reps * a.bulk / (256 * MiB),
                       "sync": 40 + 6 * a.reps * a.dur,
                       "launch": 60 + 10 * a.reps * max(a.launch_s, a.dur),
                       "isolation": 90 + 2 * a.reps * (30 * a.bulk / (256 * MiB) + 4 * a.dur
                                                         + 2 * a.launch_s),
                       "samehost": 60 + 2 * a.reps * (10 * a.bulk / (256 * MiB) + 2 * a.dur),
                       "local": 40 + 20 * a.reps * a.local_s}
            for s in sections:
                log("[%s] ..." % s)
                t0 = time.time()
                self.dog.arm(budgets[s], "section " + s)
                try:
                    getattr(self, "sec_" + s)()
                except Exception as exc:
                    import traceback
                    traceback.print_exc()
                    self.errors[s] = "%s: %s" % (type(exc).__name__, exc)
                    if self.dog.fired:
                        break
                finally:
                    self.dog.disarm()
                self.meta["section_s_" + s] = round(time.time() - t0, 1)
        finally:
            self.dog.disarm()
            for c in reversed(self.children):
                try:
                    c.stop()
                except Exception as exc:
                    log("stopping %s: %s" % (c.name, exc))


# ============================================================================
# report
# ============================================================================

def summarize(vals):
    med = statistics.median(vals)
    spread = (max(vals) - min(vals)) / med * 100 if med else 0.0
    return med, spread


def fmt(v, unit):
    if unit == "GB/s":
        return "%.3f GB/s" % v
    if v >= 1e6:
        return "%.2fM %s" % (v / 1e6, unit)
    if v >= 1e4:
        return "%.1fk %s" % (v / 1e3, unit)
    return "%.0f %s" % (v, unit)


def row_specs(per):
    """(measurement, harp series, limit series or number, limit name, min ratio or None)."""
    return [
        ("bulk write", "harp bulk write", "bare gRPC client-stream 1MiB msgs",
         "bare gRPC client-stream, 1 MiB msgs", 0.9),
        ("bulk write", "harp bulk write", "raw TLS send", "raw TLS 1.3 socket send", 0.75),
        ("bulk write", "harp bulk write", "bare gRPC client-stream + HARP's 2 copies",
         "bare gRPC client-stream + 2 copies", None),
        ("bulk read", "harp bulk read", "bare gRPC server-stream 1MiB msgs",
         "bare gRPC server-stream, 1 MiB msgs", 0.9),
        ("bulk read", "harp bulk read", "raw TLS recv", "raw TLS 1.3 socket recv", 0.75),
        ("bulk read", "harp bulk read", "bare gRPC server-stream + HARP's 2 copies",
         "bare gRPC server-stream + 2 copies", None),
        ("sync round trip: synchronize()", "harp synchronize()", "bare gRPC bidi ping-pong 64B",
         "bare gRPC bidi ping-pong 64B", 0.9),
        ("sync round trip: read 64B", "harp read 64B", "bare gRPC bidi ping-pong 64B",
         "bare gRPC bidi ping-pong 64B", None),
        ("async launches (noop)", "harp async launches", LAUNCH_TARGET, "issue target 100k/s", 1.0),
        ("async launches (noop)", "harp async launches", "naive unary gRPC call per launch",
         "naive: 1 unary RPC per launch", 10.0),
        ("async launches (noop)", "harp async launches",
         "bare gRPC pipelined 64B records, %d/msg" % per,
         "bare gRPC pipelined 64B recs, %d/msg" % per, None),
        ("isolation: async launches", "process: async launches", "thread: async launches",
         "thread isolation, same run", 0.9),
        ("isolation: synchronize()", "process: synchronize()", "thread: synchronize()",
         "thread isolation, same run", 0.9),
        ("isolation: bulk write", "process: bulk write", "thread: bulk write",
         "thread isolation, same run", 0.9),
        ("isolation: bulk read", "process: bulk read", "thread: bulk read",
         "thread isolation, same run", 0.9),
        ("isolation: connect + first sync (1/s)", "process: connect + first sync",
         "thread: connect + first sync", "thread isolation, same run", 1 / 1.5),
        ("same host: bulk write", "shm: bulk write", "memcpy (numpy copyto)",
         "memcpy of the same bytes", 0.45),
        ("same host: bulk read", "shm: bulk read", "memcpy (numpy copyto)",
         "memcpy of the same bytes", 0.45),
        ("same host: bulk write", "shm: bulk write", "unix: bulk write",
         "same unix socket, no shared memory", None),
        ("same host: bulk read", "shm: bulk read", "unix: bulk read",
         "same unix socket, no shared memory", None),
        ("same host: synchronize()", "shm: synchronize()", "unix: synchronize()",
         "same unix socket, no shared memory", 0.9),
        ("same host: read 64B", "shm: read 64B", "unix: read 64B",
         "same unix socket, no shared memory", 0.9),
        ("local: noop launches", "local connect noop launches", "local backend noop launches",
         "CpuBackend().open(0) direct", 0.97),
        ("local: 1MiB write+sync", "local connect 1MiB write+sync",
         "local backend 1MiB write+sync", "CpuBackend().open(0) direct", 0.97),
    ]


def build_rows(R):
    from harp import wire
    series = R["series"]
    rows = []
    for meas, hk, lk, lname, target in row_specs(wire.BATCH_CALLS):
        if meas.startswith("bulk"):
            meas = "%s %dMiB" % (meas, R["meta"]["bulk_bytes"] // MiB)
        h = series.get(hk)
        lim = series.get(lk) if isinstance(lk, str) else {"vals": [lk], "unit": h and h["unit"]}
        row = {"measurement": meas, "harp_series": hk, "limit_series": lk, "limit_name": lname,
               "target_min_ratio": target}
        if not h or not lim:
            row["status"] = "not run"
            rows.append(row)
            continue
        hm, hs = summarize(h["vals"])
        lm, ls = summarize(lim["vals"])
        ratio = hm / lm if lm else float("nan")
        row.update(unit=h["unit"], limit_unit=lim["unit"], harp_median=hm, harp_spread_pct=hs,
                   limit_median=lm, limit_spread_pct=ls, ratio=ratio)
        if isinstance(lk, str) and len(h["vals"]) == len(lim["vals"]):
            pr = [x / y for x, y in zip(h["vals"], lim["vals"]) if y]
            row["paired_ratios"] = pr
            row["paired_ratio_median"] = statistics.median(pr)
        row["status"] = "info" if target is None else ("met" if ratio >= target else "NOT met")
        rows.append(row)
    return rows


def target_text(meas, target):
    if target is None:
        return "(info)"
    if target == 0.97:
        return "within 3%"
    if target == 1.0:
        return ">= 100k/s"
    if meas.startswith("isolation: connect"):
        return "time <= 1.5x"
    if meas.startswith("isolation") or (meas.startswith("same host") and target == 0.9):
        return "within 10%"
    return ">= %gx" % target


def print_report(R):
    meta = R["meta"]
    print("HARP benchmark -- cpu backend over loopback, mutual TLS; medians of %d reps"
          % meta["reps"])
    print("machine: %s | %s cores (affinity %s) | python %s | grpcio %s | numpy %s | msgpack %s"
          % (meta["cpu_model"], meta["cpus"], meta["affinity"], meta["python"], meta["grpc"],
             meta["numpy"], meta["msgpack"]))
    print("kernel %s | loadavg start %s end %s | harp %s @ %s%s | %s"
          % (meta["kernel"], meta["loadavg_start"], meta.get("loadavg_end"), meta["harp"],
             meta.get("git_head", "?"),
             " (+ uncommitted changes in %s)" % ", ".join(meta["git_modified"])
             if meta.get("git_modified") else "", meta["date"]))
    print("TLS: gRPC suite %s; raw TLS suite %s | bulk %d MiB | launch N=%s"
          % (meta.get("grpc_tls_cipher"), meta.get("raw_tls_cipher"),
             meta["bulk_bytes"] // MiB, meta.get("launch_n")))
    print()
    print("all series (median, spread=(max-min)/median, per-rep values):")
    w = max([len(k) for k in R["series"]] + [10]) + 2
    for name, s in R["series"].items():
        med, sp = summarize(s["vals"])
        vals = ", ".join(("%.3f" if s["unit"] == "GB/s" else "%.0f") % v for v in s["vals"])
        print("  %-*s %16s  spread %5.1f%%  [%s]" % (w, name, fmt(med, s["unit"]), sp, vals))
    print()
    hdr = ("measurement", "HARP", "limit", "limit name", "ratio", "target", "", "paired ratios")
    lines = []

    def rx(v):
        return "%.3fx" % v if v < 10 else "%.1fx" % v
    for r in R["rows"]:
        if r["status"] == "not run":
            lines.append((r["measurement"], "-", "-", r["limit_name"], "-",
                          target_text(r["measurement"], r["target_min_ratio"]), "not run", ""))
            continue
        unit = r["unit"]
        pr = r.get("paired_ratios")
        paired = "%s [%s..%s]" % (rx(r["paired_ratio_median"]), rx(min(pr)), rx(max(pr))) \
            if pr else ""
        lines.append((r["measurement"],
                      "%s ±%.0f%%" % (fmt(r["harp_median"], unit), r["harp_spread_pct"] / 2),
                      "%s ±%.0f%%" % (fmt(r["limit_median"], r["limit_unit"]),
                                      r["limit_spread_pct"] / 2)
                      if isinstance(r["limit_series"], str) else fmt(r["limit_median"], unit),
                      r["limit_name"], rx(r["ratio"]),
                      target_text(r["measurement"], r["target_min_ratio"]), r["status"], paired))
    widths = [max(len(str(x[i])) for x in lines + [hdr]) for i in range(len(hdr))]
    fmtl = " | ".join("%%-%ds" % wd for wd in widths)
    print(fmtl % hdr)
    print("-+-".join("-" * wd for wd in widths))
    for ln in lines:
        print(fmtl % ln)
    print()
    print("HARP/limit columns: median ± half the spread (spread = (max-min)/median).")
    print("ratio = median(HARP) / median(limit), judged against the target; paired ratios = "
          "median [min..max] of HARP/limit within each rep (measured back to back).")
    if R["errors"]:
        print("ERRORS: %s" % json.dumps(R["errors"]))
    print("run took %.0f s" % meta["elapsed_s"])


def machine_meta(a):
    import grpc
    import msgpack
    import numpy
    import harp
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    meta = {"cpu_model": cpu, "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "placement": {k: sorted(v) for k, v in PLACEMENT.items()} if PLACEMENT["server"]
            else "free",
            "python": platform.python_version(), "grpc": grpc.__version__,
            "numpy": numpy.__version__, "msgpack": ".".join(map(str, msgpack.version)),
            "harp": harp.__version__, "kernel": platform.release(),
            "loadavg_start": " ".join("%.2f" % x for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "reps": a.reps, "bulk_bytes": a.bulk, "dur_s": a.dur, "launch_s": a.launch_s,
            "local_s": a.local_s, "quick": a.quick}
    try:
        meta["git_head"] = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.dirname(HERE)), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.dirname(HERE)), "status", "--porcelain",
             "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.split("\n")
        meta["git_modified"] = [ln[3:] for ln in dirty if ln.strip()]
    except Exception:
        pass
    return meta


# ============================================================================
# profiling (--profile DIR)
# ============================================================================

def pyspy_exe():
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else None


def pyspy_prefix(out, rate=100):
    """Run a command under py-spy (all threads, native frames; --native needs blocking mode)."""
    exe = pyspy_exe()
    if not exe:
        return []
    return [exe, "record", "--format", "raw", "--threads", "--native",
            "--rate", str(rate), "--output", out, "--"]


def role_profile_client(a):
    """Client side of a profile run: the workload a.what, optionally under cProfile
    (main thread only; py-spy around the process sees every thread)."""
    import cProfile
    import numpy as np
    import harp
    _, cli = tls_paths(a.cert_dir)
    dev = harp.connect(a.url, tls=cli)
    prof = cProfile.Profile() if a.out else None
    if a.what == "launch":
        mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
        noop = dev.function(mod, "noop")
        for _ in range(5000):
            dev.launch(noop, 1, 1, [])
        dev.synchronize()

        def work():
            for _ in range(a.n):
                dev.launch(noop, 1, 1, [])
            dev.synchronize()
            return a.n, "launch/s"
    elif a.what == "write":
        n = a.bulk
        data = os.urandom(MiB) * (n // MiB)
        buf = dev.alloc(n)
        dev.write(buf, 0, data)
        dev.synchronize()

        def work():
            for _ in range(8):
                dev.write(buf, 0, data)
                dev.synchronize()
            return 8 * n / 1e9, "GB/s"
    else:  # sync
        dev.synchronize()

        def work():
            for _ in range(a.n):
                dev.synchronize()
            return a.n, "rt/s"
    if prof:
        prof.enable()
    t0 = time.perf_counter()
    amount, unit = work()
    dt = time.perf_counter() - t0
    if prof:
        prof.disable()
        prof.dump_stats(a.out)
    dev.close()
    emit({"rate": amount / dt, "unit": unit, "seconds": dt})


def collapse_top(path, top=25):
    """Sample shares per thread and per function from a py-spy raw (collapsed) file.

    'leaf' counts the innermost frame (a native frame when py-spy resolved one);
    'python self' charges each sample to its innermost *Python* frame, which is
    what to optimise in Python code (time in C called from there included).
    """
    import collections
    leaf, pyself, incl, threads = (collections.Counter() for _ in range(4))
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, cnt = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                cnt = int(cnt)
                total += cnt
                raw = stack.split(";")
                frames = [_func_key(fr) for fr in raw]
                threads[frames[0]] += cnt
                leaf[frames[-1]] += cnt
                py = [f for f, r in zip(frames[1:], raw[1:]) if ".py:" in r or ".py)" in r]
                pyself[py[-1] if py else "(no Python frame: %s)" % frames[-1]] += cnt
                for fr in set(py):
                    incl[fr] += cnt
    except OSError:
        return "(no py-spy output at %s)\n" % path
    pct = lambda v: 100.0 * v / max(total, 1)  # noqa: E731
    out = ["%s: %d samples of running threads (idle threads are not sampled)"
           % (os.path.basename(path), total), "  by thread:"]
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in threads.most_common(8)]
    out.append("  python self (innermost Python frame):")
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in pyself.most_common(top)]
    out.append("  leaf frame (native where resolved):")
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in leaf.most_common(12)]
    out.append("  python inclusive:")
    out += ["    %5.1f%%  %s" % (pct(v), k) for k, v in incl.most_common(top)]
    return "\n".join(out) + "\n"


def _func_key(frame):
    """'fn (path/file.py:12)' -> 'fn (dir/file.py)'; native frames keep their library."""
    name, _, where = frame.partition(" (")
    where = where[:-1] if where.endswith(")") else where
    if ":" in where:
        where = where.rsplit(":", 1)[0]
    where = "/".join(where.split("/")[-2:])
    if name.startswith("0x"):
        name = "?"
    return "%s (%s)" % (name, where) if where else name


def _profile_pass(a, what, server_spy, client_spy, cprof):
    """One server + one client run of workload `what`; returns the client's result."""
    children = []
    try:
        _, url = start_harp_server(a.cert_dir, children,
                                   prefix=pyspy_prefix(server_spy) if server_spy else ())
        argv = (pyspy_prefix(client_spy) if client_spy else []) + [
            sys.executable, HERE, "--role", "profile-client", "--cert-dir", a.cert_dir,
            "--url", url, "--what", what, "--bulk", str(a.bulk), "--n",
            str(a.profile_n if what == "launch" else max(a.profile_n // 100, 2000))]
        if cprof:
            argv += ["--out", cprof]
        c = Child("profile client", argv)
        children.append(c)
        line = c.wait_line(lambda ln: ln.startswith("RESULT "), 300)
        c.proc.wait(60)
        return json.loads(line[7:])
    finally:
        for ch in reversed(children):
            ch.stop(60)


def run_profile(a):
    """Profile the launch, bulk-write and sync paths: for each, one pass with py-spy
    on both processes (rates barely perturbed), one with cProfile on the client."""
    import io
    import pstats
    from pathlib import Path
    from harp.security import ephemeral_pool
    os.makedirs(a.profile, exist_ok=True)
    ephemeral_pool(Path(a.cert_dir))
    if not pyspy_exe():
        log("py-spy not found next to %s (pip install py-spy): only cProfile runs" % sys.executable)
    report = []
    for what in ("launch", "write", "sync"):
        log("[profile %s] ..." % what)
        srv_out = os.path.join(a.profile, "server-%s.pyspy.txt" % what)
        cli_out = os.path.join(a.profile, "client-%s.pyspy.txt" % what)
        cprof = os.path.join(a.profile, "client-%s.cprofile" % what)
        spy = pyspy_exe() is not None
        r1 = _profile_pass(a, what, srv_out if spy else None, cli_out if spy else None, None) \
            if spy else None
        r2 = _profile_pass(a, what, None, None, cprof)
        report.append("=" * 100)
        report.append("%s path | under py-spy: %s | client under cProfile: %s"
                      % (what, json.dumps(r1), json.dumps(r2)))
        for key, title in (("tottime", "tottime"), ("cumulative", "cumulative")):
            s = io.StringIO()
            pstats.Stats(cprof, stream=s).sort_stats(key).print_stats(18)
            report.append("-- client cProfile (main thread), by %s --" % title)
            report.append("\n".join(ln for ln in s.getvalue().splitlines()[6:] if ln.strip()))
        if spy:
            report.append("-- client py-spy (all threads) --")
            report.append(collapse_top(cli_out, 20))
            report.append("-- server py-spy (all threads) --")
            report.append(collapse_top(srv_out, 25))
    text = "\n".join(report)
    with open(os.path.join(a.profile, "profile-summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


# ============================================================================
# main
# ============================================================================

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 reps (< 1 min)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; quick 3)")
    ap.add_argument("--json", help="write raw per-rep values, medians and meta here")
    ap.add_argument("--placement", choices=["split", "free"], default="split",
                    help="split (default on 2+ cores): servers on core 0, clients on core 1, "
                         "for HARP and every limit alike, so runs compare; free: unpinned")
    ap.add_argument("--sections", default="bulk,sync,launch,isolation,samehost,local",
                    help="comma list of: bulk, sync, launch, isolation, samehost, local")
    ap.add_argument("--bulk-mib", type=int, default=None, help="bulk size (default 256; quick 64)")
    ap.add_argument("--dur", type=float, default=None,
                    help="seconds per rate measurement (default 1.0; quick 0.3)")
    ap.add_argument("--launch-s", type=float, default=None,
                    help="target seconds per HARP launch rep (default 1.5; quick 0.5)")
    ap.add_argument("--local-s", type=float, default=None,
                    help="seconds per local-path sample (default 0.25; quick 0.1)")
    ap.add_argument("--profile", metavar="DIR",
                    help="instead of the benchmark, profile the launch and bulk-write paths "
                         "(client cProfile + py-spy on client and `harp server serve`)")
    ap.add_argument("--profile-n", type=int, default=300_000, help=argparse.SUPPRESS)
    # child roles
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--cert-dir", help=argparse.SUPPRESS)
    ap.add_argument("--bulk", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--what", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.role:
        roles = {"grpc-server": role_grpc_server, "raw-server": role_raw_server,
                 "raw-client": role_raw_client, "profile-client": role_profile_client}
        roles[a.role](a)
        return 0

    cpus = sorted(os.sched_getaffinity(0))
    if a.placement == "split" and len(cpus) >= 2:
        PLACEMENT["server"], PLACEMENT["client"] = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, PLACEMENT["client"])
    q = a.quick
    a.reps = a.reps or (3 if q else 5)
    a.bulk = (a.bulk_mib or (64 if q else 256)) * MiB
    a.dur = a.dur or (0.3 if q else 1.0)
    a.launch_s = a.launch_s or (0.5 if q else 1.5)
    a.local_s = a.local_s or (0.1 if q else 0.25)
    a.sections = set(a.sections.split(","))

    # A trace recorder around the devices would be measured too: keep it off.
    for var in ("HARP_TRACE", "HARP_TRACE_PAYLOADS"):
        os.environ.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="harp-bench-") as tmp:
        a.cert_dir = os.path.join(tmp, "certs")
        if a.profile:
            run_profile(a)
            return 0
        t0 = time.time()
        meta = machine_meta(a)
        b = Bench(a)
        b.meta = meta

        def on_term(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        try:
            b.run()
        except KeyboardInterrupt:
            b.errors["interrupted"] = "interrupted"
        meta["loadavg_end"] = " ".join("%.2f" % x for x in os.getloadavg())
        meta["elapsed_s"] = round(time.time() - t0, 1)
        R = {"meta": meta, "series": b.series, "errors": b.errors}
        R["rows"] = build_rows(R)
        for name, s in b.series.items():
            s["median"], s["spread_pct"] = summarize(s["vals"])
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(R, f, indent=1)
        print_report(R)
        return 1 if b.errors else 0


if __name__ == "__main__":
    sys.exit(main())
