"""Same host: sessions with a shared-memory window beside sessions on the unix socket's stream, and memcpy."""
from __future__ import annotations

import os
import time

from harness import MiB, log, timed_rate, tls_paths


class SameHostSection:
    # -- 7. same host: shared memory -------------------------------------------------
    def sec_samehost(self):
        """A pool server on a unix socket: sessions with a shared-memory window beside
        sessions that move bulk data over the stream, and memcpy of the same bytes."""
        import numpy as np
        import harp
        a = self.a
        _, cli = tls_paths(self.a.cert_dir)
        n = a.bulk
        data = np.frombuffer(os.urandom(MiB) * (n // MiB), np.uint8)
        out = np.empty(n, np.uint8)
        small = bytearray(64)
        out[:] = data                                   # fault the pages in

        def memcpy():
            t0 = time.perf_counter()
            np.copyto(out, data)
            self.put("memcpy (numpy copyto)", n / (time.perf_counter() - t0) / 1e9, "GB/s")

        def one_mode(mode):
            dev = harp.connect(self.unix_url, tls=cli, shared_memory=(mode == "shm"))
            try:
                assert dev.shared_memory == (mode == "shm"), "shared memory not as asked"
                buf = self.bulk_pass(dev, mode, data, out)
                self.put(f"{mode}: synchronize()", timed_rate(dev.synchronize, a.dur), "rt/s")
                self.put(f"{mode}: read 64B", timed_rate(
                    lambda: dev.read(buf, 0, 64, out=small), a.dur), "rt/s")
            finally:
                dev.close()

        one_mode("shm")                                  # warm-up
        one_mode("unix")
        for key in [k for k in self.series if k.startswith(("shm:", "unix:"))]:
            del self.series[key]
        for i in range(a.reps):
            log("  same-host rep %d/%d" % (i + 1, a.reps))
            memcpy()
            for mode in (("shm", "unix") if i % 2 == 0 else ("unix", "shm")):
                one_mode(mode)
