"""HARP traces: record every call of a session, then study and replay it offline.

    dev = harp.connect("local:cpu", trace="run.harptrace")      # or HARP_TRACE=run.harptrace
    ...
    dev.close()
    with harp.trace.open_trace("run.harptrace") as t:
        print(harp.trace.report(t))

The format is in docs/trace-format.md. This package imports only `harp` and
`harp.proto`: a replay is handed a `Device`, it never connects by itself.
"""
from __future__ import annotations

from .format import (TraceCorruptError, TraceError, TraceIncompleteWarning,
                     TraceTruncatedWarning)
from .reader import Call, CallError, TraceFile, open_trace
from .recorder import TraceRecorder, record_to, session_recorder

__all__ = [
    "TraceRecorder", "record_to", "session_recorder", "TraceFile", "open_trace", "Call",
    "CallError", "TraceError", "TraceCorruptError", "TraceTruncatedWarning",
    "TraceIncompleteWarning",
]
