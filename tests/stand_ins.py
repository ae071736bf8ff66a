"""Stand-ins the suite drives real backend code with, where the real driver cannot exist.

`emulated_cupy()` is the host-memory stand-in for CuPy (tests/backends/fake_cupy),
given to the cuda backend as its driver (`load_backend("cuda", cupy=...)`).
"""
from __future__ import annotations

import importlib
import os
import shutil
import sys

import pytest

FAKE_CUPY = os.path.join(os.path.dirname(__file__), "backends", "fake_cupy")


def emulated_cupy():
    """The host-memory stand-in for CuPy (tests/backends/fake_cupy), loaded under its own
    name (`harp_fake_cupy`, never as `cupy`), or a skip where it cannot be built."""
    from harp.backends.cuda import nvrtc
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("the CuPy stand-in needs a C++ compiler to emulate the catalog")
    ok, why = nvrtc.available()
    if not ok:
        pytest.skip(f"the CuPy stand-in needs NVRTC: {why}")
    if FAKE_CUPY not in sys.path:
        sys.path.append(FAKE_CUPY)
    return importlib.import_module("harp_fake_cupy")


def backend_or_skip(name: str, **options):
    """Backend `name` configured with `options`, or a skip saying why it is unavailable."""
    from harp.backends import load_backend
    backend = load_backend(name, **options)
    ok, why = backend.available()
    if not ok:
        pytest.skip(f"the {name} backend is unavailable here: {why}")
    return backend
