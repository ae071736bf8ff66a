"""The profile of a trace: calls and time per API, bytes and bandwidth per direction,
kernels by device time, device idle time, and the sync points that stalled longest.

`build_report` returns plain data (what `harp trace report --json` prints);
`render_report` turns it into the terminal tables. Device times are the
estimate of `timeline.py`; client times are measured.
"""
from __future__ import annotations

import datetime as _dt
import io
from collections import defaultdict
from typing import Any

from harp.aten_ops import display_name
from harp.output import table
from harp.units import format_size

from . import format as fmt
from .reader import TraceFile
from .timeline import Timeline, estimate


def format_ns(ns: float) -> str:
    """12.3 ms, 45.6 µs, 1.20 s, 800 ns."""
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns:.0f} ns"


def format_rate(bytes_per_s: float | None) -> str:
    if not bytes_per_s:
        return "-"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.2f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def _stream_name(stream: int) -> str:
    return "default" if stream == 0 else f"{stream:#x}"


def build_report(trace: TraceFile, *, top: int = 10, timeline: Timeline | None = None
                 ) -> dict[str, Any]:
    """Everything `harp trace report` shows, as JSON-ready data."""
    tl = timeline or estimate(trace.calls())
    calls = tl.calls
    span = tl.span_ns or 1

    per_api: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])
    errors = []
    for c in calls:
        row = per_api[c.api]
        row[0] += 1
        row[2] += c.duration_ns
        row[3] = max(row[3], c.duration_ns)
        if c.error is not None:
            row[1] += 1
            if len(errors) < top:
                errors.append({"seq": c.seq, "api": c.api, "error": str(c.error)})
    client_ns = sum(r[2] for r in per_api.values()) or 1
    apis = [{"api": api, "calls": int(n), "errors": int(e), "total_ms": t / 1e6,
             "mean_us": t / n / 1e3, "max_us": mx / 1e3, "share": t / client_ns}
            for api, (n, e, t, mx) in sorted(per_api.items(), key=lambda kv: -kv[1][2])]

    moved = {"host->device": [0, 0, 0.0], "device->host": [0, 0, 0.0],
             "device->device": [0, 0, 0.0]}
    for c in calls:
        if c.error is not None:
            continue
        if c.op == fmt.WRITE:
            row, ns = moved["host->device"], c.duration_ns
        elif c.op == fmt.READ:
            row, ns = moved["device->host"], c.duration_ns
        elif c.op == fmt.COPY:
            dop = tl.by_seq.get(c.seq)
            row, ns = moved["device->device"], dop.duration_ns if dop else 0.0
        else:
            continue
        nbytes = c["nbytes"]
        row[0] += 1
        row[1] += nbytes if isinstance(nbytes, int) else 0
        row[2] += ns
    transfers = [{"direction": d, "calls": n, "bytes": b, "seconds": ns / 1e9,
                  "bytes_per_s": b / (ns / 1e9) if ns else None,
                  "time_basis": "device (estimated)" if d == "device->device" else
                  "client, inside the calls"}
                 for d, (n, b, ns) in moved.items()]

    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for op in tl.ops:
        if op.kind == "kernel":
            row = per_kernel[display_name(op.label)]
            row[0] += 1
            row[1] += op.duration_ns
            row[2] += op.fitted
    busy = tl.busy_ns or 1
    kernels = [{"kernel": name, "launches": int(n), "total_ms": t / 1e6,
                "mean_us": t / n / 1e3, "share_of_busy": t / busy,
                "fitted_share": fitted / n}
               for name, (n, t, fitted) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])]

    gaps = sorted(tl.idle_gaps, key=lambda g: g[0] - g[1])[:top]
    t0 = tl.start_ns          # report times are ms since the first call began
    device = {"span_ms": tl.span_ns / 1e6, "busy_ms": tl.busy_ns / 1e6,
              "idle_ms": tl.idle_ns / 1e6, "idle_share": tl.idle_ns / span,
              "longest_idle": [{"start_ms": (s - t0) / 1e6, "end_ms": (e - t0) / 1e6,
                                "ms": (e - s) / 1e6} for s, e in gaps]}

    syncs = sorted(tl.syncs, key=lambda s: -s.call.duration_ns)[:top]
    stalls = [{"seq": s.call.seq, "api": s.call.api, "at_ms": (s.call.t0 - t0) / 1e6,
               "waited_ms": s.call.duration_ns / 1e6, "beyond_fastest_ms": s.excess_ns / 1e6,
               "streams": [_stream_name(x) for x in s.streams], "pending_ops": s.waited_ops,
               "blocked": s.blocked, "nbytes": s.call.get("nbytes")}
              for s in syncs]

    created = trace.header.get("created_unix_ns")
    return {
        "trace": {
            "path": trace.path, "format_version": list(trace.version),
            "device": trace.device, "meta": trace.header.get("meta") or {},
            "created": _dt.datetime.fromtimestamp(created / 1e9, _dt.timezone.utc).isoformat()
            if created else None,
            "payloads": trace.payloads, "complete": trace.complete,
            "warnings": list(trace.warnings), "calls": len(calls),
            "span_ms": tl.span_ns / 1e6, "client_ms_in_calls": client_ns / 1e6,
            "sync_calls": sum(1 for c in calls if c.sync),
        },
        "apis": apis, "transfers": transfers, "kernels": kernels[:top] if top else kernels,
        "device_time": device, "sync_stalls": stalls, "errors": errors,
        "model": "device times are estimated from client-side call times "
                 "(see harp.trace.timeline); client times are measured",
    }


def render_report(rep: dict[str, Any]) -> str:
    """The report as terminal tables."""
    out = io.StringIO()
    t = rep["trace"]
    dev = t["device"]
    print(f"trace {t['path']}: {t['calls']:,} calls over {t['span_ms']:.1f} ms on "
          f"{dev.get('name', '?')} ({dev.get('backend', '?')}), recorded {t['created'] or '?'}; "
          f"payloads {'recorded' if t['payloads'] else 'not recorded'}", file=out)
    for w in t["warnings"]:
        print(f"warning: {w}", file=out)
    print("\ncalls by API (client time inside the calls)", file=out)
    table(["api", "calls", "errors", "total ms", "mean µs", "max µs", "share"],
          [[a["api"], f"{a['calls']:,}", a["errors"] or "", f"{a['total_ms']:.2f}",
            f"{a['mean_us']:.1f}", f"{a['max_us']:.1f}", f"{a['share']:.0%}"]
           for a in rep["apis"]], out=out)
    print("\nbytes moved", file=out)
    table(["direction", "calls", "bytes", "time ms", "rate", "time is"],
          [[x["direction"], x["calls"], format_size(x["bytes"]), f"{x['seconds'] * 1e3:.2f}",
            format_rate(x["bytes_per_s"]), x["time_basis"]] for x in rep["transfers"]], out=out)
    if rep["kernels"]:
        print("\nkernels by device time (estimated)", file=out)
        table(["kernel", "launches", "total ms", "mean µs", "share of busy"],
              [[k["kernel"], f"{k['launches']:,}", f"{k['total_ms']:.3f}", f"{k['mean_us']:.1f}",
                f"{k['share_of_busy']:.0%}"] for k in rep["kernels"]], out=out)
    d = rep["device_time"]
    print(f"\ndevice: busy {d['busy_ms']:.2f} ms, idle {d['idle_ms']:.2f} ms "
          f"({d['idle_share']:.0%} of {d['span_ms']:.2f} ms)", file=out)
    if d["longest_idle"]:
        print("  longest idle gaps: " + ", ".join(
            f"{g['ms']:.2f} ms at {g['start_ms']:.2f} ms" for g in d["longest_idle"][:5]),
            file=out)
    if rep["sync_stalls"]:
        print("\nsync points that stalled longest", file=out)
        table(["seq", "api", "at ms", "waited ms", "beyond fastest ms", "streams",
               "pending ops"],
              [[s["seq"], s["api"] + (f" {format_size(s['nbytes'])}" if s["nbytes"] else ""),
                f"{s['at_ms']:.2f}", f"{s['waited_ms']:.3f}", f"{s['beyond_fastest_ms']:.3f}",
                ",".join(s["streams"]) or "-", s["pending_ops"]] for s in rep["sync_stalls"]],
              out=out)
    if rep["errors"]:
        print("\nerrors", file=out)
        for e in rep["errors"]:
            print(f"  #{e['seq']} {e['api']}: {e['error']}", file=out)
    return out.getvalue()
