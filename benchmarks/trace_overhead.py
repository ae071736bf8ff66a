"""Recording overhead: a launch-heavy workload on local:cpu with and without the trace recorder.

Run: python benchmarks/trace_overhead.py [--launches N] [--runs R] [--json]

Each run issues N `noop` catalog launches (the cheapest call there is, so the
recorder's share is as large as it gets) and one synchronize; runs with and
without the recorder alternate, and the figure is the ratio of the medians,
printed beside the 10% target. A second line does the same with `axpy_f32` on
four arguments, a small real kernel, for context. Write payloads are off (they are not part of the
target); the trace goes to a temporary file and is checked to hold every call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import harp
from harp.trace import TraceRecorder, open_trace

TARGET = 0.10


def _workload(device: harp.Device, launches: int, kernel: str) -> tuple[float, float]:
    lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
    fn = device.function(lib, kernel)
    args: tuple = ()
    if kernel != "noop":       # a small real kernel: two buffers and two scalars to record
        buf = device.alloc(4096)
        args = (buf, buf, np.float32(1.0), np.int64(16))
    device.synchronize()
    launch = device.launch
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(launches):
        launch(fn, 1, 1, args)
    device.synchronize()
    return time.perf_counter() - t, time.process_time() - cpu


def measure(launches: int = 20_000, runs: int = 9, kernel: str = "noop") -> dict:
    plain, traced, plain_cpu, traced_cpu = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="harp-trace-bench-") as tmp:
        for i in range(runs):
            for recorded in ((False, True) if i % 2 == 0 else (True, False)):
                device = harp.connect("local:cpu", trace=False)
                path = os.path.join(tmp, f"run{i}.harptrace")
                if recorded:
                    device = TraceRecorder(device, path)
                try:
                    seconds, cpu = _workload(device, launches, kernel)
                finally:
                    device.close()
                (traced if recorded else plain).append(seconds)
                (traced_cpu if recorded else plain_cpu).append(cpu)
                if recorded:
                    with open_trace(path) as trace:
                        n = sum(1 for _ in trace.calls())
                        size = trace.size
                    assert n == launches + (5 if kernel == "noop" else 6), n
    p, t = statistics.median(plain), statistics.median(traced)
    pc, tc = statistics.median(plain_cpu), statistics.median(traced_cpu)
    return {"kernel": kernel, "launches": launches, "runs": runs, "plain_s": p, "traced_s": t,
            "plain_us_per_launch": p / launches * 1e6, "traced_us_per_launch": t / launches * 1e6,
            "overhead": t / p - 1, "target": TARGET, "meets_target": t / p - 1 <= TARGET,
            "overhead_of_fastest_runs": min(traced) / min(plain) - 1,
            "plain_cpu_us_per_launch": pc / launches * 1e6,
            "traced_cpu_us_per_launch": tc / launches * 1e6, "cpu_overhead": tc / pc - 1,
            "trace_bytes_per_call": size / (launches + 5),
            "python": sys.version.split()[0], "cpus": os.cpu_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--kernel", action="append", default=None,
                    help="catalog kernel to launch (repeatable; default: noop, then axpy_f32 "
                         "with four arguments, for context)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [measure(args.launches, args.runs, k) for k in (args.kernel or ["noop", "axpy_f32"])]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    r0 = results[0]
    print(f"trace recording overhead on local:cpu, {args.launches:,} launches per run, median "
          f"of {args.runs} runs each, alternating ({r0['cpus']} cpus, Python {r0['python']})")
    for res in results:
        print(f"  {res['kernel']:<9} without {res['plain_us_per_launch']:6.2f} µs/launch, with "
              f"{res['traced_us_per_launch']:6.2f} ({res['trace_bytes_per_call']:.1f} B/call): "
              f"overhead {res['overhead']:+6.1%} (fastest runs {res['overhead_of_fastest_runs']:+.1%}; "
              f"process CPU time {res['cpu_overhead']:+.1%})"
              f"   target <= {TARGET:.0%}: {'met' if res['meets_target'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
