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

from ..errors import HarpError

_lock = threading.Lock()
_current: "TorchSession | None" = None


class TorchSession:
    """A `harp.Device` as torch's `harp:0`."""

    def __init__(self, device: Any, owned: bool = False) -> None:
        self.device = device
        self.owned = owned
        self.module = device.load_module(b"", "aten")
        self._functions: dict[str, Any] = {}
        self.ops = 0
        #: Buffers whose last tensor is gone, freed at the next call: a tensor dies wherever
        #: the collector runs, maybe inside a device call, which must not be re-entered.
        self._dead: collections.deque = collections.deque()

    def release(self, buffer: Any) -> None:
        self._dead.append(buffer)

    def free_dead(self) -> None:
        dead, free = self._dead, self.device.free
        while dead:
            try:
                free(dead.popleft())
            except IndexError:
                return
            except HarpError:
                pass

    def function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self.device.function(self.module, name)
        return fn

    def call(self, overload: str, n_out: int, args: list, kwargs: dict, launch_args: list) -> None:
        """Queue one operator call (asynchronous, like any launch)."""
        name = json.dumps([overload, n_out, args, kwargs], separators=(",", ":"))
        self.device.launch(self.function(name), 1, 1, launch_args)
        self.ops += 1

    def seed(self, value: int) -> None:
        import numpy as np
        self.call("!seed", 0, [{"s": 0}], {}, [np.int64(int(value) & (2 ** 63 - 1))])

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
