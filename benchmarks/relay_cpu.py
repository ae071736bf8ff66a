"""Where the CPU of a remote launch goes: the pool server process and a session's worker
(process isolation, the default) beside the one server process of thread isolation.

Run: python benchmarks/relay_cpu.py [--launches N] [--reps R]

For each isolation mode a pool server is started (cpu backend, mutual TLS, loopback,
port 0); one session issues N noop launches and a synchronize, R times. The figure is
the CPU time (user + system, from /proc) each server-side process used per launch,
median over the reps: what the relay itself costs, apart from where the OS schedules
two processes on one core (which `bench.py --sections isolation` measures end to end).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from harness import process_cpu_s as _cpu_s, start_harp_server, tls_paths


def _tree(pid: int) -> list[int]:
    out = [pid]
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for kid in kids.split():
        out += _tree(int(kid))
    return out


def measure(isolation: str, launches: int, reps: int) -> dict:
    """Per-launch CPU µs of the server process and of its busiest descendant (the
    session's worker), medians over `reps`."""
    import harp
    children: list = []
    with tempfile.TemporaryDirectory(prefix="harp-relay-") as d:
        from pathlib import Path
        from harp.security import ephemeral_pool
        ephemeral_pool(Path(d))
        server, url = start_harp_server(d, children, extra=["--isolation", isolation])
        try:
            dev = harp.connect(url, tls=tls_paths(d)[1])
            noop = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
            dev.synchronize()
            pids = _tree(server.proc.pid)
            main_us, worker_us, rates = [], [], []
            for _ in range(reps):
                before = {p: _cpu_s(p) for p in pids}
                t0 = time.perf_counter()
                for _ in range(launches):
                    dev.launch(noop, 1, 1, [])
                dev.synchronize()
                rates.append(launches / (time.perf_counter() - t0))
                used = {p: _cpu_s(p) - before[p] for p in pids}
                main_us.append(used.pop(server.proc.pid) / launches * 1e6)
                worker_us.append(max(used.values(), default=0.0) / launches * 1e6)
            dev.close()
        finally:
            for c in children:
                c.stop()
    return {"isolation": isolation, "server_us": statistics.median(main_us),
            "worker_us": statistics.median(worker_us), "rate": statistics.median(rates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    proc, thread = (measure(m, a.launches, a.reps) for m in ("process", "thread"))
    total = proc["server_us"] + proc["worker_us"]
    print(f"CPU per remote noop launch, medians of {a.reps} reps of {a.launches:,} launches "
          f"({os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f})")
    print(f"  process isolation: server (relay) {proc['server_us']:.2f} us + worker "
          f"{proc['worker_us']:.2f} us = {total:.2f} us   ({proc['rate'] / 1e3:.0f}k launches/s)")
    print(f"  thread isolation:  server {thread['server_us']:.2f} us"
          f"{'':>26}({thread['rate'] / 1e3:.0f}k launches/s)")
    print(f"  process / thread CPU per launch: {total / thread['server_us']:.3f}x "
          f"(the relay's share of it: {proc['server_us'] / total:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
