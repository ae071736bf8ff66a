"""The limits HARP is measured against, as child roles of bench.py.

- `grpc-server`: a bare gRPC server (generic handlers on raw bytes, no protobuf)
  with the same mutual TLS, for bulk streams, ping-pong and pipelined records;
  it also serves the "naive" design (one unary call per device call);
- `raw-server` / `raw-client`: a raw TLS 1.3 socket (Python `ssl`, the cipher
  suite gRPC negotiates), fed from and received into memoryviews.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from harness import GRPC_OPTS, MiB, Q, emit, log, ssl_client_ctx, ssl_server_ctx, tls_paths

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

    server = grpc.server(ThreadPoolExecutor(max_workers=80), options=GRPC_OPTS)
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
