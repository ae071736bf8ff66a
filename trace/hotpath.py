"""A recorded `launch` as one closure: the inner call, two clock readings and one `extend`.

Launches are the calls a program makes by the hundred thousand, and on the local
path each costs a couple of microseconds, so the recorder's share of one must
stay in the low hundreds of nanoseconds. `recorded_launch` builds, per
recorder, a plain function (no bound method, no attribute lookups: the inner
device's bound `launch`, the queue and the counter are closure cells) that
stores the record's fields as they were passed: the function's id, the dims
(an int as it is, anything else as a list), the argument tuple and the stream
object. Turning those into the format's values (tagged arguments, stream ids,
NumPy numbers) waits until the block is packed (`argcodec`).

A launch that finds `block_fields` fields queued writes the block itself, in
its own thread: packing about a thousand records while they are still in the
CPU's cache costs far less than the background thread's packing of 50 ms worth
(records written by another core, a GIL hand-off each way), measured in
docs/trace-overhead.md.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from .argcodec import failed_dims, frozen_args, handle_id, safe_args
from .format import LAUNCH

log = logging.getLogger("harp.trace")
_now = time.monotonic_ns
#: Launch records without arguments share this (never mutated) empty list.
_NO_ARGS: list = []


def _dims(dims: Any) -> Any:
    return list(dims) if isinstance(dims, (list, tuple)) else dims


def recorded_launch(inner_launch: Callable[..., None], queue: list, count: Any,
                    failed: Callable[..., None], flush: Callable[[], None],
                    block_fields: int) -> Callable[..., None]:
    """A `launch` that calls `inner_launch` and queues its record's fields on `queue`.

    `count` numbers the calls (the recorder's `itertools.count`), `failed(op, seq, t0, exc,
    *fields)` records a call that raised, before the exception goes on to the program;
    `flush()` writes the queued records as a block once `block_fields` are queued.
    """
    extend = queue.extend

    def launch(fn: Any, grid: Any, block: Any, args: Any, shared_mem: int = 0,
               stream: Any = None) -> None:
        if type(args) is not tuple:      # the program may change its list after the call
            args = tuple(args) if type(args) is list else frozen_args(args)
        seq, t0 = next(count), _now()
        try:
            inner_launch(fn, grid, block, args, shared_mem, stream)
        except Exception as exc:
            failed(LAUNCH, seq, t0, exc, handle_id(fn), failed_dims(grid), failed_dims(block),
                   shared_mem, None if stream is None else handle_id(stream), safe_args(args))
            raise
        extend((LAUNCH, seq, t0, _now(), None, fn.id,
                grid if type(grid) is int else _dims(grid),
                block if type(block) is int else _dims(block),
                shared_mem, stream, args or _NO_ARGS))
        if len(queue) >= block_fields:
            try:
                flush()
            except Exception:  # the program's launch went through; the trace must not stop it
                log.exception("trace: writing a block failed")
    return launch
