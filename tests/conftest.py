"""Fixtures shared by the suite.

`device` is the conformance fixture: every test that takes it runs once per
implementation of the `Device` interface. A new implementation joins the suite
by adding one entry to `DEVICE_KINDS` and one branch to `_open_device`.
"""
from __future__ import annotations

import os

import pytest

import harp

DEVICE_KINDS = ["local-cpu"]


def _gpu_present() -> bool:
    try:
        from harp.backends import load_backend
        ok, _ = load_backend("cuda").available()
        return ok
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _gpu_present():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _open_device(kind: str, request) -> harp.Device:
    if kind == "local-cpu":
        return harp.connect("local:cpu", memory="2GiB", trust_client_code=True)
    raise ValueError(kind)


@pytest.fixture(params=DEVICE_KINDS)
def device(request):
    """A fresh session on each Device implementation, closed after the test."""
    dev = _open_device(request.param, request)
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
def device_kind(request):
    return request.node.callspec.params.get("device") if hasattr(request.node, "callspec") else None


@pytest.fixture(scope="session")
def tmp_home(tmp_path_factory):
    """A private HARP config/cert directory for the whole run."""
    home = tmp_path_factory.mktemp("harp-home")
    os.environ["HARP_CERT_DIR"] = str(home / "certs")
    return home
