"""numba's own `numba.cuda`, for the parts of the shim that compile with it.

Under `harp run` the name `numba.cuda` belongs to the shim. Compiling a kernel
to PTX needs numba's real CUDA target, and numba's code imports `numba.cuda`
by name while it works, so `real_numba_cuda()` puts the real module back under
that name for the duration, and the shim's import finder stands aside.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import types
from typing import Iterator

_LOCK = threading.RLock()
_STATE = threading.local()
_REAL: list[types.ModuleType] = []
_MISSING = object()


def bypassing() -> bool:
    """True inside `real_numba_cuda()` on this thread: the shim's finder must not answer."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def real_numba_cuda() -> Iterator[types.ModuleType]:
    """Within: `sys.modules["numba.cuda"]` and `numba.cuda` are numba's own module (yielded).

    Whatever held the name before (the shim) is put back on exit. Serialized by a
    lock: numba's compiler is not re-entrant across threads anyway.
    """
    with _LOCK:
        import numba
        held = sys.modules.get("numba.cuda")
        attr = numba.__dict__.get("cuda", _MISSING)
        _STATE.depth = getattr(_STATE, "depth", 0) + 1
        real = _REAL[0] if _REAL else None
        try:
            if real is None and held is not None and getattr(held, "__harp_shim__", False):
                del sys.modules["numba.cuda"]
                numba.__dict__.pop("cuda", None)
            if real is None:
                real = importlib.import_module("numba.cuda")
                _REAL.append(real)
            sys.modules["numba.cuda"] = real
            numba.__dict__["cuda"] = real
            yield real
        finally:
            _STATE.depth -= 1
            if held is not None and held is not real:
                sys.modules["numba.cuda"] = held
            if attr is not _MISSING and attr is not real:
                numba.__dict__["cuda"] = attr
