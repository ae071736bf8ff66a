"""PyTorch on torch's `harp` device beside torch on the CPU directly, in one run.

Run: python benchmarks/torch_ops.py [--reps 5] [--ops 2000] [--steps 20] [--json FILE]

Rows (medians of --reps, interleaved):
  * operators/s: `a = a * 1.0001` on a 64x64 float32 tensor, queued and then
    synchronized, on `harp` local (`local:cpu`), on `harp` remote (a pool server
    of this run on 127.0.0.1, mutual TLS, its session in a worker process) and on
    the CPU directly;
  * training step: one forward, backward and Adam step of the small MLP of
    tests/torch/training.py (batch 32), on the same three.
Every HARP figure is printed beside the CPU's as a ratio (HARP time / CPU time for
steps, HARP rate / CPU rate for operators).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "torch"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harp  # noqa: E402
import harp.torch as ht  # noqa: E402
from harness import start_harp_server, tls_paths  # noqa: E402
from training import MLP, data  # noqa: E402


def ops_rate(device: str, n: int) -> float:
    a = torch.randn(64, 64).to(device)
    for _ in range(20):
        a = a * 1.0001
    a.sum().item()
    t0 = time.perf_counter()
    for _ in range(n):
        a = a * 1.0001
    a.sum().item()                        # the value: everything queued has run
    return n / (time.perf_counter() - t0)


def step_time(device: str, steps: int) -> float:
    torch.manual_seed(0)
    model = MLP().to(device)
    x, y = data("mlp")
    x, y = x.to(device), y.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step() -> float:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    step().item()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    from harp.security import ephemeral_pool
    children: list = []
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="harp-torch-bench-") as tmp:
        certs = os.path.join(tmp, "certs")
        ephemeral_pool(Path(certs))
        try:
            _, url = start_harp_server(certs, children)
            _, cli = tls_paths(certs)
            devices = {"local": harp.connect("local:cpu"), "remote": harp.connect(url, tls=cli)}
            sessions = {k: ht.use(d) for k, d in devices.items()}
            for rep in range(a.reps):
                print(f"  rep {rep + 1}/{a.reps}", file=sys.stderr)
                rows.setdefault("cpu ops", []).append(ops_rate("cpu", a.ops))
                rows.setdefault("cpu step", []).append(step_time("cpu", a.steps))
                for where, session in sessions.items():
                    ht.session._current = session
                    rows.setdefault(f"{where} ops", []).append(ops_rate("harp", a.ops))
                    rows.setdefault(f"{where} step", []).append(step_time("harp", a.steps))
            for d in devices.values():
                d.close()
        finally:
            for c in children:
                c.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"torch on harp beside torch on the CPU (torch {torch.__version__}, "
          f"medians of {a.reps}, loadavg {' '.join('%.2f' % x for x in os.getloadavg())})")
    print(f"{'measurement':34} | {'harp':>14} | {'cpu directly':>14} | ratio")
    for where in ("local", "remote"):
        print(f"{'operators/s, ' + where:34} | {med[where + ' ops']:>12.0f}/s | "
              f"{med['cpu ops']:>12.0f}/s | {med[where + ' ops'] / med['cpu ops']:.3f}x rate")
        print(f"{'MLP training step, ' + where:34} | {med[where + ' step'] * 1e3:>11.2f} ms | "
              f"{med['cpu step'] * 1e3:>11.2f} ms | {med[where + ' step'] / med['cpu step']:.1f}x"
              " time")
        print(f"{'per operator, ' + where:34} | {1e6 / med[where + ' ops']:>11.1f} us | "
              f"{1e6 / med['cpu ops']:>11.1f} us |")
    if a.json:
        Path(a.json).write_text(json.dumps({"medians": med, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
