"""A warm worker's first session, cold beside rehearsed: CPU time of the open, the first
call and the close in a fresh fork of a process that imported the cpu backend, as a pool
server's fork server has.

Run: python benchmarks/worker_open.py [--forks N]

Each fork opens device 0, answers a synchronize and closes, as a worker does for its
first session; half the forks rehearse a session first (`harp.server.worker._rehearse`,
what every warm worker of a cpu pool server does). Figures are the thread's CPU time
(user and system: copy-on-write faults included), medians over the forks, and the ratio
of rehearsed to cold. Connecting end to end is `bench.py --sections isolation`.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from harp import wire
from harp.backends import load_backend
from harp.protocol import ServerProtocol
from harp.server.session import Session
from harp.server.worker import _rehearse
from harp.tenancy import Tenancy

PHASES = ("open", "first call", "close")


def _first_session(backend, rehearse: bool, out: int) -> None:
    """In a fork: (rehearse,) open, sync, close; write the three CPU times to `out`."""
    if rehearse:
        _rehearse(backend, wire.CHUNK_SIZE)
    t = [time.thread_time()]
    device = backend.open(0, tenancy=Tenancy(backend.local_memory(0, 0, None)))
    session = Session(device, "s1", wire.CHUNK_SIZE)
    gc.freeze()
    t.append(time.thread_time())
    protocol = ServerProtocol()
    session.handle(protocol.receive(wire.batch_frame([[wire.SYNCHRONIZE, 1, None]], True)))
    t.append(time.thread_time())
    session.handle(protocol.receive(wire.batch_frame([[wire.CLOSE, 2]], True)))
    t.append(time.thread_time())
    os.write(out, " ".join(f"{b - a:.9f}" for a, b in zip(t, t[1:])).encode())


def measure(forks: int) -> dict[str, list[list[float]]]:
    backend = load_backend("cpu")
    gc.freeze()
    found: dict[str, list[list[float]]] = {"cold": [], "rehearsed": []}
    for i in range(2 * forks):
        rehearse = bool(i % 2)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _first_session(backend, rehearse, w)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            text = f.read().decode()
        os.waitpid(pid, 0)
        found["rehearsed" if rehearse else "cold"].append([float(x) for x in text.split()])
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forks", type=int, default=9, help="forks of each kind (default 9)")
    a = ap.parse_args()
    found = measure(a.forks)
    print(f"a warm worker's first session, CPU time, median of {a.forks} forks each "
          f"({os.cpu_count()} cpus, Python {sys.version.split()[0]})")
    for i, phase in enumerate(PHASES):
        cold = statistics.median(r[i] for r in found["cold"]) * 1e3
        warm = statistics.median(r[i] for r in found["rehearsed"]) * 1e3
        print(f"  {phase:<11} cold {cold:6.3f} ms   rehearsed {warm:6.3f} ms   "
              f"ratio {warm / cold:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
