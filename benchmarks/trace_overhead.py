"""Recording overhead: a launch-heavy workload on local:cpu with and without the trace recorder.

Run: python benchmarks/trace_overhead.py [--launches N] [--runs R] [--json]

Each run issues N `noop` catalog launches (the cheapest call there is, so the
recorder's share is as large as it gets) and one synchronize; runs with and
without the recorder alternate, and the figure is the ratio of the medians,
printed beside the 10% target. Write payloads are off (they are not part of the
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

import harp
from harp.trace import TraceRecorder, open_trace

TARGET = 0.10


def _workload(device: harp.Device, launches: int) -> float:
    lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
    noop = device.function(lib, "noop")
    device.synchronize()
    launch = device.launch
    t = time.perf_counter()
    for _ in range(launches):
        launch(noop, 1, 1, ())
    device.synchronize()
    return time.perf_counter() - t


def measure(launches: int = 20_000, runs: int = 7) -> dict:
    plain, traced = [], []
    with tempfile.TemporaryDirectory(prefix="harp-trace-bench-") as tmp:
        for i in range(runs):
            for recorded in ((False, True) if i % 2 == 0 else (True, False)):
                device = harp.connect("local:cpu", trace=False)
                path = os.path.join(tmp, f"run{i}.harptrace")
                if recorded:
                    device = TraceRecorder(device, path)
                try:
                    seconds = _workload(device, launches)
                finally:
                    device.close()
                (traced if recorded else plain).append(seconds)
                if recorded:
                    with open_trace(path) as trace:
                        n = sum(1 for _ in trace.calls())
                        size = trace.size
                    assert n == launches + 5, n
    p, t = statistics.median(plain), statistics.median(traced)
    return {"launches": launches, "runs": runs, "plain_s": p, "traced_s": t,
            "plain_us_per_launch": p / launches * 1e6, "traced_us_per_launch": t / launches * 1e6,
            "overhead": t / p - 1, "target": TARGET, "meets_target": t / p - 1 <= TARGET,
            "trace_bytes_per_call": size / (launches + 5),
            "python": sys.version.split()[0], "cpus": os.cpu_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    res = measure(args.launches, args.runs)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"trace recording overhead, {res['launches']:,} noop launches on local:cpu, "
          f"median of {res['runs']} runs each ({res['cpus']} cpus, Python {res['python']})")
    print(f"  without recorder  {res['plain_us_per_launch']:6.2f} µs/launch")
    print(f"  with recorder     {res['traced_us_per_launch']:6.2f} µs/launch  "
          f"({res['trace_bytes_per_call']:.1f} trace bytes per call)")
    print(f"  overhead          {res['overhead']:+6.1%}   target <= {TARGET:.0%}: "
          f"{'met' if res['meets_target'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
