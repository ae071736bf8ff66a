"""HARP over loopback beside bare gRPC and raw TLS: bulk, sync round trips, async launches."""
from __future__ import annotations

import os
import queue
import time

from harness import MSG64, MiB, Q, REC64, log, timed_rate

#: The bulk section's reps per `--reps`.
BULK_REPS_PER_REP = 3


class RemoteSections:
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
        stream_dev = self.connect_harp(data_channel=False)    # the same, on the stream only
        assert dev.data_channel and not stream_dev.data_channel, "data channel not as asked"
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
            stream_buf = stream_dev.alloc(n)

            def harp_write(dev=dev, buf=buf):
                t0 = time.perf_counter()
                dev.write(buf, 0, data)
                dev.synchronize()
                return n / (time.perf_counter() - t0) / 1e9

            def harp_read(dev=dev, buf=buf):
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
            harp_write(stream_dev, stream_buf), harp_read(stream_dev, stream_buf)
            grpc_up_copy(), grpc_down_copy()
            series = [
                ("harp bulk write", harp_write),
                ("bare gRPC client-stream 1MiB msgs", grpc_up),
                ("raw TLS send", lambda: raw("up")),
                ("bare gRPC client-stream + HARP's 2 copies", grpc_up_copy),
                ("harp bulk read", harp_read),
                ("bare gRPC server-stream 1MiB msgs", grpc_down),
                ("raw TLS recv", lambda: raw("down")),
                ("bare gRPC server-stream + HARP's 2 copies", grpc_down_copy),
                ("harp bulk write, stream only", lambda: harp_write(stream_dev, stream_buf)),
                ("harp bulk read, stream only", lambda: harp_read(stream_dev, stream_buf)),
            ]
            # A transfer takes a fraction of a second and this machine's speed swings by
            # tens of percent between two: BULK_REPS_PER_REP times the reps, and every
            # other rep in reverse order, so that no series always runs first or last.
            reps = BULK_REPS_PER_REP * a.reps
            for i in range(reps):
                log("  bulk rep %d/%d" % (i + 1, reps))
                for name, fn in (series if i % 2 == 0 else series[::-1]):
                    self.put(name, fn(), "GB/s")
            dev.free(buf)
        finally:
            dev.close()
            stream_dev.close()
            ch.close()

    # -- 2. sync round trips -------------------------------------------------------
    def sec_sync(self):
        a = self.a
        dev = self.connect_harp()
        on_stream = self.connect_harp(frames_on_data=False)   # the same, frames on gRPC
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
                self.put("harp synchronize(), frames on the stream",
                         timed_rate(on_stream.synchronize, a.dur), "rt/s")
        finally:
            dev.close()
            on_stream.close()
            ch.close()

    # -- 3./4. async launches -------------------------------------------------------
    def sec_launch(self):
        import collections
        import msgpack
        import numpy as np
        import harp
        from harp import wire
        a = self.a
        dev = self.connect_harp()
        on_stream = self.connect_harp(frames_on_data=False)   # the same, frames on gRPC
        ch = self.grpc_channel(self.grpc_port)
        count = ch.stream_stream("/bench.B/Count")
        naive = ch.unary_unary("/bench.B/Naive")
        try:
            mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
            noop = dev.function(mod, "noop")
            launch, sync = dev.launch, dev.synchronize

            def harp_launches(n, launch=launch, sync=sync, noop=noop):
                t0 = time.perf_counter()
                for _ in range(n):
                    launch(noop, 1, 1, [])
                sync()
                return n / (time.perf_counter() - t0)

            stream_noop = on_stream.function(on_stream.load_module(harp.CATALOG_IMAGE,
                                                                   "catalog"), "noop")

            def harp_launches_on_stream(n):
                return harp_launches(n, on_stream.launch, on_stream.synchronize, stream_noop)

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

            axpy = dev.function(mod, "axpy_f32")
            y = dev.alloc(4096)
            four = [y, y, np.float32(2.0), np.int64(0)]     # y, x, alpha, n=0: no work

            def harp_launches_4(n):
                t0 = time.perf_counter()
                for _ in range(n):
                    launch(axpy, 1, 1, four)
                sync()
                return n / (time.perf_counter() - t0)

            def lean_loop(n, args):
                """The floor of a record path in Python: the same records, packed 512 to
                a batch; unpack, dispatch by op through a dict, queue for a worker."""
                recs = [[wire.LAUNCH, i + 1, 1, [1, 1, 1], [1, 1, 1], 0, 0, args]
                        for i in range(per)]
                frames = [msgpack.packb(recs)] * (-(-n // per))
                queued = collections.deque(maxlen=1024)
                table = {wire.LAUNCH: lambda r: queued.append((r[2], r[7]))}
                t0 = time.perf_counter()
                for frame in frames:
                    for r in msgpack.unpackb(frame):
                        table[r[0]](r)
                return len(frames) * per / (time.perf_counter() - t0)

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
                self.put("harp async launches, frames on the stream",
                         harp_launches_on_stream(n), "launch/s")
                self.put("bare gRPC pipelined 64B records, %d/msg" % per, pipelined(n),
                         "rec/s")
                self.put("naive unary gRPC call per launch", naive_rate(a.dur), "launch/s")
                r0, r4 = self.series["harp async launches"]["vals"][-1], harp_launches_4(n // 2)
                self.put("harp async launches, 4 args", r4, "launch/s")
                self.put("harp launch: cost per argument", (1 / r4 - 1 / r0) / 4 * 1e6, "us")
                l0 = lean_loop(n, [])
                l4 = lean_loop(n, [[0, 3, 0], [0, 3, 0], [1, 2.0, "float32"], [1, 0, "int64"]])
                self.put("lean msgpack loop, 0 args", l0, "rec/s")
                self.put("lean msgpack loop, 4 args", l4, "rec/s")
                self.put("lean msgpack loop: cost per argument", (1 / l4 - 1 / l0) / 4 * 1e6,
                         "us")
        finally:
            dev.close()
            on_stream.close()
            ch.close()
