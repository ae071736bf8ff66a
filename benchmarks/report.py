"""The report: rows of HARP's figures beside their limits, as ratios of medians."""
from __future__ import annotations

import json
import statistics

from harness import LAUNCH_TARGET, MiB

# ============================================================================
# report
# ============================================================================

def summarize(vals):
    med = statistics.median(vals)
    spread = (max(vals) - min(vals)) / med * 100 if med else 0.0
    return med, spread


def fmt(v, unit):
    if unit == "GB/s":
        return "%.3f GB/s" % v
    if unit == "us":
        return "%.2f us" % v
    if unit == "ratio":
        return "%.2f" % v
    if v >= 1e6:
        return "%.2fM %s" % (v / 1e6, unit)
    if v >= 1e4:
        return "%.1fk %s" % (v / 1e3, unit)
    return "%.0f %s" % (v, unit)


def row_specs(per):
    """(measurement, harp series, limit series or number, limit name, min ratio or None)."""
    return [
        ("bulk write", "harp bulk write", "bare gRPC client-stream 1MiB msgs",
         "bare gRPC client-stream, 1 MiB msgs", 0.9),
        ("bulk write", "harp bulk write", "raw TLS send", "raw TLS 1.3 socket send", 0.75),
        ("bulk write", "harp bulk write", "bare gRPC client-stream + HARP's 2 copies",
         "bare gRPC client-stream + 2 copies", None),
        ("bulk read", "harp bulk read", "bare gRPC server-stream 1MiB msgs",
         "bare gRPC server-stream, 1 MiB msgs", 0.9),
        ("bulk read", "harp bulk read", "raw TLS recv", "raw TLS 1.3 socket recv", 0.75),
        ("bulk read", "harp bulk read", "bare gRPC server-stream + HARP's 2 copies",
         "bare gRPC server-stream + 2 copies", None),
        ("bulk write", "harp bulk write", "harp bulk write, stream only",
         "HARP on the gRPC stream only", None),
        ("bulk read", "harp bulk read", "harp bulk read, stream only",
         "HARP on the gRPC stream only", None),
        ("sync round trip: synchronize()", "harp synchronize()", "bare gRPC bidi ping-pong 64B",
         "bare gRPC bidi ping-pong 64B", 0.9),
        ("sync round trip: read 64B", "harp read 64B", "bare gRPC bidi ping-pong 64B",
         "bare gRPC bidi ping-pong 64B", None),
        ("sync round trip: synchronize()", "harp synchronize()",
         "harp synchronize(), frames on the stream", "HARP, frames on the gRPC stream", None),
        ("async launches (noop)", "harp async launches", LAUNCH_TARGET, "issue target 200k/s", 1.0),
        ("async launches (noop)", "harp async launches", "naive unary gRPC call per launch",
         "naive: 1 unary RPC per launch", 10.0),
        ("async launches (noop)", "harp async launches",
         "bare gRPC pipelined 64B records, %d/msg" % per,
         "bare gRPC pipelined 64B recs, %d/msg" % per, None),
        ("async launches (noop)", "harp async launches", "lean msgpack loop, 0 args",
         "lean msgpack unpack+dispatch loop", None),
        ("async launches (noop)", "harp async launches",
         "harp async launches, frames on the stream", "HARP, frames on the gRPC stream", None),
        ("async launches, 4 args", "harp async launches, 4 args", "lean msgpack loop, 4 args",
         "lean msgpack unpack+dispatch loop", None),
        ("launch: cost per argument", "harp launch: cost per argument", 1.0,
         "issue target 1 us", ("max", 1.0)),
        ("launch: cost per argument", "harp launch: cost per argument",
         "lean msgpack loop: cost per argument", "lean msgpack loop, same records", None),
        ("isolation: async launches", "process: async launches", "thread: async launches",
         "thread isolation, same run", 0.9),
        ("isolation: synchronize()", "process: synchronize()", "thread: synchronize()",
         "thread isolation, same run", 0.9),
        ("isolation: launch+synchronize()", "process: launch+synchronize()",
         "thread: launch+synchronize()", "thread isolation, same run", None),
        ("isolation: bulk write", "process: bulk write", "thread: bulk write",
         "thread isolation, same run", 0.9),
        ("isolation: bulk read", "process: bulk read", "thread: bulk read",
         "thread isolation, same run", 0.9),
        ("isolation: connect + first sync (1/s)", "process: connect + first sync",
         "thread: connect + first sync", "thread isolation, same run", 1 / 1.5),
        ("same host: bulk write", "shm: bulk write", "memcpy (numpy copyto)",
         "memcpy of the same bytes", 0.45),
        ("same host: bulk read", "shm: bulk read", "memcpy (numpy copyto)",
         "memcpy of the same bytes", 0.45),
        ("same host: bulk write", "shm: bulk write", "unix: bulk write",
         "same unix socket, no shared memory", None),
        ("same host: bulk read", "shm: bulk read", "unix: bulk read",
         "same unix socket, no shared memory", None),
        ("same host: synchronize()", "shm: synchronize()", "unix: synchronize()",
         "same unix socket, no shared memory", 0.9),
        ("same host: read 64B", "shm: read 64B", "unix: read 64B",
         "same unix socket, no shared memory", 0.9),
        ("sessions: aggregate launches, 64 vs peak", "sessions: aggregate at 64 / peak", 1.0,
         "the peak over 1-64 sessions", 0.8),
        ("sessions: aggregate launches, 64 vs peak", "sessions: aggregate at 64 / peak",
         "sessions: bare gRPC at 64 / its peak", "bare gRPC's own 64-vs-peak, same run", None),
        ("sessions: aggregate bulk, 64 vs peak", "sessions: bulk at 64 / peak", 1.0,
         "the peak over 1-64 sessions", 0.8),
        ("sessions: aggregate bulk, 64 vs peak", "sessions: bulk at 64 / peak",
         "sessions: bare gRPC bulk at 64 / its peak", "bare gRPC's own 64-vs-peak, same run",
         None),
        ("sessions: bulk fairness at 64 (min/max)", "sessions: bulk fairness min/max at 64",
         1.0, "every session alike", None),
        ("sessions: fairness at 64 (min/max)", "sessions: fairness min/max at 64", 1.0,
         "every session alike", 0.8),
        ("sessions: server memory after 64", "sessions: server RSS after / idle", 1.0,
         "the idle server", ("max", 1.2, "x")),
        ("local: noop launches", "local connect noop launches", "local backend noop launches",
         "CpuBackend().open(0) direct", 0.97),
        ("local: 1MiB write+sync", "local connect 1MiB write+sync",
         "local backend 1MiB write+sync", "CpuBackend().open(0) direct", 0.97),
    ]


def build_rows(R):
    from harp import wire
    series = R["series"]
    rows = []
    for meas, hk, lk, lname, target in row_specs(wire.BATCH_CALLS):
        if meas.startswith("bulk"):
            meas = "%s %dMiB" % (meas, R["meta"]["bulk_bytes"] // MiB)
        h = series.get(hk)
        lim = series.get(lk) if isinstance(lk, str) else {"vals": [lk], "unit": h and h["unit"]}
        row = {"measurement": meas, "harp_series": hk, "limit_series": lk, "limit_name": lname,
               "target_min_ratio": target}
        if not h or not lim:
            row["status"] = "not run"
            rows.append(row)
            continue
        hm, hs = summarize(h["vals"])
        lm, ls = summarize(lim["vals"])
        ratio = hm / lm if lm else float("nan")
        row.update(unit=h["unit"], limit_unit=lim["unit"], harp_median=hm, harp_spread_pct=hs,
                   limit_median=lm, limit_spread_pct=ls, ratio=ratio)
        if isinstance(lk, str) and len(h["vals"]) == len(lim["vals"]):
            pr = [x / y for x, y in zip(h["vals"], lim["vals"]) if y]
            row["paired_ratios"] = pr
            row["paired_ratio_median"] = statistics.median(pr)
        if target is None:
            row["status"] = "info"
        elif isinstance(target, tuple):                  # ("max", x): a cost, at most x
            row["status"] = "met" if ratio <= target[1] else "NOT met"
        else:
            row["status"] = "met" if ratio >= target else "NOT met"
        rows.append(row)
    return rows


def target_text(meas, target):
    if target is None:
        return "(info)"
    if isinstance(target, tuple):
        return "<= %g%s" % (target[1], target[2] if len(target) > 2 else " us")
    if target == 0.97:
        return "within 3%"
    if target == 1.0:
        return ">= 200k/s"
    if meas.startswith("isolation: connect"):
        return "time <= 1.5x"
    if meas.startswith("isolation") or (meas.startswith("same host") and target == 0.9):
        return "within 10%"
    return ">= %gx" % target


def print_report(R):
    meta = R["meta"]
    print("HARP benchmark -- cpu backend over loopback, mutual TLS; medians of %d reps"
          % meta["reps"])
    print("machine: %s | %s cores (affinity %s) | python %s | grpcio %s | numpy %s | msgpack %s"
          % (meta["cpu_model"], meta["cpus"], meta["affinity"], meta["python"], meta["grpc"],
             meta["numpy"], meta["msgpack"]))
    print("kernel %s | loadavg start %s end %s | harp %s @ %s%s | %s"
          % (meta["kernel"], meta["loadavg_start"], meta.get("loadavg_end"), meta["harp"],
             meta.get("git_head", "?"),
             " (+ uncommitted changes in %s)" % ", ".join(meta["git_modified"])
             if meta.get("git_modified") else "", meta["date"]))
    idle = ", ".join("%s %.0f%%" % (k[len("section_idle_"):], 100 * v)
                     for k, v in meta.items() if k.startswith("section_idle_"))
    if idle:
        print("machine idle at each section's start (after waiting up to 30 s for 90%%): %s"
              % idle)
    print("TLS: gRPC suite %s; raw TLS suite %s | bulk %d MiB | launch N=%s"
          % (meta.get("grpc_tls_cipher"), meta.get("raw_tls_cipher"),
             meta["bulk_bytes"] // MiB, meta.get("launch_n")))
    print()
    print("all series (median, spread=(max-min)/median, per-rep values):")
    w = max([len(k) for k in R["series"]] + [10]) + 2
    for name, s in R["series"].items():
        med, sp = summarize(s["vals"])
        vals = ", ".join(("%.3f" if s["unit"] in ("GB/s", "us", "ratio") else "%.0f") % v for v in s["vals"])
        print("  %-*s %16s  spread %5.1f%%  [%s]" % (w, name, fmt(med, s["unit"]), sp, vals))
    print()
    hdr = ("measurement", "HARP", "limit", "limit name", "ratio", "target", "", "paired ratios")
    lines = []

    def rx(v):
        return "%.3fx" % v if v < 10 else "%.1fx" % v
    for r in R["rows"]:
        if r["status"] == "not run":
            lines.append((r["measurement"], "-", "-", r["limit_name"], "-",
                          target_text(r["measurement"], r["target_min_ratio"]), "not run", ""))
            continue
        unit = r["unit"]
        pr = r.get("paired_ratios")
        paired = "%s [%s..%s]" % (rx(r["paired_ratio_median"]), rx(min(pr)), rx(max(pr))) \
            if pr else ""
        lines.append((r["measurement"],
                      "%s ±%.0f%%" % (fmt(r["harp_median"], unit), r["harp_spread_pct"] / 2),
                      "%s ±%.0f%%" % (fmt(r["limit_median"], r["limit_unit"]),
                                      r["limit_spread_pct"] / 2)
                      if isinstance(r["limit_series"], str) else fmt(r["limit_median"], unit),
                      r["limit_name"], rx(r["ratio"]),
                      target_text(r["measurement"], r["target_min_ratio"]), r["status"], paired))
    widths = [max(len(str(x[i])) for x in lines + [hdr]) for i in range(len(hdr))]
    fmtl = " | ".join("%%-%ds" % wd for wd in widths)
    print(fmtl % hdr)
    print("-+-".join("-" * wd for wd in widths))
    for ln in lines:
        print(fmtl % ln)
    print()
    print("HARP/limit columns: median ± half the spread (spread = (max-min)/median).")
    print("ratio = median(HARP) / median(limit), judged against the target; paired ratios = "
          "median [min..max] of HARP/limit within each rep (measured back to back).")
    if R["errors"]:
        print("ERRORS: %s" % json.dumps(R["errors"]))
    print("run took %.0f s" % meta["elapsed_s"])
