"""A session's counts as the pool server reports them: calls, payload bytes, device time,
failures by error code; and the shared-memory block a worker keeps them in.

The pool server relays a worker's frames without decoding them, so only the worker
knows how many calls a session made and which failed. It keeps those counts where
the server can read them without asking: `SharedCounts`, a small memfd both
processes map (passed with the worker's `READY`, beside its payload rings). The
worker writes it once per frame, after running the frame and before answering
(`publish`), so whatever a reply has told the client is counted by the time the
client has the reply; the server reads it only when asked (a metrics scrape, the
session's end). Each count is one aligned 64-bit word, written and read whole, and
counts only grow: a reader that meets an update half done sees figures a frame
apart, never torn ones. A worker is as trusted with its own counts as with its own
calls: a session can misstate only its own figures, never another's.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any

from harp.errors import ERROR_CLASSES
from harp.shm import sealed_memfd

#: Every error code, in the order of their words in the block (after the fixed counts).
CODES = tuple(sorted(ERROR_CLASSES))
_FIXED = ("calls", "write_bytes", "read_bytes", "device_ns")
_WORD = {code: len(_FIXED) + i for i, code in enumerate(CODES)}
WORDS = len(_FIXED) + len(CODES)
#: The block's size in bytes.
SIZE = WORDS * 8


@dataclass(frozen=True)
class Counts:
    """What one session (or several, added up) did: calls run, bytes named by its writes
    and reads, kernel time on the device (ns), and failures reported to it, by code."""
    calls: int = 0
    write_bytes: int = 0
    read_bytes: int = 0
    device_ns: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "Counts") -> "Counts":
        errors = dict(self.errors)
        for code, n in other.errors.items():
            errors[code] = errors.get(code, 0) + n
        return Counts(self.calls + other.calls, self.write_bytes + other.write_bytes,
                      self.read_bytes + other.read_bytes, self.device_ns + other.device_ns,
                      errors)


def session_counts(session: Any, device_ns: int) -> Counts:
    """The counts a `Session` keeps, with the device time its compute gate measured."""
    return Counts(session.calls, session.write_bytes, session.read_bytes, device_ns,
                  dict(session.failures))


class SharedCounts:
    """One session's counts in a memfd: the worker `publish`es, the server `read`s."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, WORDS * 8)
        self._bytes = memoryview(self._map)
        self._words = self._bytes.cast("Q")
        self._failed = 0                 # failures written so far (the worker's side)
        self._final: Counts | None = None

    @classmethod
    def create(cls) -> "SharedCounts":
        """A new block, all zero (the worker makes it and passes its descriptor on)."""
        return cls(sealed_memfd("harp-counts", SIZE))    # the server maps it too

    def publish(self, session: Any, device_ns: int) -> None:
        """Write a `Session`'s counts (once per frame: four stores, and the failures only
        when there are new ones)."""
        words = self._words
        words[0] = session.calls
        words[1] = session.write_bytes
        words[2] = session.read_bytes
        words[3] = device_ns
        if session.failed != self._failed:
            self._failed = session.failed
            for code, n in session.failures.items():
                words[_WORD.get(code, _WORD["INTERNAL"])] = n

    def read(self) -> Counts:
        """The counts as last published (after `close`: as they were then)."""
        if self._final is not None:
            return self._final
        try:
            values = self._words.tolist()
        except ValueError:               # closed meanwhile, by another thread
            return self._final or Counts()
        return Counts(*values[:len(_FIXED)],
                      errors={code: n for code, n in zip(CODES, values[len(_FIXED):]) if n})

    def close(self) -> None:
        """Keep the last counts for later readers, then unmap and close (once)."""
        if self._final is not None:
            return
        self._final = self.read()
        for view in (self._words, self._bytes):
            view.release()
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
