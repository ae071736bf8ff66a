"""`harp server`: run a pool server for this machine's devices, or drain one."""
from __future__ import annotations

import argparse
import socket

from ..errors import ArgumentError
from ..output import emit_json
from .common import (add_metrics_options, add_scheduler_options, add_tls_server_options, count,
                     listen_address, metrics_endpoint, positive_float, positive_int, say,
                     scheduler_address, scheduler_addresses, scheduler_client, server_credentials,
                     server_tls, size, start_metrics, wait_for_signal)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve devices until interrupted")
    add_serve_arguments(serve)
    drain = sub.add_parser("drain", help="give a pool server no new leases (--undo: again); "
                                         "admins only")
    drain.add_argument("server", help="server name or endpoint")
    drain.add_argument("--undo", action="store_true")
    drain.add_argument("--json", action="store_true")
    add_scheduler_options(drain)


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--backend", default="cpu", help="backend whose devices to serve")
    serve.add_argument("--listen", action="append", default=[], type=listen_address,
                       help="address to listen on, HOST:PORT or unix:/PATH (repeatable; "
                            "default 127.0.0.1:50051; port 0 picks a free one)")
    serve.add_argument("--name", default="",
                       help="server name, unique in the pool (default: the name in the server "
                            "certificate; with --scheduler it must be that name)")
    add_tls_server_options(serve, "server")
    serve.add_argument("--scheduler", default=None, type=scheduler_addresses,
                       help="register with this scheduler and admit only sessions with its "
                            "lease tokens (harp://HOST:PORT; replicas: several, "
                            "comma-separated)")
    serve.add_argument("--advertise", action="append", default=[],
                       help="endpoint clients should dial, e.g. harp://gpu1.example.org:50051 "
                            "(repeatable; default: the listen addresses)")
    serve.add_argument("--trust-client-code", action="store_true",
                       help="accept kernels as source and compile or run them here "
                            "(numba-python, cuda-source, opencl-source): for development and tests only")
    serve.add_argument("--memory", default=None, type=size,
                       help="memory per device, e.g. 4GiB (cpu: its size; others: a cap)")
    serve.add_argument("--devices", type=positive_int, default=1,
                       help="cpu backend: number of devices")
    serve.add_argument("--isolation", choices=["process", "thread"], default="process",
                       help="process (default): each session in a worker process of its own, "
                            "so tenants cannot reach each other's memory or crash each other; "
                            "thread: sessions share this process (development and benchmarks "
                            "only: it does not isolate tenants)")
    serve.add_argument("--warm-workers", type=count, default=4,
                       help="session worker processes kept started ahead (default 4)")
    serve.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                       help="do not offer same-host clients (on a unix socket) a shared-memory "
                            "window for bulk data; their bulk data then takes the stream")
    serve.add_argument("--no-data-channel", dest="data_channel", action="store_false",
                       help="do not offer TCP clients a mutual-TLS data channel beside the "
                            "stream for bulk data; their bulk data then takes the stream")
    serve.add_argument("--max-sessions", type=positive_int, default=64,
                       help="most sessions open at once (default 64)")
    serve.add_argument("--max-sessions-per-lease", type=positive_int, default=8,
                       help="most sessions one lease may hold on this server (default 8)")
    serve.add_argument("--max-sessions-per-identity", type=positive_int, default=32,
                       help="most sessions one client identity may hold (default 32)")
    serve.add_argument("--idle-timeout", type=positive_float, default=1800.0,
                       help="end sessions that send nothing for this many seconds (default 1800)")
    serve.add_argument("--trace-dir", default=None,
                       help="record every session into DIR/SESSION.harptrace (harp trace ...)")
    add_metrics_options(serve)


def backend_options(args: argparse.Namespace) -> dict:
    """`--memory` caps every backend's devices; `--devices` is the cpu backend's count."""
    opts: dict = {"devices": args.devices} if args.backend == "cpu" else {}
    if args.memory:
        opts["memory"] = args.memory
    return opts


def start_pool_server(args: argparse.Namespace, name: str = "") -> tuple:
    """Start a pool server (and its scheduler link) from parsed options; returns
    (server, registrar, endpoints)."""
    from harp.backends import load_backend
    from harp.errors import BackendError
    from harp.server import PoolServer

    cert_name = ""
    if not args.insecure:
        from harp.security import identity_from_pem
        cert_name = identity_from_pem(server_tls(args).load()[1]).name
    name = name or args.name or cert_name
    if args.scheduler and not args.insecure and name != cert_name:
        raise ArgumentError(
            f"a pool server registers under the name its certificate carries: {cert_name!r}, "
            f"not {name!r}; issue one with `harp certs issue server {name}` and pass "
            f"--cert-name {name}")
    backend = load_backend(args.backend, **backend_options(args))
    ok, reason = backend.available()
    if not ok:
        raise BackendError(f"backend {args.backend} is unavailable here: {reason}")
    wrap = None
    if getattr(args, "trace_dir", None):
        from pathlib import Path
        from harp.trace import SessionTracer
        trace_dir = Path(args.trace_dir)
        trace_dir.mkdir(parents=True, exist_ok=True)
        wrap = SessionTracer(trace_dir)
    server = PoolServer(backend, name=name or "pending",
                        trust_client_code=args.trust_client_code, max_sessions=args.max_sessions,
                        max_sessions_per_lease=args.max_sessions_per_lease,
                        max_sessions_per_identity=args.max_sessions_per_identity,
                        idle_timeout_s=args.idle_timeout, isolation=args.isolation,
                        warm_workers=args.warm_workers, wrap_device=wrap,
                        shared_memory=args.shared_memory, data_channel=args.data_channel)
    bound = server.start(args.listen or ["127.0.0.1:50051"], server_credentials(args),
                         None if args.insecure else server_tls(args))
    if not name:
        tcp = next((a for a in bound if not a.startswith("unix")), bound[0])
        server.name = f"{socket.gethostname()}-{tcp.rpartition(':')[2]}"
    scheme = "harp+insecure" if args.insecure else "harp"
    endpoints = args.advertise or [f"{scheme}://{a}" for a in bound]
    registrar = None
    if args.scheduler:
        from harp.client.pool import scheduler_channel
        from harp.proto.scheduler_pb2_grpc import SchedulerStub
        from harp.replicas import ReplicaSet, split_addresses
        from harp.server.registration import Registrar
        # The server's own certificate (server + client usage) proves to the scheduler
        # that this peer is the pool server of that name.
        tls = None if args.insecure else server_tls(args)
        replicas = ReplicaSet(split_addresses(scheduler_address(args)),
                              lambda address: scheduler_channel(address, tls=tls), SchedulerStub)
        registrar = Registrar(server, replicas, endpoints=endpoints)
        server.authorizer = registrar.authorize
        try:
            registrar.start()
        except BaseException:
            server.stop(grace=0)
            raise
    return server, registrar, endpoints


def run(args: argparse.Namespace) -> int:
    if args.action == "drain":
        with scheduler_client(args, admin=True) as scheduler:
            info = scheduler.drain(args.server, undo=args.undo)
        if args.json:
            emit_json(info)
        else:
            print(f"server {info['name']} is {info['state']}")
        return 0
    metrics = metrics_endpoint(args)
    server, registrar, endpoints = start_pool_server(args)
    for endpoint in endpoints:
        say(f"HARP pool server {server.name} listening on {endpoint} "
            f"({server.backend.device_count()} {args.backend} device(s), "
            f"{server.isolation} isolation)"
            + (f", leases from {args.scheduler}" if registrar else ""))
    try:
        if metrics is not None:
            from harp.server.metrics import PoolCollector
            metrics.registry.register(PoolCollector(server))
            start_metrics(metrics)
        wait_for_signal()
    finally:
        say("stopping: ending sessions")
        if metrics is not None:
            metrics.stop()
        if registrar is not None:
            registrar.stop()
        server.stop(grace=2.0)
    return 0
