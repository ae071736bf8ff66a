"""Shared fixtures of the conformance suite.

Every test in this folder takes the `device` fixture (tests/conftest.py), so it
runs unchanged against every implementation of `harp.Device`. Tests use only
the public interface: no private attributes, no backend-specific types.
"""
from __future__ import annotations

import numpy as np
import pytest

import harp


@pytest.fixture
def rng():
    """A seeded generator, so a failure reproduces."""
    return np.random.default_rng(20240607)


@pytest.fixture
def catalog(device):
    """The catalog module loaded on `device`."""
    return device.load_module(harp.CATALOG_IMAGE, "catalog")


@pytest.fixture
def numba_device(device):
    """`device`, or a skip where it does not accept numba-python kernels."""
    if "numba-python" not in device.info.formats:
        pytest.skip("device does not accept numba-python kernels")
    return device
