"""What a noop launch costs where a remote session runs it: `Session.handle` on batch
frames of 128 launches and a synchronize (what a worker does with each frame a client
sends), with short kernels run in the issuing thread (`StreamQueue.run_now`, the
default) beside every kernel queued to a pool thread (`host.INLINE_NS = 0`), under a
compute gate as in a pool server, interleaved in one process.

Run: python benchmarks/session_launch.py [--frames N] [--reps R]

The figure is CPU µs per launch (this process's, user + system), median over the reps
of each mode, and their ratio; wall time is printed beside it (the pool thread's work
overlaps the issuing thread's only as far as the GIL lets it).
"""
from __future__ import annotations

import argparse
import statistics
import time

import harp
from harp import wire
from harp.backends import host, load_backend
from harp.protocol import ServerProtocol
from harp.server.fairshare import DeviceArbiter
from harp.server.session import Session
from harp.tenancy import Tenancy

LAUNCHES = 128


class _Run:
    """One session on the cpu device, gated as a pool server gates it, ready to launch."""

    def __init__(self) -> None:
        backend = load_backend("cpu")
        gate = DeviceArbiter().local_gate("bench", 1.0)
        self.device = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 1 << 30, None),
                                                      gate))
        self.session = Session(self.device, "bench", 1 << 20)
        self.protocol = ServerProtocol()
        self.seq = 0
        self._frame([[wire.LOAD_MODULE, self._next(), 1, "catalog", harp.CATALOG_IMAGE],
                     [wire.FUNCTION, self._next(), 2, 1, "noop"],
                     [wire.SYNCHRONIZE, self._next(), None]])

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _frame(self, calls: list) -> None:
        reply = self.session.handle(self.protocol.receive(wire.batch_frame(calls, True)))
        if reply is None or reply.error is not None:
            raise RuntimeError(f"the session failed: {reply and reply.error}")

    def frames(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            calls = [[wire.LAUNCH, self._next(), 2, [1, 1, 1], [1, 1, 1], 0, 0, []]
                     for _ in range(LAUNCHES)]
            calls.append([wire.SYNCHRONIZE, self._next(), None])
            out.append(wire.batch_frame(calls, True))
        return out

    def time(self, frames: list[bytes]) -> tuple[float, float]:
        """CPU and wall µs per launch over `frames`."""
        handle, receive = self.session.handle, self.protocol.receive
        c0, w0 = time.process_time(), time.perf_counter()
        for frame in frames:
            handle(receive(frame))
        c1, w1 = time.process_time(), time.perf_counter()
        n = len(frames) * LAUNCHES
        return (c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6

    def close(self) -> None:
        self.session.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=400, help="frames per rep (128 launches)")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    inline_ns = host.INLINE_NS
    run = _Run()
    results: dict[str, list] = {"inline": [], "queued": []}
    try:
        run.time(run.frames(50))                       # warm: the kernel is timed once
        for _ in range(a.reps):
            for mode in ("inline", "queued"):
                host.INLINE_NS = inline_ns if mode == "inline" else 0
                results[mode].append(run.time(run.frames(a.frames)))
    finally:
        host.INLINE_NS = inline_ns
        run.close()
    med = {m: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
           for m, v in results.items()}
    print(f"noop launch in a session, {a.reps} reps of {a.frames} frames x {LAUNCHES}:")
    for mode, (cpu, wall) in med.items():
        spread = [round(c, 2) for c, _ in results[mode]]
        print(f"  {mode:7s} cpu {cpu:5.2f} us/launch  wall {wall:5.2f} us  (cpu per rep {spread})")
    print(f"  inline / queued: cpu {med['inline'][0] / med['queued'][0]:.2f}x, "
          f"wall {med['inline'][1] / med['queued'][1]:.2f}x")


if __name__ == "__main__":
    main()
