"""The start-up hook of `harp run` (standard library only).

`harp run` copies this file into the interpreter's site-packages as
`_harp_run_hook.py`, beside a one-line `harp-run.pth`:

    import os; os.environ.get("HARP_RUN_DEVICE") and __import__("_harp_run_hook").install()

Python runs that line at every start-up (the way coverage.py measures
subprocesses). Without `HARP_RUN_DEVICE` it is one dictionary lookup and nothing
else is imported. With it, `install()` puts a finder first on `sys.meta_path`
that hands imports of `numba.cuda` to `harp.client.interpose`, which is itself
imported only then, and one that registers torch's `harp` device (`harp.torch`)
once the program imports torch. Child processes inherit the variable, so they are covered
too.
"""
from __future__ import annotations

import os
import sys

# The names of harp/runenv.py, spelled here: this file runs before harp is importable.
#: The device `harp run` attaches: local:BACKEND[:INDEX], harp://..., lease:PATH, or "lease".
ENV_DEVICE = "HARP_RUN_DEVICE"
#: Trace file for the program's sessions (`harp run --trace`).
ENV_TRACE = "HARP_RUN_TRACE"
#: Client certificate directory for harp:// devices (`harp run --cert-dir`).
ENV_CERT_DIR = "HARP_RUN_CERT_DIR"

PTH_NAME = "harp-run.pth"
HOOK_MODULE = "_harp_run_hook"
PTH_LINE = (f'import os; os.environ.get("{ENV_DEVICE}") and '
            f'__import__("{HOOK_MODULE}").install()\n')


class _TorchLoader:
    """torch's own loader, and then `harp.torch` (torch's `harp` device) once torch is in."""

    def __init__(self, loader):  # noqa: ANN001
        self.loader = loader

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self.loader.create_module(spec)

    def exec_module(self, module):  # noqa: ANN001, ANN201
        self.loader.exec_module(module)
        __import__("harp.torch")

    def __getattr__(self, name):  # noqa: ANN001, ANN201
        return getattr(self.loader, name)


class TorchHook:
    """A meta path finder that registers torch's `harp` device when a program imports
    torch (`harp run`, or `HARP_TORCH=1` with `import harp`)."""

    harp_torch_hook = True

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname != "torch":
            return None
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _TorchLoader(spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


def install_torch_hook() -> None:
    """Register torch's `harp` device when torch is imported (at once if it already is)."""
    if "torch" in sys.modules:
        __import__("harp.torch")
        return
    if not any(getattr(f, "harp_torch_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, TorchHook())


class _Trampoline:
    """A meta path finder for `numba.cuda` and its submodules, delegating to HARP."""

    harp_run_hook = True

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname != "numba.cuda" and not fullname.startswith("numba.cuda."):
            return None
        from harp.client import interpose
        return interpose.FINDER.find_spec(fullname, path, target)

    def invalidate_caches(self) -> None:
        pass


def install() -> bool:
    """Put the numba.cuda finder first on `sys.meta_path` when `HARP_RUN_DEVICE` is set."""
    if not os.environ.get(ENV_DEVICE):
        return False
    if not any(getattr(f, "harp_run_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Trampoline())
    install_torch_hook()
    return True
