"""Many sessions: aggregate launch throughput and fairness over 1, 2, 4, ... 64 sessions.

For each count k, k sessions on the default pool server (a worker process
each) launch noop kernels flat out from k client threads for one window
(longer for more sessions), with a synchronize every 128 launches; the aggregate is all their launches over the
window, the fairness the fewest one session got over the most. Beside it, in
the same rep, k bare gRPC streams carry batches of 64-byte records for the
same window (the transport's own curve). The pool server's memory is read
before the first count and after the last session of the rep has closed.
"""
from __future__ import annotations

import threading
import time

from harness import REC64, log, tls_paths

COUNTS = (1, 2, 4, 8, 16, 32, 64)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class SessionsSection:
    def sec_sessions(self):
        import harp
        from harp import wire
        a = self.a
        _, cli = tls_paths(self.a.cert_dir)
        per = wire.BATCH_CALLS
        unit = 128                 # launches between a session's synchronize() calls
        server_pid = self.harp_server.proc.pid
        ch = self.grpc_channel(self.grpc_port)
        count_rpc = ch.stream_stream("/bench.B/Count")
        batch = REC64 * per

        def window(k):
            # long enough that every one of k sessions gets tens of units: fairness is then
            # not a matter of counting in whole units
            return max(a.dur, 0.5, 0.04 * k)

        def harp_point(k):
            devs = [harp.connect(self.url, tls=cli) for _ in range(k)]
            try:
                fns = []
                for dev in devs:
                    fns.append(dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"),
                                            "noop"))
                    dev.synchronize()
                counts = [0] * k
                start = threading.Barrier(k + 1)
                stop = [0.0]

                def run(i):
                    dev, fn = devs[i], fns[i]
                    launch = dev.launch
                    start.wait()
                    n = 0
                    while time.perf_counter() < stop[0]:
                        for _ in range(unit):
                            launch(fn, 1, 1, [])
                        dev.synchronize()
                        n += unit
                    counts[i] = n
                threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
                for t in threads:
                    t.start()
                stop[0] = time.perf_counter() + window(k)
                t0 = time.perf_counter()
                start.wait()
                for t in threads:
                    t.join()
                dt = time.perf_counter() - t0
                return sum(counts) / dt, min(counts) / max(counts) if max(counts) else 0.0
            finally:
                for dev in devs:
                    dev.close()

        def grpc_point(k):
            totals = [0] * k
            stop = time.perf_counter() + window(k)

            def run(i):
                sent = [0]

                def gen():
                    while time.perf_counter() < stop:
                        sent[0] += 1
                        yield batch
                for _ in count_rpc(gen(), timeout=60):
                    pass
                totals[i] = sent[0] * per
            t0 = time.perf_counter()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(totals) / (time.perf_counter() - t0)

        try:
            harp_point(2)                                 # warm the server and its pool
            idle = _rss_bytes(server_pid)
            for i in range(a.reps):
                log("  sessions rep %d/%d" % (i + 1, a.reps))
                curve = {}
                for k in COUNTS:
                    rate, fair = harp_point(k)
                    curve[k] = rate
                    self.put(f"sessions: {k} x harp launches", rate, "launch/s")
                    self.put(f"sessions: {k} x bare gRPC records", grpc_point(k), "rec/s")
                    if k == COUNTS[-1]:
                        self.put("sessions: fairness min/max at 64", fair, "ratio")
                self.put("sessions: aggregate at 64 / peak", curve[COUNTS[-1]] /
                         max(curve.values()), "ratio")
                time.sleep(1.0)                           # workers exit, memory is trimmed
                self.put("sessions: server RSS after / idle", _rss_bytes(server_pid) / idle,
                         "ratio")
        finally:
            ch.close()
