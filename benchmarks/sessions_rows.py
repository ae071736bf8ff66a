"""Many sessions: aggregate launch throughput and fairness over 1, 2, 4, ... 64 sessions.

For each count k, k sessions on the default pool server (a worker process
each) launch noop kernels flat out for one window (longer for more sessions),
with a synchronize every 128 launches, each from a client process of its own
(`--role sessions-client`: so that no client's GIL decides who gets to
launch); the aggregate is all their launches over the window, the fairness
the fewest one session got over the most. Beside it, in the same rep, k bare
gRPC streams from one process carry batches of 64-byte records for the same
window (the transport's own curve). The pool server's memory is read
before the first count and after the last session of the rep has closed.
"""
from __future__ import annotations

import json
import sys
import threading
import time

from harness import HERE, REC64, Child, emit, log, tls_paths

#: Launches between a session's synchronize() calls.
UNIT = 128

COUNTS = (1, 2, 4, 8, 16, 32, 64)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class SessionsSection:
    def sec_sessions(self):
        from harp import wire
        a = self.a
        per = wire.BATCH_CALLS
        server_pid = self.harp_server.proc.pid
        # the client processes first, before this section opens channels of its own
        clients = [_Client(self.a, self.url, self.children) for _ in range(COUNTS[-1])]
        for c in clients:
            c.ready()
        ch = self.grpc_channel(self.grpc_port)
        count_rpc = ch.stream_stream("/bench.B/Count")
        batch = REC64 * per

        def window(k):
            # long enough that every one of k sessions gets tens of units: fairness is then
            # not a matter of counting in whole units
            return max(a.dur, 0.5, 0.04 * k)

        def harp_point(k):
            group = clients[:k]
            for c in group:
                c.send("open")
            for c in group:
                c.result(120)
            start = time.time() + 0.5
            stop = start + window(k)
            for c in group:
                c.send("run %.6f %.6f" % (start, stop))
            counts = [c.result(60 + window(k))["n"] for c in group]
            if k >= 16:
                log("    %d sessions, launches each (sorted): %s" % (k, sorted(counts)))
            for c in group:
                c.send("close")
            for c in group:
                c.result(60)
            return sum(counts) / (stop - start), min(counts) / max(counts) if max(counts) else 0.0

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
                curve, bare = {}, {}
                for k in COUNTS:
                    rate, fair = harp_point(k)
                    curve[k] = rate
                    bare[k] = grpc_point(k)
                    self.put(f"sessions: {k} x harp launches", rate, "launch/s")
                    self.put(f"sessions: {k} x bare gRPC records", bare[k], "rec/s")
                    if k == COUNTS[-1]:
                        self.put("sessions: fairness min/max at 64", fair, "ratio")
                self.put("sessions: aggregate at 64 / peak", curve[COUNTS[-1]] /
                         max(curve.values()), "ratio")
                self.put("sessions: bare gRPC at 64 / its peak", bare[COUNTS[-1]] /
                         max(bare.values()), "ratio")
                time.sleep(1.0)                           # workers exit, memory is trimmed
                self.put("sessions: server RSS after / idle", _rss_bytes(server_pid) / idle,
                         "ratio")
        finally:
            ch.close()
            for c in clients:
                c.stop()


class _Client:
    """One sessions-client child: opens a session, launches in a window, closes."""

    def __init__(self, a, url, children):
        self.argv = [sys.executable, HERE, "--role", "sessions-client", "--cert-dir",
                     a.cert_dir, "--url", url]
        self.children = children
        self.child = self._start()

    def _start(self):
        child = Child("sessions client", self.argv, stdin=True)
        self.children.append(child)
        return child

    def ready(self):
        """Wait for the child; one that died starting (a loaded machine) is started again."""
        try:
            self.child.wait_line(lambda ln: ln.startswith("READY"), 120)
        except RuntimeError as exc:
            log("  a sessions client did not start (%s); once more" % exc)
            self.child = self._start()
            self.child.wait_line(lambda ln: ln.startswith("READY"), 120)

    def send(self, text):
        self.child.proc.stdin.write(text + "\n")
        self.child.proc.stdin.flush()

    def result(self, timeout):
        line = self.child.wait_line(lambda ln: ln.startswith("RESULT "), timeout)
        return json.loads(line[7:])

    def stop(self):
        self.child.stop(5)


def role_sessions_client(a):
    """A child that holds at most one session and launches on command (see `_Client`)."""
    import harp
    _, cli = tls_paths(a.cert_dir)
    print("READY", flush=True)
    dev = fn = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "open":
            dev = harp.connect(a.url, tls=cli)
            fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
            dev.synchronize()
            emit({"ok": True})
        elif cmd[0] == "run":
            start, stop = float(cmd[1]), float(cmd[2])
            time.sleep(max(0.0, start - time.time()))
            n, launch = 0, dev.launch
            while time.time() < stop:
                for _ in range(UNIT):
                    launch(fn, 1, 1, [])
                dev.synchronize()
                n += UNIT
            emit({"n": n})
        elif cmd[0] == "close":
            dev.close()
            dev = None
            emit({"ok": True})
    if dev is not None:
        dev.close()
