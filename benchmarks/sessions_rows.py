"""Many sessions: aggregate launch and bulk throughput, and fairness, at 1, 2, 4, ... 64.

For each count k, k sessions on the default pool server (a worker process
each), each from a client process of its own (`--role sessions-client`: so
that no client's GIL decides who gets to launch), run two workloads flat out
for one window each (longer for more sessions):

- launches: noop kernels, a synchronize every 128; the aggregate is all their
  launches over the window, the fairness the fewest one session got over the most;
- bulk: 1 MiB writes into a buffer of the session's, a synchronize every 8;
  the aggregate is the bytes all of them wrote over the window.

Beside each, in the same rep, k bare gRPC streams from one process, each on a
channel (TCP and TLS connection) of its own as each session has, carry the same
for the same window: batches of 64-byte records, and 1 MiB messages (the
transport's own curves). The curve is the median over reps of each count's
aggregate, and "64 vs peak" is the 64-session median over the highest median of
the curve: a per-rep peak would be the highest of seven noisy points, which
measures the noise more than the curve. Every other rep runs the counts in
reverse order, so that a machine that slows down (or speeds up) within a rep
does not tilt the curve. The pool server's memory is read
before the first count and after the last session of the rep has closed.

For each point, the log says where the machine's CPU went (the client
processes, the pool server's own process, the rest: its workers) and how much
of it was idle: which side of the run a curve that falls is bounded by.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

from harness import HERE, REC64, Child, emit, log, machine_ticks, process_cpu_s, tls_paths

#: Launches between a session's synchronize() calls.
UNIT = 128
#: A bulk session's write size, and writes between its synchronize() calls.
CHUNK, CHUNKS_PER_SYNC = 1 << 20, 8

COUNTS = (1, 2, 4, 8, 16, 32, 64)


class _CpuWindow:
    """Where the machine's CPU went between `__init__` and `text()`, by role."""

    def __init__(self, clients: list, server_pid: int) -> None:
        self.clients, self.server_pid = clients, server_pid
        self.start = self._now()

    def _now(self):
        tick = os.sysconf("SC_CLK_TCK")
        return (machine_ticks(), tick * sum(process_cpu_s(c.child.proc.pid)
                                            for c in self.clients),
                tick * process_cpu_s(self.server_pid))

    def text(self) -> str:
        (t1, i1), c1, s1 = self._now()
        (t0, i0), c0, s0 = self.start
        total = max(1, t1 - t0)
        clients, server, idle = c1 - c0, s1 - s0, i1 - i0
        rest = total - idle - clients - server
        shares = tuple(100 * x / total for x in (clients, server, rest, idle))
        return ("cpu: clients %2.0f%%, pool server %2.0f%%, workers and rest %2.0f%%, "
                "idle %2.0f%%" % shares)


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class SessionsSection:
    def sec_sessions(self):
        import statistics
        from harp import wire
        a = self.a
        per = wire.BATCH_CALLS
        server_pid = self.harp_server.proc.pid
        # the client processes first, before this section opens channels of its own
        clients = [_Client(self.a, self.url, self.children) for _ in range(COUNTS[-1])]
        for c in clients:
            c.ready()
        # one channel (TCP + TLS connection) per bare stream, as each session has its own
        channels = [self.grpc_channel(self.grpc_port, own_connection=True)
                    for _ in range(COUNTS[-1])]
        count_rpcs = [ch.stream_stream("/bench.B/Count") for ch in channels]
        up_rpcs = [ch.stream_unary("/bench.B/Up") for ch in channels]
        batch = REC64 * per
        chunk = bytes(CHUNK)

        def window(k, what="run"):
            # Long enough that every one of k sessions gets a dozen units or more: fairness
            # is then not a matter of counting in whole units. A launch unit (128 noops) is
            # done in about 1 ms of the machine's time, a bulk unit (8 MiB) in about 12: in
            # a launch window of 2.56 s at 64 sessions each got 40-50 units, but 3-4 bulk
            # units, so that "min/max" read 2/4 or 3/4 whatever the order of service was.
            return max(a.dur, 1.0, (0.16 if what == "bulk" else 0.04) * k)

        def harp_point(k, what):
            group = clients[:k]
            for c in group:
                c.send("open")
            for c in group:
                c.result(120)
            start = time.time() + 0.5
            stop = start + window(k, what)
            for c in group:
                c.send("%s %.6f %.6f" % (what, start, stop))
            time.sleep(max(0.0, start - time.time()))
            cpu = _CpuWindow(group, server_pid)
            time.sleep(window(k, what))
            used = cpu.text()
            counts = [c.result(60 + window(k, what))["n"] for c in group]
            log("    %2d sessions, %-6s %s" % (k, what, used))
            if k >= 16 and what == "run":
                log("    %d sessions, launches each (sorted): %s" % (k, sorted(counts)))
            for c in group:
                c.send("close")
            for c in group:
                c.result(60)
            return sum(counts) / (stop - start), min(counts) / max(counts) if max(counts) else 0.0

        def grpc_point(k, rpcs, message, n_per_message, drain, what):
            totals = [0] * k
            stop = time.perf_counter() + window(k, what)

            def run(i):
                sent = [0]

                def gen():
                    while time.perf_counter() < stop:
                        sent[0] += 1
                        yield message
                drain(rpcs[i](gen(), timeout=60))
                totals[i] = sent[0] * n_per_message
            t0 = time.perf_counter()
            threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return sum(totals) / (time.perf_counter() - t0)

        def drain_stream(replies):
            for _ in replies:
                pass

        curves = {name: {k: [] for k in COUNTS} for name in
                  ("launches", "bare launches", "bulk", "bare bulk")}
        try:
            harp_point(2, "run")                          # warm the server and its pool
            idle = _rss_bytes(server_pid)
            for i in range(a.reps):
                log("  sessions rep %d/%d" % (i + 1, a.reps))
                # every other rep runs the counts from the top down: a machine whose speed
                # drifts during a rep then favours neither end of the curve
                for k in (COUNTS if i % 2 == 0 else COUNTS[::-1]):
                    rate, fair = harp_point(k, "run")
                    bare = grpc_point(k, count_rpcs, batch, per, drain_stream, "run")
                    nbytes, bulk_fair = harp_point(k, "bulk")
                    bare_bytes = grpc_point(k, up_rpcs, chunk, CHUNK, lambda r: None, "bulk")
                    for name, v in (("launches", rate), ("bare launches", bare),
                                    ("bulk", nbytes / 1e9), ("bare bulk", bare_bytes / 1e9)):
                        curves[name][k].append(v)
                    self.put(f"sessions: {k} x harp launches", rate, "launch/s")
                    self.put(f"sessions: {k} x bare gRPC records", bare, "rec/s")
                    self.put(f"sessions: {k} x harp bulk write", nbytes / 1e9, "GB/s")
                    self.put(f"sessions: {k} x bare gRPC 1MiB msgs", bare_bytes / 1e9, "GB/s")
                    if k == COUNTS[-1]:
                        self.put("sessions: fairness min/max at 64", fair, "ratio")
                        self.put("sessions: bulk fairness min/max at 64", bulk_fair, "ratio")
                time.sleep(1.0)                           # workers exit, memory is trimmed
                self.put("sessions: server RSS after / idle", _rss_bytes(server_pid) / idle,
                         "ratio")
        finally:
            for ch in channels:
                ch.close()
            for c in clients:
                c.stop()

        def at_64_over_peak(name):
            medians = {k: statistics.median(v) for k, v in curves[name].items()}
            return medians[COUNTS[-1]] / max(medians.values())
        # one figure each, from the median curve (see the module's docstring)
        self.put("sessions: aggregate at 64 / peak", at_64_over_peak("launches"), "ratio")
        self.put("sessions: bare gRPC at 64 / its peak", at_64_over_peak("bare launches"),
                 "ratio")
        self.put("sessions: bulk at 64 / peak", at_64_over_peak("bulk"), "ratio")
        self.put("sessions: bare gRPC bulk at 64 / its peak", at_64_over_peak("bare bulk"),
                 "ratio")


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
    chunk = bytes(range(256)) * (CHUNK // 256)
    print("READY", flush=True)
    dev = fn = buf = None
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "open":
            dev = harp.connect(a.url, tls=cli)
            fn = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
            buf = dev.alloc(CHUNK)
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
        elif cmd[0] == "bulk":
            start, stop = float(cmd[1]), float(cmd[2])
            time.sleep(max(0.0, start - time.time()))
            n, write = 0, dev.write
            while True:
                for _ in range(CHUNKS_PER_SYNC):   # counted write by write: a session gets
                    write(buf, 0, chunk)           # only a few units in a window at 64
                    n += CHUNK
                    if time.time() >= stop:
                        break
                dev.synchronize()
                if time.time() >= stop:
                    break
            emit({"n": n})
        elif cmd[0] == "close":
            dev.close()
            dev = None
            emit({"ok": True})
    if dev is not None:
        dev.close()
