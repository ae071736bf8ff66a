"""Export to the Chrome trace event format (JSON), which Perfetto and chrome://tracing open.

Two processes: "client" with one track of every call as the program saw it
(measured), and "device" with one track per stream carrying kernels, writes,
reads, copies and fills as slices (placed by `timeline.py`, so estimated).
Timestamps are microseconds since the trace's origin. Events are written one at
a time, so a large trace does not have to fit in memory as JSON.
"""
from __future__ import annotations

import json
import os
from typing import IO, Any, Iterator

from harp.units import format_size

from .reader import TraceFile
from .replay import describe
from .timeline import Timeline, estimate

CLIENT_PID, DEVICE_PID = 1, 2


def chrome_events(trace: TraceFile, timeline: Timeline | None = None) -> Iterator[dict[str, Any]]:
    """The Chrome trace events of `trace`, metadata first."""
    tl = timeline or estimate(trace.calls())
    dev = trace.device
    yield {"ph": "M", "pid": CLIENT_PID, "tid": 0, "name": "process_name",
           "args": {"name": "client: HARP calls (measured)"}}
    yield {"ph": "M", "pid": CLIENT_PID, "tid": 0, "name": "process_sort_index",
           "args": {"sort_index": 0}}
    yield {"ph": "M", "pid": CLIENT_PID, "tid": 1, "name": "thread_name",
           "args": {"name": "calls"}}
    yield {"ph": "M", "pid": DEVICE_PID, "tid": 0, "name": "process_name",
           "args": {"name": f"device: {dev.get('name', '?')} (estimated)"}}
    yield {"ph": "M", "pid": DEVICE_PID, "tid": 0, "name": "process_sort_index",
           "args": {"sort_index": 1}}
    tids: dict[int, int] = {}
    for op in tl.ops:
        if op.stream not in tids:
            tids[op.stream] = len(tids) + 1
            name = "stream default" if op.stream == 0 else f"stream {op.stream:#x}"
            yield {"ph": "M", "pid": DEVICE_PID, "tid": tids[op.stream], "name": "thread_name",
                   "args": {"name": name}}
            yield {"ph": "M", "pid": DEVICE_PID, "tid": tids[op.stream],
                   "name": "thread_sort_index", "args": {"sort_index": tids[op.stream]}}
    for c in tl.calls:
        args: dict[str, Any] = {"seq": c.seq, "call": describe(c)}
        if c.error is not None:
            args["error"] = str(c.error)
        yield {"ph": "X", "pid": CLIENT_PID, "tid": 1, "ts": c.t0 / 1e3,
               "dur": max(c.duration_ns, 0) / 1e3, "name": c.api,
               "cat": "sync" if c.sync else "async", "args": args}
    for op in tl.ops:
        if op.kind == "marker":
            yield {"ph": "i", "s": "t", "pid": DEVICE_PID, "tid": tids[op.stream],
                   "ts": op.start / 1e3, "name": op.label, "cat": "marker",
                   "args": {"seq": op.call.seq}}
            continue
        args = {"seq": op.call.seq, "estimated": True,
                "fitted_to_sync": op.fitted}
        nbytes = op.call.get("nbytes")
        if op.kind != "kernel" and isinstance(nbytes, int):
            args["bytes"] = nbytes
            name = f"{op.label} {format_size(nbytes)}"
        else:
            name = op.label
        yield {"ph": "X", "pid": DEVICE_PID, "tid": tids[op.stream], "ts": op.start / 1e3,
               "dur": max(op.duration_ns, 0) / 1e3, "name": name,
               "cat": "kernel" if op.kind == "kernel" else "copy", "args": args}


def write_chrome(trace: TraceFile, out: IO[str] | str | os.PathLike,
                 timeline: Timeline | None = None) -> int:
    """Write the Chrome trace JSON to a file or path; returns the number of events."""
    if not hasattr(out, "write"):
        with open(out, "w", encoding="utf-8") as f:  # type: ignore[arg-type]
            return write_chrome(trace, f, timeline)
    stream: IO[str] = out  # type: ignore[assignment]
    stream.write('{"displayTimeUnit": "ms", "otherData": ')
    json.dump({"source": "harp trace export", "trace": trace.path, "device": trace.device,
               "device_times": "estimated from client-side call times"}, stream, default=str)
    stream.write(', "traceEvents": [\n')
    n = 0
    for event in chrome_events(trace, timeline):
        if n:
            stream.write(",\n")
        stream.write(json.dumps(event, default=str))
        n += 1
    stream.write("\n]}\n")
    return n
