"""`harp demo`: one small workload on the local cpu device, on an embedded pool
server over mutual TLS, through a lease from an embedded scheduler, and on every
other backend available here (cuda, opencl, onnx); each run checked against
NumPy, with a table of timings.

Needs nothing set up: everything listens on loopback only, with a throwaway CA
and certificates made in a temporary directory.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import catalog
from ..device import Device
from ..types import Scalar
from ..output import emit_json, table
from .common import positive_count, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=positive_count, default=1 << 20,
                   help="vector length (default 1Mi = 1048576)")
    p.add_argument("--gemm", type=positive_int, default=256,
                   help="matrix size for gemm (default 256)")
    p.add_argument("--local-only", action="store_true", help="skip the embedded pool server")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def workload(device: Device, n: int, m: int, seed: int = 0) -> dict[str, Any]:
    """axpy, element-wise multiply, a reduction and a gemm; every result checked against NumPy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n, dtype=np.float32)
    y = rng.standard_normal(n, dtype=np.float32)
    a = rng.standard_normal((m, m), dtype=np.float32)
    b = rng.standard_normal((m, m), dtype=np.float32)
    alpha = np.float32(2.5)
    t = {}
    t0 = time.perf_counter()
    lib = device.load_module(catalog.CATALOG_IMAGE, "catalog")
    axpy, mul = device.function(lib, "axpy_f32"), device.function(lib, "mul_f32")
    rsum, gemm = device.function(lib, "reduce_sum_f32"), device.function(lib, "gemm_f32")
    dx, dy, dz = device.alloc(x.nbytes), device.alloc(y.nbytes), device.alloc(x.nbytes)
    ds = device.alloc(4)
    da, db, dc = device.alloc(a.nbytes), device.alloc(b.nbytes), device.alloc(a.nbytes)
    device.write(dx, 0, x)
    device.write(dy, 0, y)
    device.write(da, 0, a)
    device.write(db, 0, b)
    device.synchronize()
    t["upload"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    n64, m64 = Scalar(n, "int64"), Scalar(m, "int64")
    device.launch(axpy, 256, 256, [dy, dx, alpha, n64])
    device.launch(mul, 256, 256, [dz, dx, dy, n64])
    device.launch(rsum, 1, 256, [ds, dz, n64])
    tiles = -(-m // 16)
    device.launch(gemm, (tiles, tiles), (16, 16), [dc, da, db, m64, m64, m64,
                                                       np.float32(1), np.float32(0)])
    device.synchronize()
    t["kernels"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    got_y = np.frombuffer(device.read(dy, 0, y.nbytes), np.float32)
    got_s = np.frombuffer(device.read(ds, 0, 4), np.float32)[0]
    got_c = np.frombuffer(device.read(dc, 0, a.nbytes), np.float32).reshape(m, m)
    t["download"] = time.perf_counter() - t2
    for buf in (dx, dy, dz, ds, da, db, dc):
        device.free(buf)
    device.synchronize()
    t["total"] = time.perf_counter() - t0
    want_y = alpha * x + y
    want_s = np.sum((x * want_y).astype(np.float64))
    checks = {
        "axpy": bool(np.allclose(got_y, want_y, rtol=1e-6, atol=1e-6)),
        "reduce_sum": bool(np.isclose(got_s, want_s, rtol=1e-3, atol=1e-2)),
        "gemm": bool(np.allclose(got_c, a @ b, rtol=1e-4, atol=1e-3)),
    }
    return {"checks": checks, "ok": all(checks.values()), "seconds": t}


def _embedded_pool(tmp: Path, results: list, args: argparse.Namespace) -> None:
    """A scheduler and a pool server on loopback with throwaway certificates: run the
    workload once on a direct session and once through a lease with a memory quota."""
    import harp
    from harp.backends import load_backend
    from harp.client import SchedulerClient
    from harp.scheduler import open_scheduler
    from harp.security import (TlsFiles, channel_credentials, ephemeral_pool, issue,
                               server_credentials)
    from harp.server import PoolServer
    from harp.server.registration import Registrar

    server_files, client_files = ephemeral_pool(tmp)
    # the pool server registers under the name its certificate carries
    demo_files = TlsFiles(server_files.ca, *issue(tmp, "server", "demo", days=1))
    server = PoolServer(load_backend("cpu"), name="demo")
    address = server.start(["127.0.0.1:0"], server_credentials(server_files), server_files)[0]
    scheduler = open_scheduler(tmp / "scheduler", heartbeat_s=1.0)
    registrar = None
    try:
        with harp.connect(f"harp://{address}", tls=client_files) as dev:
            results.append((f"harp://{address} (mTLS)", workload(dev, args.size, args.gemm)))
        scheduler_address = scheduler.start(["127.0.0.1:0"],
                                            server_credentials(server_files))[0]
        import grpc
        from harp.transport import channel_options
        registrar = Registrar(server, grpc.secure_channel(
            scheduler_address, channel_credentials(demo_files), options=channel_options()),
            endpoints=[f"harp://{address}"])
        server.authorizer = registrar.authorize
        registrar.start()
        with SchedulerClient(f"harp://{scheduler_address}", tls=client_files) as pool:
            lease = pool.attach("cpu", memory=256 << 20, share=0.5, client_name="harp demo")
            try:
                with harp.connect(lease, tls=client_files) as dev:
                    results.append((f"lease {lease.lease_id} (256 MiB quota)",
                                    workload(dev, args.size, args.gemm)))
            finally:
                pool.detach(lease.lease_id)
    finally:
        if registrar is not None:
            registrar.stop()
        server.stop()
        scheduler.stop()


def run(args: argparse.Namespace) -> int:
    import harp
    results: list = []
    with harp.connect("local:cpu") as dev:
        results.append(("local:cpu", workload(dev, args.size, args.gemm)))
    if not args.local_only:
        with tempfile.TemporaryDirectory(prefix="harp-demo-") as tmp:
            _embedded_pool(Path(tmp), results, args)
    unavailable = _other_backends(results, args)
    ok = all(r["ok"] for _, r in results)
    if args.json:
        emit_json({"ok": ok, "size": args.size, "gemm": args.gemm,
                   "runs": [dict(device=name, **r) for name, r in results],
                   "unavailable": unavailable})
    else:
        print(f"HARP demo: axpy, multiply and sum over {args.size:,} float32, "
              f"gemm {args.gemm}x{args.gemm}; results checked against NumPy\n")
        ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
        table(["device", "check", "upload ms", "kernels ms", "download ms", "total ms"],
              [[name, "ok" if r["ok"] else "MISMATCH " + ",".join(k for k, v in
                                                                 r["checks"].items() if not v),
                ms(r["seconds"]["upload"]), ms(r["seconds"]["kernels"]),
                ms(r["seconds"]["download"]), ms(r["seconds"]["total"])] for name, r in results])
        for name, why in unavailable.items():
            print(f"not run here: local:{name} ({why})")
    return 0 if ok else 1


def _other_backends(results: list, args: argparse.Namespace) -> dict[str, str]:
    """Run the workload on device 0 of every other backend available here; return the
    unavailable ones with the reason."""
    from ..backends import backend_names, load_backend
    from ..errors import HarpError
    unavailable: dict[str, str] = {}
    for name in backend_names():
        if name == "cpu":
            continue
        try:
            backend = load_backend(name)
            ok, why = backend.available()
            if not ok:
                unavailable[name] = why
                continue
            with backend.open(0) as dev:
                results.append((f"local:{name}", workload(dev, args.size, args.gemm)))
        except HarpError as exc:
            unavailable[name] = str(exc)
    return unavailable
