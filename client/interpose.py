"""Interception: `numba.cuda` becomes HARP's shim in a process that `harp run` started.

`harp run` makes the interpreter install a meta path finder at start-up (see
`harp.runhook`). On the program's first `import numba.cuda` (or
`from numba import cuda`) the finder answers with `harp.client.numba_shim`'s
module, so `sys.modules["numba.cuda"]` and `numba.cuda` are the shim. The device
is opened lazily, on the first call that needs it.

Submodules of numba.cuda that touch no device (`numba.cuda.core.config`,
`numba.cuda.types`, ...) imported by the program are numba's own; the rest
(`numba.cuda.cudadrv...`) are refused with an `UnsupportedError` that names them
and says why (`numba_shim.submodules`). HARP's own code
and numba's may still load numba's real submodules (the cpu backend runs
kernels in `numba.cuda.simulator`; PTX compilation uses numba's compiler):
those are loaded with numba's real `numba.cuda` in place for the duration.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

from harp.errors import UnsupportedError

from .numba_shim import submodules
from .numba_shim.errors import HINT
from .numba_shim.realcuda import bypassing, real_numba_cuda

#: Importers (module names) that may load numba's real numba.cuda submodules.
INTERNAL_PREFIXES = ("harp.", "numba.", "numba_cuda", "cuda.", "_numba_cuda_redirector")
_IMPORT_MACHINERY = ("importlib", "importlib._bootstrap", "importlib._bootstrap_external",
                     "importlib.util", __name__, "harp.runhook", "_harp_run_hook")


class _ShimLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        from .numba_shim import module
        return module()

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _LoadedLoader(importlib.abc.Loader):
    """Hands the import system a module that is already loaded, keeping its own spec."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.spec = module.__spec__

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec


def _internal_importer() -> bool:
    """Whether the import in progress comes from HARP's or numba's own code."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name in _IMPORT_MACHINERY or frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
            continue
        return name == "numba" or name.startswith(INTERNAL_PREFIXES)
    return False


class ShimFinder(importlib.abc.MetaPathFinder):
    """Answers imports of `numba.cuda` with the shim, and guards its submodules."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if bypassing():
            return None
        if fullname == "numba.cuda":
            return importlib.util.spec_from_loader("numba.cuda", _ShimLoader(),
                                                   origin="harp.client.numba_shim")
        if not fullname.startswith("numba.cuda."):
            return None
        if _internal_importer():
            with real_numba_cuda():
                module = importlib.import_module(fullname)
            return importlib.util.spec_from_loader(fullname, _LoadedLoader(module))
        if fullname == "numba.cuda.random":
            from .numba_shim import rng
            return importlib.util.spec_from_loader(fullname, _LoadedLoader(rng.module()))
        if submodules.pure(fullname):
            return importlib.util.spec_from_loader(
                fullname, _LoadedLoader(submodules.import_real(fullname)))
        head = fullname.split(".")[2]
        if fullname.count(".") == 2 and head not in submodules.REFUSED_SUBMODULES:
            # `from numba.cuda import X` looks for a submodule X once the attribute is missing
            from .numba_shim.module import missing
            if not submodules.exists(head):
                return None     # numba has no such name either: Python's own ImportError
            raise UnsupportedError(f"{missing(head)} ({HINT})")
        raise UnsupportedError(f"{submodules.refusal(fullname)} ({HINT})")


FINDER = ShimFinder()


def install() -> None:
    """Interpose in this process: later imports of numba.cuda get the shim.

    `harp run` does this at interpreter start-up (`harp.runhook`); call it
    yourself only before anything has imported numba.cuda.
    """
    if "numba.cuda" in sys.modules and not getattr(sys.modules["numba.cuda"], "__harp_shim__",
                                                   False):
        raise UnsupportedError("numba.cuda is already imported in this process; HARP's "
                               "interception must be installed before (use `harp run`)")
    if FINDER not in sys.meta_path:
        sys.meta_path.insert(0, FINDER)


def installed() -> bool:
    return FINDER in sys.meta_path or any(getattr(f, "harp_run_hook", False)
                                          for f in sys.meta_path)
