"""`device.info`, handle values, and the session's lifetime (close)."""
from __future__ import annotations

import numpy as np
import pytest

import harp
from harp.types import FORMATS


def test_info_fields_are_sane(device):
    info = device.info
    assert isinstance(info, harp.DeviceInfo)
    assert info.kind in ("cpu", "gpu", "fpga", "npu")
    assert isinstance(info.name, str) and info.name
    assert isinstance(info.backend, str) and info.backend
    assert isinstance(info.index, int) and info.index >= 0
    assert isinstance(info.memory, int) and info.memory > 0
    assert isinstance(info.formats, tuple) and info.formats
    assert set(info.formats) <= set(FORMATS), info.formats
    assert "catalog" in info.formats          # every backend implements the catalog
    assert len(set(info.formats)) == len(info.formats)
    cc = info.compute_capability
    assert cc is None or (isinstance(cc, tuple) and len(cc) == 2
                          and all(isinstance(v, int) and v >= 0 for v in cc))
    assert isinstance(info.extra, dict)
    # the same object every time, and it survives its wire form
    assert device.info == info
    assert harp.DeviceInfo.from_dict(info.to_dict()) == info


def test_info_memory_matches_mem_info(device):
    mem = device.mem_info()
    assert isinstance(mem, harp.MemInfo)
    assert mem.total == device.info.memory
    assert 0 <= mem.free <= mem.total


def test_handles_are_distinct_values(device):
    bufs = [device.alloc(8) for _ in range(5)]
    streams = [device.stream() for _ in range(3)]
    events = [device.event() for _ in range(3)]
    assert len({b.id for b in bufs}) == 5
    assert all(b.nbytes == 8 for b in bufs)
    assert len({s.id for s in streams}) == 3
    assert harp.Stream(0) not in streams      # id 0 is the default stream
    assert len({e.id for e in events}) == 3
    module = device.load_module(harp.CATALOG_IMAGE, "catalog")
    assert isinstance(module, harp.Module) and module.format == "catalog"
    fn = device.function(module, "axpy_f32")
    assert isinstance(fn, harp.Function) and fn.name == "axpy_f32"
    device.synchronize()


def test_close_is_idempotent(device):
    buf = device.alloc(16)
    device.write(buf, 0, b"x" * 16)
    device.close()
    device.close()
    with device:            # the context manager closes too, and that is fine after close
        pass
    device.close()


@pytest.mark.parametrize("call", [
    "alloc", "write", "read", "copy", "fill", "free", "mem_info", "synchronize", "stream",
    "event", "record", "load_module", "launch",
])
def test_calls_after_close_raise(device, call):
    buf = device.alloc(16)
    s = device.stream()
    e = device.event()
    module = device.load_module(harp.CATALOG_IMAGE, "catalog")
    fn = device.function(module, "noop")
    device.synchronize()
    device.close()
    calls = {
        "alloc": lambda: device.alloc(16),
        "write": lambda: device.write(buf, 0, b"abc"),
        "read": lambda: device.read(buf, 0, 4),
        "copy": lambda: device.copy(buf, 0, buf, 8, 8),
        "fill": lambda: device.fill(buf, 0),
        "free": lambda: device.free(buf),
        "mem_info": lambda: device.mem_info(),
        "synchronize": lambda: device.synchronize(s),
        "stream": lambda: device.stream(),
        "event": lambda: device.event(),
        "record": lambda: device.record(e, s),
        "load_module": lambda: device.load_module(harp.CATALOG_IMAGE, "catalog"),
        "launch": lambda: device.launch(fn, 1, 1, []),
    }
    with pytest.raises(harp.HarpError):
        calls[call]()
    # still closed, still raising, and closing again is fine
    with pytest.raises(harp.HarpError):
        device.synchronize()
    device.close()


def test_context_manager_closes(device):
    with device as d:
        assert d is device
        buf = d.alloc(4)
        d.write(buf, 0, np.arange(4, dtype=np.uint8))
        assert d.read(buf, 0, 4) == bytes([0, 1, 2, 3])
    with pytest.raises(harp.HarpError):
        device.alloc(4)


def test_freeing_everything_restores_mem_info(device):
    """A session's buffers are its own: freeing them all brings mem_info back."""
    before = device.mem_info()
    bufs = [device.alloc(1 << 20) for _ in range(8)]
    device.synchronize()
    assert device.mem_info().free == before.free - 8 * (1 << 20)
    for b in bufs:
        device.free(b)
    assert device.mem_info() == before
