#!/usr/bin/env python3
"""whatif_accuracy.py -- how close `harp trace whatif` comes to a real remote replay.

Records a chatty workload (bulk transfers, many small sync reads between launches) on
local:cpu, measures the loopback link to a pool server (mutual TLS, its own process),
predicts the run on that link, and replays the trace against the server, interleaved,
several times. Prints the prediction beside the medians of the real replays, as a ratio.
(This was a test; a timing comparison on a loaded machine is a benchmark.)

Usage: python benchmarks/whatif_accuracy.py [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def chatty(dev) -> None:
    import harp
    lib = dev.load_module(harp.CATALOG_IMAGE, "catalog")
    axpy = dev.function(lib, "axpy_f32")
    n = 1 << 21
    x = np.ones(n, np.float32)
    bx, by = dev.alloc(4 * n), dev.alloc(4 * n)
    dev.write(bx, 0, x)
    dev.write(by, 0, x)
    for _ in range(60):
        dev.launch(axpy, 1, 256, [by, bx, np.float32(1), np.int64(1024)])
        dev.read(by, 0, 4096)
    for _ in range(20):
        dev.launch(axpy, 4, 256, [by, bx, np.float32(1), np.int64(1 << 18)])
    dev.synchronize()
    dev.read(by, 0, 4 * n)
    dev.free(bx)
    dev.free(by)
    dev.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import harp
    from harp import security
    from harp.trace import open_trace
    from harp.trace.replay import replay
    from harp.trace.timeline import estimate
    from harp.trace.whatif import Link, measure_link, whatif
    with tempfile.TemporaryDirectory(prefix="harp-whatif-") as tmp:
        tmp = Path(tmp)
        server_tls, client_tls = security.ephemeral_pool(tmp / "certs")
        harp_cli = Path(sys.executable).parent / "harp"
        server = subprocess.Popen([str(harp_cli), "server", "serve", "--listen", "127.0.0.1:0",
                                   "--cert-dir", str(tmp / "certs")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split("listening on ")[1].split()[0]
            spans = {}
            for i in range(3):
                path = tmp / f"chatty{i}.harptrace"
                with harp.connect("local:cpu", trace=str(path)) as dev:
                    chatty(dev)
                with open_trace(path) as t:
                    spans[path] = sum(c.duration_ns for c in t.calls())
            path = min(spans, key=spans.get)          # the least disturbed recording
            links, actual = [], []
            for i in range(a.reps):
                with harp.connect(url, tls=client_tls) as dev:
                    links.append(measure_link(dev, rounds=15))
                with harp.connect(url, tls=client_tls) as dev:
                    result = replay(path, dev, timing="asap")
                assert result.ok, result.mismatches
                actual.append(result.seconds)
            link = Link(*(statistics.median(getattr(x, f) for x in links)
                          for f in ("rtt", "up", "down")))
            with open_trace(path) as t:
                predicted = whatif(estimate(t.calls()), link, timing="asap")["predicted_ms"] / 1e3
        finally:
            server.terminate()
            server.wait(15)
            server.stdout.close()
    real = statistics.median(actual)
    print(f"link {link.describe()}")
    print(f"predicted {predicted * 1e3:.1f} ms | real replays (median of {a.reps}) "
          f"{real * 1e3:.1f} ms [{min(actual) * 1e3:.1f}..{max(actual) * 1e3:.1f}] | "
          f"ratio {predicted / real:.2f} (within 50%: {'yes' if 0.5 <= predicted / real <= 1.5 else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
