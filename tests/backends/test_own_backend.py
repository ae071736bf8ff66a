"""The backend of docs/backends.md, run as written: a new device needs only its hooks."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import harp

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "backends.md"


@pytest.fixture
def tiny():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    dev = namespace["TinyBackend"]().open(0)
    yield dev
    dev.close()


def test_the_documented_backend_runs_the_catalog(tiny):
    lib = tiny.load_module(harp.CATALOG_IMAGE, "catalog")
    x = np.arange(8, dtype=np.float32)
    bx, by = tiny.alloc(x.nbytes), tiny.alloc(x.nbytes)
    tiny.write(bx, 0, x)
    tiny.launch(tiny.function(lib, "fill_f32"), 1, 1, [by, np.float32(1), np.int64(8)])
    tiny.launch(tiny.function(lib, "axpy_f32"), 1, 1, [by, bx, np.float32(2), np.int64(8)])
    np.testing.assert_array_equal(np.frombuffer(tiny.read(by, 0, x.nbytes), np.float32),
                                  2 * x + 1)


def test_the_base_gives_it_checks_errors_and_quota(tiny):
    lib = tiny.load_module(harp.CATALOG_IMAGE, "catalog")
    buf = tiny.alloc(16)
    tiny.function(lib, "gemm_f64")                                # not offered: deferred
    tiny.launch(tiny.function(lib, "fill_f32"), 1, 1, [buf, np.float32(1), np.int64(5)])
    with pytest.raises(harp.ArgumentError) as info:
        tiny.synchronize()
    assert (info.value.call, info.value.seq) == ("function", 3)
    assert "fill_f32: out needs 20 bytes" in str(info.value.later[0])
    assert tiny.mem_info().free == (1 << 30) - 16
    tiny.close()
    with pytest.raises(harp.HarpError, match="closed"):
        tiny.alloc(1)
