"""HARP traces: record every call of a session, then study and replay it offline.

    dev = harp.connect("local:cpu", trace="run.harptrace")     # or HARP_TRACE=run.harptrace
    ...
    dev.close()
    with harp.trace.open_trace("run.harptrace") as t:
        print(harp.trace.render_report(harp.trace.build_report(t)))
    with harp.connect("harp://host:port") as dev:
        print(harp.trace.replay("run.harptrace", dev).ok)

The format is in docs/trace-format.md. This package imports only `harp` and
`harp.proto`: a replay is handed a `Device`, it never connects by itself.
"""
from __future__ import annotations

from .export import write_chrome
from .format import (TraceCorruptError, TraceError, TraceIncompleteWarning,
                     TraceTruncatedWarning)
from .reader import Call, CallError, TraceFile, open_trace
from .recorder import SessionTracer, TraceRecorder, record_to, session_recorder
from .replay import ReplayResult, replay
from .report import build_report, render_report
from .timeline import estimate
from .whatif import Link, measure_link, render_whatif, whatif

__all__ = [
    "TraceRecorder", "record_to", "session_recorder", "SessionTracer", "TraceFile", "open_trace", "Call",
    "CallError", "TraceError", "TraceCorruptError", "TraceTruncatedWarning",
    "TraceIncompleteWarning", "replay", "ReplayResult", "build_report", "render_report",
    "write_chrome", "estimate", "whatif", "render_whatif", "Link", "measure_link",
]
