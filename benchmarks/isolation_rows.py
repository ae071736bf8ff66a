"""Process beside thread isolation, interleaved: what the relay to a session's worker costs."""
from __future__ import annotations

import os
import time

from harness import MiB, log, timed_rate, tls_paths


class IsolationSection:
    # -- 6. process vs thread isolation --------------------------------------------------
    def sec_isolation(self):
        """The relay's cost: the same calls against a server whose sessions run in worker
        processes and against one whose sessions run in its own process, interleaved."""
        import numpy as np
        import harp
        a = self.a
        _, cli = tls_paths(self.a.cert_dir)
        urls = {"process": self.url, "thread": self.thread_url}
        n = a.bulk
        data = np.frombuffer(os.urandom(MiB) * (n // MiB), np.uint8)
        out = np.empty(n, np.uint8)
        launches = self.meta.get("launch_n") or 200_000

        def connect_time(url):
            t0 = time.perf_counter()
            with harp.connect(url, tls=cli) as dev:
                dev.synchronize()
                return time.perf_counter() - t0

        def one_mode(mode):
            url = urls[mode]
            times = sorted(connect_time(url) for _ in range(3))
            self.put(f"{mode}: connect + first sync", 1 / times[1], "connect/s")
            with harp.connect(url, tls=cli) as dev:
                noop = dev.function(dev.load_module(harp.CATALOG_IMAGE, "catalog"), "noop")
                dev.synchronize()
                t0 = time.perf_counter()
                for _ in range(launches):
                    dev.launch(noop, 1, 1, [])
                dev.synchronize()
                self.put(f"{mode}: async launches", launches / (time.perf_counter() - t0),
                         "launch/s")
                self.put(f"{mode}: synchronize()", timed_rate(dev.synchronize, a.dur), "rt/s")

                def launch_and_sync():            # a sync with work before it: the worker's
                    dev.launch(noop, 1, 1, [])
                    dev.synchronize()
                self.put(f"{mode}: launch+synchronize()", timed_rate(launch_and_sync, a.dur),
                         "rt/s")
                self.bulk_pass(dev, mode, data, out)

        one_mode("process")                              # warm both servers
        one_mode("thread")
        for key in [k for k in self.series if k.startswith(("process:", "thread:"))]:
            del self.series[key]
        for i in range(a.reps):
            log("  isolation rep %d/%d" % (i + 1, a.reps))
            for mode in (("process", "thread") if i % 2 == 0 else ("thread", "process")):
                one_mode(mode)
