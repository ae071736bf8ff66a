#!/usr/bin/env python3
"""bench.py -- HARP's figures beside the transport limits of this machine, in one run.

Every figure is a median over --reps repetitions (spread = (max-min)/median),
measured interleaved with the limit it is compared to, so that drift on a noisy
machine hits both sides alike. Each remote server runs in its own OS process on
127.0.0.1 (port 0) with mutual TLS, certificates from harp.security.ephemeral_pool
in a temporary directory:

  * HARP pool server      `harp server serve` (cpu backend)
  * bare gRPC server      a child of this script (--role grpc-server): generic
                          handlers on raw bytes, no protobuf; also serves the
                          "naive" design (one unary call per device call)
  * raw TLS server/client children of this script (--role raw-server/raw-client):
                          Python ssl, TLS 1.3, the cipher suite gRPC negotiates

Measurements (the client is this process unless said otherwise):
  1. bulk write/read of --bulk-mib MiB through a RemoteDevice, vs a bare gRPC
     stream of 1 MiB messages and vs a raw TLS socket.
  2. sync round trips: RemoteDevice.synchronize() and a 64-byte read, vs a bare
     gRPC bidi ping-pong of 64-byte messages.
  3. async launches: N x launch(noop) + synchronize(), vs N 64-byte records sent
     wire.BATCH_CALLS per message over a bare gRPC stream with one ack at the end,
     vs the target of 200,000/s, and vs
  4. the naive design: one unary gRPC call per launch.
  5. the local path: harp.connect("local:cpu") vs CpuBackend().open(0) directly
     (in-process): noop launches/s and 1 MiB write+synchronize/s.
  6. isolation: the same pool server with sessions in worker processes (the default)
     beside one with --isolation thread, interleaved: async launches, synchronize(),
     bulk write and read, and connect-to-first-sync (what the relay costs).
  7. same host: a pool server on a unix socket, sessions with a shared-memory window
     beside sessions that move bulk data over the stream, interleaved: 256 MiB write
     and read vs memcpy of the same bytes, synchronize() and 64-byte reads.
  8. many sessions: aggregate noop launches and 1 MiB writes, and fairness, for 1, 2, 4,
     ... 64 sessions beside as many bare gRPC streams (a connection each) of records and
     of 1 MiB messages, and the server's memory after.
See benchmarks/README.md for what each row compares and how to read it. The
sections live beside this file, one module per kind of measurement
(remote_rows, isolation_rows, samehost_rows, sessions_rows, local_rows), on a common harness
(harness.py: child processes, TLS material, timing), the limit peers
(limits.py), the report (report.py) and the profiler (profiling.py).

Usage:
  python benchmarks/bench.py                      # full run (~5 min on 2 cores)
  python benchmarks/bench.py --quick              # smoke run (~20 s)
  python benchmarks/bench.py --reps 7 --json out.json
  python benchmarks/bench.py --sections bulk,sync # a subset
  python benchmarks/bench.py --profile results/profile   # py-spy + cProfile of the
                                                  # launch, bulk-write and sync paths
Deps: the HARP venv (grpcio, numpy, msgpack, cryptography); py-spy for --profile.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

from harness import (GRPC_OPTS, PLACEMENT, MiB, Watchdog, grpc_cipher_probe, log, machine_meta,
                     settle, start_harp_server, start_role, suite_conf, tls_paths)
from isolation_rows import IsolationSection
from limits import role_grpc_server, role_raw_client, role_raw_server
from local_rows import LocalSection
from profiling import role_profile_client, run_profile
from remote_rows import RemoteSections
from report import build_rows, print_report, summarize
from samehost_rows import SameHostSection
from sessions_rows import SessionsSection, role_sessions_client

class Bench(RemoteSections, IsolationSection, SameHostSection, SessionsSection, LocalSection):
    """One run: every section's series, its errors, and the children it started."""
    def __init__(self, a):
        self.a = a
        self.series = {}      # name -> {"unit", "vals"}
        self.errors = {}      # section -> message
        self.meta = {}
        self.children = []
        self.dog = Watchdog(self.children)

    def put(self, name, val, unit):
        self.series.setdefault(name, {"unit": unit, "vals": []})["vals"].append(val)

    # -- bare gRPC helpers ---------------------------------------------------
    def grpc_channel(self, port, own_connection=False):
        """A bare gRPC channel to the bench server; `own_connection`: not sharing a TCP+TLS
        connection with this process's other channels to it (gRPC's default)."""
        import grpc
        from harp.security import channel_credentials
        _, cli = tls_paths(self.a.cert_dir)
        options = GRPC_OPTS + ([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])
        ch = grpc.secure_channel("127.0.0.1:%s" % port, channel_credentials(cli),
                                 options=options)
        grpc.channel_ready_future(ch).result(timeout=20)
        return ch

    def connect_harp(self, **options):
        """A session on the HARP server; one whose frames are to move to its data channel
        (the default) is returned once they have (its open runs in the background)."""
        import harp
        _, cli = tls_paths(self.a.cert_dir)
        dev = harp.connect(self.url, tls=cli, **options)
        deadline = time.time() + 10
        while dev.data_channel and options.get("frames_on_data", True) and \
                not dev.frames_on_data and time.time() < deadline:
            dev.synchronize()
        return dev

    def bulk_pass(self, dev, mode, data, out):
        """One timed write and read of `data`, after an untimed write and read that fault
        in the pages of the buffer and of a same-host session's fresh window (a new session's
        first transfer pays those once; the rows are the steady rate)."""
        n = data.nbytes
        buf = dev.alloc(n)
        dev.write(buf, 0, data)
        dev.synchronize()
        dev.read(buf, 0, n, out=out)
        t0 = time.perf_counter()
        dev.write(buf, 0, data)
        dev.synchronize()
        self.put(f"{mode}: bulk write", n / (time.perf_counter() - t0) / 1e9, "GB/s")
        t0 = time.perf_counter()
        dev.read(buf, 0, n, out=out)
        self.put(f"{mode}: bulk read", n / (time.perf_counter() - t0) / 1e9, "GB/s")
        return buf

    # -- orchestration ---------------------------------------------------------------
    def run(self):
        a = self.a
        from harp.security import ephemeral_pool
        from pathlib import Path
        ephemeral_pool(Path(a.cert_dir))
        sections = [s for s in ("bulk", "sync", "launch", "isolation", "samehost", "sessions",
                                "local") if s in a.sections]
        remote = any(s in sections for s in ("bulk", "sync", "launch", "isolation",
                                             "samehost", "sessions"))
        try:
            if remote:
                self.dog.arm(120, "server start-up")
                log("starting servers ...")
                suite = grpc_cipher_probe(a.cert_dir)
                self.meta["grpc_tls_cipher"] = suite or "probe failed"
                self.meta["raw_tls_forced_suite"] = suite or "TLS_AES_128_GCM_SHA256"
                raw_env = dict(os.environ, OPENSSL_CONF=suite_conf(
                    a.cert_dir, suite or "TLS_AES_128_GCM_SHA256"))
                # room for the sessions section's 64 sessions of one identity
                self.harp_server, self.url = start_harp_server(
                    a.cert_dir, self.children,
                    extra=["--max-sessions", "80", "--max-sessions-per-identity", "80"])
                if "isolation" in sections:
                    _, self.thread_url = start_harp_server(
                        a.cert_dir, self.children, extra=["--isolation", "thread"])
                if "samehost" in sections:
                    sock = os.path.join(tempfile.mkdtemp(prefix="harp-b-"), "pool.sock")
                    _, self.unix_url = start_harp_server(a.cert_dir, self.children,
                                                         listen="unix:" + sock)
                _, ready = start_role("grpc-server", a, self.children)
                self.grpc_port = ready[0]
                if "bulk" in sections:
                    _, ready = start_role("raw-server", a, self.children, env=raw_env)
                    self.raw_client, _ = start_role("raw-client", a, self.children,
                                                    ["--port", ready[0]], env=raw_env, stdin=True)
                self.meta["harp_url"] = self.url
            budgets = {"bulk": 60 + 16 * a.reps * a.bulk / (256 * MiB),
                       "sync": 40 + 6 * a.reps * a.dur,
                       "launch": 60 + 10 * a.reps * max(a.launch_s, a.dur),
                       "isolation": 90 + 2 * a.reps * (30 * a.bulk / (256 * MiB) + 4 * a.dur
                                                         + 2 * a.launch_s),
                       "samehost": 60 + 2 * a.reps * (10 * a.bulk / (256 * MiB) + 2 * a.dur),
                       "sessions": 180 + a.reps * 7 * 4 * (max(a.dur, 1.0) + 6),
                       "local": 40 + 20 * a.reps * a.local_s}
            for s in sections:
                waited, idle = settle()
                log("[%s] ... (machine %.0f%% idle%s)" % (
                    s, 100 * idle, ", after %.0f s of waiting for it to settle" % waited
                    if waited >= 1 else ""))
                self.meta["section_idle_" + s] = round(idle, 2)
                t0 = time.time()
                self.dog.arm(budgets[s], "section " + s)
                try:
                    getattr(self, "sec_" + s)()
                except Exception as exc:
                    import traceback
                    traceback.print_exc()
                    self.errors[s] = "%s: %s" % (type(exc).__name__, exc)
                    if self.dog.fired:
                        break
                finally:
                    self.dog.disarm()
                self.meta["section_s_" + s] = round(time.time() - t0, 1)
        finally:
            self.dog.disarm()
            for c in reversed(self.children):
                try:
                    c.stop()
                except Exception as exc:
                    log("stopping %s: %s" % (c.name, exc))


# ============================================================================
# main
# ============================================================================

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, 3 reps (< 1 min)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; quick 3)")
    ap.add_argument("--json", help="write raw per-rep values, medians and meta here")
    ap.add_argument("--placement", choices=["split", "free"], default="split",
                    help="split (default on 2+ cores): servers on core 0, clients on core 1, "
                         "for HARP and every limit alike, so runs compare; free: unpinned")
    ap.add_argument("--sections", default="bulk,sync,launch,isolation,samehost,sessions,local",
                    help="comma list of: bulk, sync, launch, isolation, samehost, sessions, "
                         "local")
    ap.add_argument("--bulk-mib", type=int, default=None, help="bulk size (default 256; quick 64)")
    ap.add_argument("--dur", type=float, default=None,
                    help="seconds per rate measurement (default 1.0; quick 0.3)")
    ap.add_argument("--launch-s", type=float, default=None,
                    help="target seconds per HARP launch rep (default 1.5; quick 0.5)")
    ap.add_argument("--local-s", type=float, default=None,
                    help="seconds per local-path sample (default 0.25; quick 0.1)")
    ap.add_argument("--profile", metavar="DIR",
                    help="instead of the benchmark, profile the launch and bulk-write paths "
                         "(client cProfile + py-spy on client and `harp server serve`)")
    ap.add_argument("--profile-n", type=int, default=300_000, help=argparse.SUPPRESS)
    # child roles
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--cert-dir", help=argparse.SUPPRESS)
    ap.add_argument("--bulk", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--what", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.role:
        roles = {"grpc-server": role_grpc_server, "raw-server": role_raw_server,
                 "raw-client": role_raw_client, "profile-client": role_profile_client,
                 "sessions-client": role_sessions_client}
        roles[a.role](a)
        return 0

    cpus = sorted(os.sched_getaffinity(0))
    if a.placement == "split" and len(cpus) >= 2:
        PLACEMENT["server"], PLACEMENT["client"] = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, PLACEMENT["client"])
    q = a.quick
    a.reps = a.reps or (3 if q else 5)
    a.bulk = (a.bulk_mib or (64 if q else 256)) * MiB
    a.dur = a.dur or (0.3 if q else 1.0)
    a.launch_s = a.launch_s or (0.5 if q else 1.5)
    a.local_s = a.local_s or (0.1 if q else 0.25)
    a.sections = set(a.sections.split(","))

    # A trace recorder around the devices would be measured too: keep it off.
    for var in ("HARP_TRACE", "HARP_TRACE_PAYLOADS"):
        os.environ.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="harp-bench-") as tmp:
        a.cert_dir = os.path.join(tmp, "certs")
        if a.profile:
            run_profile(a)
            return 0
        t0 = time.time()
        meta = machine_meta(a)
        b = Bench(a)
        b.meta = meta

        def on_term(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, on_term)
        try:
            b.run()
        except KeyboardInterrupt:
            b.errors["interrupted"] = "interrupted"
        meta["loadavg_end"] = " ".join("%.2f" % x for x in os.getloadavg())
        meta["elapsed_s"] = round(time.time() - t0, 1)
        R = {"meta": meta, "series": b.series, "errors": b.errors}
        R["rows"] = build_rows(R)
        for name, s in b.series.items():
            s["median"], s["spread_pct"] = summarize(s["vals"])
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            with open(a.json, "w") as f:
                json.dump(R, f, indent=1)
        print_report(R)
        return 1 if b.errors else 0


if __name__ == "__main__":
    sys.exit(main())
