"""What one session can make a device hold is bounded, the same way on every device.

Device memory and kept module images count against the session's memory; handles of
each kind are capped (`harp.limits`) with a `QuotaError` that names the cap; strings a
call carries and kept error messages have a length bound.
"""
from __future__ import annotations

import pytest

import harp
from harp import limits, wire


def test_streams_are_capped(device):
    for _ in range(limits.MAX_STREAMS):
        device.stream()
    device.synchronize()                                   # the default is not counted
    device.stream()
    with pytest.raises(harp.QuotaError, match=f"at most {limits.MAX_STREAMS} streams"):
        device.synchronize()


def test_modules_are_capped(device):
    for _ in range(limits.MAX_MODULES):
        device.load_module(harp.CATALOG_IMAGE, "catalog")
    device.synchronize()
    device.load_module(harp.CATALOG_IMAGE, "catalog")
    with pytest.raises(harp.QuotaError, match=f"at most {limits.MAX_MODULES} modules"):
        device.synchronize()


def test_events_are_capped(device):
    for _ in range(limits.MAX_EVENTS):
        device.event()
    device.synchronize()
    device.event()
    with pytest.raises(harp.QuotaError, match="events"):
        device.synchronize()
    _still_usable(device)


def test_module_images_count_against_the_session_memory(numba_device):
    image = "# " + "x" * (1 << 20) + "\nfrom numba import cuda\n"
    before = numba_device.mem_info().free
    numba_device.load_module(image, "numba-python")
    assert numba_device.mem_info().free == before - len(image.encode())


def test_names_and_formats_have_a_length_bound(device):
    with pytest.raises(harp.ArgumentError, match="image format name"):
        device.load_module(harp.CATALOG_IMAGE, "f" * 100)
    lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
    with pytest.raises(harp.ArgumentError, match="character limit"):
        device.function(lib, "k" * (wire.MAX_NAME + 1))


def test_kept_error_messages_are_cut(device):
    lib = device.load_module(harp.CATALOG_IMAGE, "catalog")
    for _ in range(20):
        device.function(lib, "k" * wire.MAX_NAME)          # not in the catalog: deferred
    with pytest.raises(harp.ArgumentError) as info:
        device.synchronize()
    for error in [info.value, *getattr(info.value, "later", [])]:
        assert len(error.message) <= limits.MAX_ERROR_MESSAGE + 100    # + the cut notes
    _still_usable(device)


def _still_usable(device):
    buf = device.alloc(8)
    device.write(buf, 0, b"12345678")
    assert device.read(buf, 0, 8) == b"12345678"
