"""What moving a session's frames onto its data channel saves: CPU per launch on each side.

Run: python benchmarks/frames_cpu.py [--launches N] [--reps R]

One pool server (cpu backend, process isolation, mutual TLS, loopback, port 0) and two
sessions from this process: one whose frames have moved onto its data channel (the
default), one opened with `frames_on_data=False` (its frames on the gRPC stream). Each
rep, alternating which goes first, each session issues N noop launches with a
`synchronize()` every 128 (a launch loop that waits now and then, where the per-frame
cost shows). The figures are the CPU time (user + system) per launch of this client
process (all its threads: gRPC's included), of the pool server process (the relay) and
of the session's worker, and the launch rate, medians over the reps, side by side as a
ratio. Then, the same way, 1 MiB writes with a `synchronize()` every 8 (64 MiB per rep):
the write rate of each.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import process_cpu_s as _cpu_s, start_harp_server, tls_paths
from relay_cpu import _tree

UNIT = 128
CHUNK, CHUNKS_PER_SYNC, CHUNKS = 1 << 20, 8, 64


def _busiest(before: dict, after: dict) -> tuple[int, float]:
    pid = max(after, key=lambda p: after[p] - before.get(p, 0.0))
    return pid, after[pid] - before.get(pid, 0.0)


def main() -> int:
    import harp
    from harp.security import ephemeral_pool
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=128_000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    n = -(-a.launches // UNIT) * UNIT
    children: list = []
    with tempfile.TemporaryDirectory(prefix="harp-frames-") as d:
        ephemeral_pool(Path(d))
        server, url = start_harp_server(d, children)
        try:
            tls = tls_paths(d)[1]
            devs = {"data channel": harp.connect(url, tls=tls),
                    "gRPC stream": harp.connect(url, tls=tls, frames_on_data=False)}
            deadline = time.time() + 10
            while not devs["data channel"].frames_on_data and time.time() < deadline:
                devs["data channel"].synchronize()
            assert devs["data channel"].frames_on_data, "the frames did not move"
            noops = {k: dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
                     for k, dev in devs.items()}
            figures: dict = {k: {"client": [], "relay": [], "worker": [], "rate": [],
                                 "write": []} for k in devs}
            chunk = os.urandom(CHUNK)
            bufs = {k: dev.alloc(CHUNK) for k, dev in devs.items()}
            for rep in range(a.reps):
                for k in (list(devs) if rep % 2 == 0 else list(devs)[::-1]):
                    dev, noop = devs[k], noops[k]
                    dev.synchronize()
                    pids = _tree(server.proc.pid)
                    before = {p: _cpu_s(p) for p in pids}
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(n // UNIT):
                        for _ in range(UNIT):
                            dev.launch(noop, 1, 1, [])
                        dev.synchronize()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                    after = {p: _cpu_s(p) for p in pids}
                    relay = after.pop(server.proc.pid) - before.pop(server.proc.pid)
                    _, worker = _busiest(before, after)
                    f = figures[k]
                    f["client"].append(cpu / n * 1e6)
                    f["relay"].append(relay / n * 1e6)
                    f["worker"].append(worker / n * 1e6)
                    f["rate"].append(n / wall)
                    t0 = time.perf_counter()
                    for i in range(CHUNKS):
                        dev.write(bufs[k], 0, chunk)
                        if i % CHUNKS_PER_SYNC == CHUNKS_PER_SYNC - 1:
                            dev.synchronize()
                    f["write"].append(CHUNKS * CHUNK / (time.perf_counter() - t0) / 1e9)
            for dev in devs.values():
                dev.close()
        finally:
            for c in children:
                c.stop()
    med = {k: {m: statistics.median(v) for m, v in f.items()} for k, f in figures.items()}
    on, off = med["data channel"], med["gRPC stream"]
    print(f"frames on the data channel vs on the gRPC stream: noop launches, a sync every "
          f"{UNIT}, medians of {a.reps} reps of {n:,} ({os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f})")
    for m, label in (("client", "client CPU per launch"), ("relay", "relay CPU per launch"),
                     ("worker", "worker CPU per launch")):
        print(f"  {label:24s} {on[m]:6.2f} us  vs {off[m]:6.2f} us   {on[m] / off[m]:.2f}x")
    print(f"  {'launches/s':24s} {on['rate'] / 1e3:6.1f}k   vs {off['rate'] / 1e3:6.1f}k    "
          f"{on['rate'] / off['rate']:.2f}x")
    print(f"  {'1 MiB writes':24s} {on['write']:6.2f} GB/s vs {off['write']:6.2f} GB/s "
          f"{on['write'] / off['write']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
