"""Keep the pool server's own memory where it was once sessions end (glibc malloc).

Each payload chunk from gRPC is a fresh 1 MiB `bytes`. glibc serves blocks that
large with mmap, but raises its mmap threshold each time such a block is freed,
so soon they come from the heaps of the many threads that relay sessions, and
the freed memory stays with the process: a server that relayed 60 sessions'
writes held 7x its idle size after they ended. Fixing the threshold (so big
blocks are always mapped, and unmapped when freed) and trimming the heaps when
sessions end gives it back. Nothing here matters for correctness; on a C
library without these calls it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
import time

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8

_libc = None
_lock = threading.Lock()
_last_trim = 0.0


def _c() -> object | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt  # noqa: B018 - glibc only
            lib.malloc_trim  # noqa: B018
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def tune() -> None:
    """Map blocks of 256 KiB and more, always; trim heaps above 1 MiB of free memory; and
    keep to a few heaps however many threads relay sessions (before threads start)."""
    lib = _c()
    if lib is not None:
        lib.mallopt(M_MMAP_THRESHOLD, 256 << 10)
        lib.mallopt(M_TRIM_THRESHOLD, 1 << 20)
        lib.mallopt(M_ARENA_MAX, 2)


def trim(min_interval_s: float = 1.0) -> bool:
    """Collect the garbage sessions left in reference cycles (a generator's frame, an
    exception's traceback, each holding a payload chunk) and give freed heap memory back
    to the operating system; at most once per `min_interval_s`. True if it ran."""
    global _last_trim
    with _lock:
        now = time.monotonic()
        if now - _last_trim < min_interval_s:
            return False
        _last_trim = now
    gc.collect()
    lib = _c()
    if lib is not None:
        lib.malloc_trim(0)
    return True
