"""The HARP device behind torch's `harp` device: one session, its `aten` module, its calls.

`use(device)` names the session (any `harp.Device`: local or remote); without it
the first `harp` tensor opens the device `harp run` names, else
`harp.connect()`'s (`HARP_DEVICE`, or the lease from `harp attach`). A call's function handle is made once
per spelling (`harp.aten_ops`) and reused, so a training loop's operators cost
one launch record each.
"""
from __future__ import annotations

import collections
import json
import threading
import weakref
from typing import Any

from ..aten_ops import SEED
from ..errors import HarpError

_lock = threading.Lock()

#: Bytes of freed tensors' buffers a session keeps for reuse (`TorchSession.empty_cache`).
CACHE_LIMIT = 256 << 20
_current: "TorchSession | None" = None


class TorchSession:
    """A `harp.Device` as torch's `harp:0`."""

    def __init__(self, device: Any, owned: bool = False) -> None:
        self.device = device
        self.owned = owned
        self.module = device.load_module(b"", "aten")
        self._functions: dict[str, Any] = {}
        self.ops = 0
        #: Buffers whose last tensor is gone, handled at the next call: a tensor dies
        #: wherever the collector runs, maybe inside a device call, which must not be
        #: re-entered.
        self._dead: collections.deque = collections.deque()
        #: Buffers kept for reuse, by size (a caching allocator, as torch's for CUDA): a
        #: training loop's tensors come and go at the same sizes, and a reused buffer costs
        #: no alloc and no free on the device (the server asks its ledger for each alloc).
        self._cache: dict[int, list] = {}
        self.cached_bytes = 0
        self.cache_limit = CACHE_LIMIT

    def release(self, buffer: Any, nbytes: int) -> None:
        self._dead.append((buffer, nbytes))

    def take(self, nbytes: int) -> Any:
        """A buffer of `nbytes`: one kept for reuse, or a new allocation."""
        self._collect()
        kept = self._cache.get(nbytes)
        if kept:
            self.cached_bytes -= nbytes
            return kept.pop()
        return self.device.alloc(nbytes)

    def _collect(self) -> None:
        dead = self._dead
        while dead:
            try:
                buffer, nbytes = dead.popleft()
            except IndexError:
                return
            if self.cached_bytes + nbytes <= self.cache_limit:
                self._cache.setdefault(nbytes, []).append(buffer)
                self.cached_bytes += nbytes
            else:
                self._free(buffer)

    def _free(self, buffer: Any) -> None:
        try:
            self.device.free(buffer)
        except HarpError:
            pass

    def empty_cache(self) -> None:
        """Free the buffers kept for reuse (they count as used device memory meanwhile)."""
        self._collect()
        for buffers in self._cache.values():
            for buffer in buffers:
                self._free(buffer)
        self._cache.clear()
        self.cached_bytes = 0

    def function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.device.function(self.module, name)
        return fn

    def launch(self, name: str, launch_args: list) -> None:
        """Queue one operator call, spelled `name` (`harp.aten_ops`): asynchronous, like any
        launch."""
        self.device.launch(self.function(name), 1, 1, launch_args)
        self.ops += 1

    def seed(self, value: int) -> None:
        import numpy as np
        name = json.dumps([SEED, 0, [{"s": 0}], {}], separators=(",", ":"))
        self.launch(name, [np.int64(int(value) & (2 ** 63 - 1))])

    def close(self) -> None:
        if self.owned:
            try:
                self.device.close()
            except HarpError:
                pass


def use(device: Any) -> TorchSession:
    """Make `device` (a `harp.Device`) the one torch's `harp` tensors live on. Tensors made
    on an earlier device stay there (using them afterwards is an error)."""
    global _current
    with _lock:
        _current = TorchSession(device)
        return _current


def current() -> TorchSession:
    """The session of torch's `harp` device, opened with `harp.connect()` on first use."""
    global _current
    session = _current
    if session is not None:
        return session
    with _lock:
        if _current is None:
            from ..runenv import open_from_env
            device, _ = open_from_env()
            _current = TorchSession(device, owned=True)
            weakref.finalize(_current, _current.close)
        return _current


def reset() -> None:
    """Forget the current session (the next `harp` tensor opens one again)."""
    global _current
    with _lock:
        session, _current = _current, None
    if session is not None:
        session.close()
