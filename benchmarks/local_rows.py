"""The local path: harp.connect('local:cpu') beside the cpu backend called directly."""
from __future__ import annotations

import os
import threading
import time
import gc

from harness import MiB, log


class LocalSection:
    # -- 5. local path ---------------------------------------------------------------
    def sec_local(self):
        import harp
        from harp.backends.cpu import CpuBackend
        a = self.a
        data = os.urandom(MiB)
        saved_affinity = os.sched_getaffinity(0)

        # Both sides run the same code (connect returns the backend's own device),
        # so only noise separates them, and two kinds of it are systematic here:
        # - placement: a device whose stream thread shares the caller's core runs
        #   ~2x faster than one whose thread sits on the other core, and the
        #   scheduler keeps each thread where it is for seconds. So the caller and
        #   both devices' stream threads are pinned to one core (same for both).
        # - GC phase: the two are timed in short blocks interleaved in one window;
        #   with a fixed block order, collections (triggered every N allocations)
        #   fall on one side more than the other (~2% bias measured). So the
        #   order is shuffled per round and the heap that exists before the window
        #   is gc.freeze()d (full collections then cost what the devices' own
        #   garbage costs, as in a long-running program).
        # Each rep also opens a fresh pair of devices, in alternating order.
        def launch_block(side, n):
            dev, fn, _ = side
            launch = dev.launch
            for _ in range(n):
                launch(fn, 1, 1, [])
            dev.synchronize()
            return n

        def write_block(side, n):
            dev, _, buf = side
            for _ in range(n):
                dev.write(buf, 0, data)
                dev.synchronize()
            return n

        def interleaved(sides, block, n, dur, seed=0):
            """(rate of connect, rate of backend) over one window of ~dur seconds."""
            import random
            spent = {"connect": 0.0, "backend": 0.0}
            done = {"connect": 0, "backend": 0}
            order = ["connect", "backend"] * 2
            rnd = random.Random(seed)
            gc.collect()
            gc.freeze()
            try:
                end = time.perf_counter() + dur
                while time.perf_counter() < end:
                    rnd.shuffle(order)
                    for key in order:
                        t0 = time.perf_counter()
                        done[key] += block(sides[key], n)
                        spent[key] += time.perf_counter() - t0
            finally:
                gc.unfreeze()
            return done["connect"] / spent["connect"], done["backend"] / spent["backend"]

        def open_pair(i):
            opener = {"connect": lambda: harp.connect("local:cpu", memory="1GiB"),
                      "backend": lambda: CpuBackend(memory="1GiB").open(0)}
            sides = {}
            for key in (("connect", "backend") if i % 2 == 0 else ("backend", "connect")):
                dev = opener[key]()
                mod = dev.load_module(harp.CATALOG_IMAGE, "catalog")
                sides[key] = (dev, dev.function(mod, "noop"), dev.alloc(MiB))
            interleaved(sides, launch_block, 200, 0.05)   # starts both stream threads
            interleaved(sides, write_block, 4, 0.05)
            if len(saved_affinity) > 1:
                core = min(saved_affinity)
                os.sched_setaffinity(0, {core})
                for t in threading.enumerate():
                    if t.name.startswith("harp-cpu"):
                        os.sched_setaffinity(t.native_id, {core})
                self.meta["local_placement"] = ("caller and stream threads pinned to core %d"
                                                % core)
            return sides

        self.meta["local_blocks"] = ("noop: 1000 launches + synchronize; write: 8 x "
                                     "(1 MiB write + synchronize)")
        for i in range(a.reps + 1):          # pass 0 is a warm-up
            if i:
                log("  local rep %d/%d" % (i, a.reps))
            sides = open_pair(i)
            try:
                dur = 4 * a.local_s if i else 0.3
                c, b = interleaved(sides, launch_block, 1000, dur, seed=2 * i)
                if i:
                    self.put("local connect noop launches", c, "launch/s")
                    self.put("local backend noop launches", b, "launch/s")
                c, b = interleaved(sides, write_block, 8, dur, seed=2 * i + 1)
                if i:
                    self.put("local connect 1MiB write+sync", c, "op/s")
                    self.put("local backend 1MiB write+sync", b, "op/s")
            finally:
                os.sched_setaffinity(0, saved_affinity)
                for dev, _, _ in sides.values():
                    dev.close()
