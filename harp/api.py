"""The API table: every call of the `Device` interface, once.

The wire schema (`harp.wire.SCHEMA`), the pool server's dispatch table
(`harp.server.session.Session`) and the trace format's call list
(`harp.trace.format.OPS`) are all derived from this table, so a call added
here is added everywhere, or a test says where it is missing.

Each entry gives the call's API name, its op number on the session wire, its
op number in trace files (format version 1, fixed: traces already written use
it), whether it is *sync* (its record gets exactly one reply), and the
arguments its wire record carries after `[op, seq]`, by name and type.
`write` has three wire forms: inline (`write`), chunked (`write_chunked`),
whose payload follows as bare frames, and through a same-host session's
shared-memory window (`write_shm`); `read` has two (`read`, `read_shm`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

I, B, S, L, N = int, bytes, str, list, type(None)


@dataclass(frozen=True)
class Call:
    """One call of the API as the wire and the trace know it."""
    key: str                       # unique: the API name, or the name of a wire variant
    name: str                      # the Device method ("write" for both write forms)
    op: int                        # op number in a session record
    trace_op: int                  # op number in a trace record (0: not traced separately)
    sync: bool                     # gets exactly one reply; ends its batch
    args: tuple[tuple[str, Any], ...]   # (name, type or tuple of types) after [op, seq]

    @property
    def types(self) -> tuple[Any, ...]:
        return tuple(t for _, t in self.args)


CALLS: tuple[Call, ...] = (
    Call("alloc", "alloc", 1, 1, False, (("id", I), ("nbytes", I))),
    Call("free", "free", 2, 2, False, (("buffer", I),)),
    Call("write", "write", 3, 3, False, (("buffer", I), ("offset", I), ("stream", I),
                                         ("data", B))),
    Call("write_chunked", "write", 4, 0, False, (("buffer", I), ("offset", I), ("stream", I),
                                                 ("nbytes", I))),
    Call("copy", "copy", 5, 5, False, (("dst", I), ("dst_offset", I), ("src", I),
                                       ("src_offset", I), ("nbytes", I), ("stream", I))),
    Call("fill", "fill", 6, 6, False, (("buffer", I), ("value", I), ("offset", I),
                                       ("nbytes", I), ("stream", I))),
    Call("load_module", "load_module", 7, 7, False, (("id", I), ("format", S), ("image", B))),
    Call("function", "function", 8, 8, False, (("id", I), ("module", I), ("name", S))),
    Call("launch", "launch", 9, 9, False, (("function", I), ("grid", L), ("block", L),
                                           ("shared_mem", I), ("stream", I), ("args", L))),
    Call("stream", "stream", 10, 10, False, (("id", I),)),
    Call("event", "event", 11, 11, False, (("id", I),)),
    Call("record", "record", 12, 12, False, (("event", I), ("stream", I))),
    Call("wait", "wait", 13, 13, False, (("stream", I), ("event", I))),
    Call("write_shm", "write", 14, 0, False, (("buffer", I), ("offset", I), ("stream", I),
                                             ("nbytes", I))),
    Call("read", "read", 20, 4, True, (("buffer", I), ("offset", I), ("nbytes", I),
                                       ("stream", I))),
    Call("synchronize", "synchronize", 21, 14, True, (("stream", (I, N)),)),
    Call("elapsed", "elapsed", 22, 15, True, (("start", I), ("end", I))),
    Call("mem_info", "mem_info", 23, 16, True, ()),
    Call("close", "close", 24, 17, True, ()),
    Call("read_shm", "read", 25, 0, True, (("buffer", I), ("offset", I), ("nbytes", I),
                                           ("stream", I))),
)

BY_KEY: dict[str, Call] = {c.key: c for c in CALLS}
BY_OP: dict[int, Call] = {c.op: c for c in CALLS}
#: API names, in table order (one per Device call; the write variants share one).
NAMES: tuple[str, ...] = tuple(dict.fromkeys(c.name for c in CALLS))
SYNC_NAMES: frozenset[str] = frozenset(c.name for c in CALLS if c.sync)


def op(key: str) -> int:
    """The wire op number of a call (or wire variant) by its key."""
    return BY_KEY[key].op
