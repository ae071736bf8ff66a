"""`harp trace`: record, report, replay, export and what-if on session traces (harp.trace).

    harp trace record -o run.harptrace [--payloads] -- python my_program.py
    harp trace report run.harptrace [--json]
    harp trace replay run.harptrace --device local:cpu [--timing original] [--json]
    harp trace export run.harptrace --chrome run.json
    harp trace whatif run.harptrace --rtt 200us --bandwidth 10Gbit [--json]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

from ..output import emit_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    rec = sub.add_parser("record", help="run a command with every harp.connect session traced",
                         description="Run COMMAND with HARP_TRACE set, so every session it "
                                     "opens with harp.connect is recorded (a second session "
                                     "of one process writes FILE's stem.2.harptrace, ...).")
    rec.add_argument("-o", "--output", default="harp.harptrace", help="trace file to write")
    rec.add_argument("--payloads", action="store_true",
                     help="also record the bytes of every write (replay then checks reads)")
    rec.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    rep = sub.add_parser("report", help="profile: calls, bytes, kernels, idle time, stalls")
    rep.add_argument("file")
    rep.add_argument("--top", type=int, default=10, help="rows in the kernel and stall tables")
    rep.add_argument("--json", action="store_true", help="print JSON for scripts")

    rpl = sub.add_parser("replay", help="re-execute a trace on a device and check its reads")
    rpl.add_argument("file")
    rpl.add_argument("--device", required=True,
                     help="target: local:cpu, local:BACKEND[:INDEX] or harp://HOST:PORT")
    rpl.add_argument("--timing", choices=("asap", "original"), default="asap",
                     help="asap: back to back; original: keep the recorded time between calls")
    rpl.add_argument("--no-check", action="store_true", help="do not compare read digests")
    rpl.add_argument("--progress", action="store_true",
                     help="show a progress bar on stderr even when it is not a terminal")
    rpl.add_argument("--record", default=None, metavar="OUT",
                     help="record the replay session itself into OUT")
    rpl.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_device_options(rpl)

    exp = sub.add_parser("export", help="convert to the Chrome trace event format (Perfetto)")
    exp.add_argument("file")
    exp.add_argument("--chrome", required=True, metavar="OUT.json",
                     help="write Chrome trace event JSON here ('-' for stdout)")

    wif = sub.add_parser("whatif", help="predict the run time on a remote device over a link")
    wif.add_argument("file")
    wif.add_argument("--rtt", default=None, help="round-trip time, e.g. 200us, 1.5ms")
    wif.add_argument("--bandwidth", default=None,
                     help="link bandwidth, e.g. 10Gbit, 1.2GB/s (both ways unless --down-bandwidth)")
    wif.add_argument("--down-bandwidth", default=None, help="device->host bandwidth, if different")
    wif.add_argument("--measure", default=None, metavar="TARGET",
                     help="measure rtt and bandwidth against this device instead (harp://...)")
    wif.add_argument("--timing", choices=("asap", "original"), default="original",
                     help="original: keep the program's time between calls; asap: drop it")
    wif.add_argument("--top", type=int, default=10, help="calls to blame")
    wif.add_argument("--json", action="store_true", help="print JSON for scripts")
    _add_device_options(wif)


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cert-dir", default=None, help="client certificate directory (harp://)")
    p.add_argument("--tls-ca", default=None, help="CA certificate (or HARP_TLS_CA)")
    p.add_argument("--tls-cert", default=None, help="client certificate (or HARP_TLS_CERT)")
    p.add_argument("--tls-key", default=None, help="client key (or HARP_TLS_KEY)")
    p.add_argument("--trust-client-code", action="store_true",
                   help="local targets: accept numba-python modules from the trace")


def _connect(target: str, args: argparse.Namespace, record: str | None = None) -> Any:
    import harp
    options: dict[str, Any] = {"trace": record or False}
    if target.startswith("local:"):
        if args.trust_client_code:
            options["trust_client_code"] = True
    elif args.tls_ca or args.tls_cert or args.tls_key:
        from harp.security import tls_files
        options["tls"] = tls_files("client", directory=args.cert_dir, ca=args.tls_ca,
                                   cert=args.tls_cert, key=args.tls_key)
    elif args.cert_dir:
        options["cert_dir"] = args.cert_dir
    return harp.connect(target, **options)


def _open(path: str) -> Any:
    from harp.trace import TraceFile
    trace = TraceFile(path, warn=False)
    for w in trace.warnings:
        print(f"harp trace: warning: {w}", file=sys.stderr)
    return trace


def run(args: argparse.Namespace) -> int:
    return {"record": _record, "report": _report, "replay": _replay, "export": _export,
            "whatif": _whatif}[args.action](args)


def _record(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("harp trace record: give a command after --", file=sys.stderr)
        return 2
    env = dict(os.environ, HARP_TRACE=os.path.abspath(args.output))
    if args.payloads:
        env["HARP_TRACE_PAYLOADS"] = "1"
    return subprocess.call(command, env=env)


def _report(args: argparse.Namespace) -> int:
    from harp.trace.report import build_report, render_report
    with _open(args.file) as trace:
        rep = build_report(trace, top=args.top)
    if args.json:
        emit_json(rep)
    else:
        sys.stdout.write(render_report(rep))
    return 0


class _Bar:
    """A one-line progress bar on stderr."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, calls: int, fraction: float) -> None:
        if not self.enabled:
            return
        width = 30
        done = int(width * min(max(fraction, 0.0), 1.0))
        sys.stderr.write(f"\rreplay [{'#' * done}{'.' * (width - done)}] {fraction:4.0%} "
                         f"{calls:,} calls {time.perf_counter() - self.start:.1f} s")
        sys.stderr.flush()

    def end(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _replay(args: argparse.Namespace) -> int:
    from harp.trace.replay import replay
    bar = _Bar(args.progress or sys.stderr.isatty())
    with _open(args.file) as trace:
        device = _connect(args.device, args, args.record)
        try:
            result = replay(trace, device, timing=args.timing, check_digests=not args.no_check,
                            progress=bar)
        finally:
            bar.end()
            device.close()
    if args.json:
        emit_json(dict(result.as_dict(), device=args.device, trace=args.file))
        return 0 if result.ok else 1
    print(f"replayed {result.calls:,} calls of {args.file} on {args.device} in "
          f"{result.seconds * 1e3:.1f} ms (recorded: {result.recorded_seconds * 1e3:.1f} ms, "
          f"timing {result.timing})")
    if result.digests_checked:
        print(f"read digests: {result.digests_matched} of {result.digests_checked} match the "
              "recording")
    for note in result.notes:
        print(f"note: {note}")
    if result.errors_expected:
        print(f"recorded errors reproduced: {result.errors_reproduced} of "
              f"{result.errors_expected}")
    for m in result.mismatches:
        print(f"MISMATCH {m}")
    if result.mismatch_count > len(result.mismatches):
        print(f"... and {result.mismatch_count - len(result.mismatches)} more mismatches")
    print("ok" if result.ok else f"{result.mismatch_count} mismatch(es)")
    return 0 if result.ok else 1


def _export(args: argparse.Namespace) -> int:
    from harp.trace.export import write_chrome
    with _open(args.file) as trace:
        if args.chrome == "-":
            write_chrome(trace, sys.stdout)
            return 0
        n = write_chrome(trace, args.chrome)
    print(f"wrote {n:,} events to {args.chrome} (open it in https://ui.perfetto.dev or "
          "chrome://tracing)", file=sys.stderr)
    return 0


def _whatif(args: argparse.Namespace) -> int:
    from harp.trace.timeline import estimate
    from harp.trace.whatif import Link, measure_link, parse_bandwidth, parse_duration, \
        render_whatif, whatif
    if args.measure:
        device = _connect(args.measure, args)
        try:
            link = measure_link(device)
        finally:
            device.close()
    else:
        if not args.rtt or not args.bandwidth:
            print("harp trace whatif: give --rtt and --bandwidth, or --measure TARGET",
                  file=sys.stderr)
            return 2
        try:
            up = parse_bandwidth(args.bandwidth)
            down = parse_bandwidth(args.down_bandwidth) if args.down_bandwidth else up
            link = Link(parse_duration(args.rtt), up, down)
        except ValueError as exc:
            print(f"harp trace whatif: {exc}", file=sys.stderr)
            return 2
    with _open(args.file) as trace:
        res = whatif(estimate(trace.calls()), link, timing=args.timing, top=args.top)
    if args.json:
        emit_json(res)
    else:
        sys.stdout.write(render_whatif(res))
    return 0
