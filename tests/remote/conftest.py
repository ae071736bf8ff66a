"""Fixtures of the remote-only tests."""
from __future__ import annotations

import pytest

from tests.conftest import Pool


@pytest.fixture(params=["process", "thread"])
def tcp_pool(request, tmp_path):
    """A pool server of the test's own over TCP with TLS (a data channel offered), in each
    isolation."""
    pool = Pool(tmp_path, isolation=request.param, warm_workers=1)
    yield pool
    pool.stop()
