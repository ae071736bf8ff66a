"""tests/torch: the models of `training.py` are imported by name from this folder, and the
cuda backend's sessions on the CuPy stand-in are opened once for the folder.

The cuda backend runs `aten` calls over its own device memory; here it drives the
host-memory stand-in for CuPy (tests/backends/fake_cupy), so torch's CPU build runs
them through DLPack (the GPU itself: tests/backends/test_cuda_gpu.py). One local
session and one through a pool server are shared by the tests, so that the remote one
imports torch in its worker once, not per test.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from stand_ins import FAKE_CUPY, backend_or_skip, emulated_cupy  # noqa: E402


@pytest.fixture(scope="session")
def cuda_stand_in():
    """A cuda backend session on the CuPy stand-in, in this process."""
    backend = backend_or_skip("cuda", memory="1GiB", cupy=emulated_cupy())
    dev = backend.open(0)
    yield dev
    dev.close()


@pytest.fixture(scope="session")
def cuda_stand_in_pool(tmp_path_factory):
    """A pool server (mutual TLS, loopback) over the cuda backend on the stand-in, with the
    session in a worker process: the worker loads the stand-in by name
    (`load_backend("cuda", cupy="harp_fake_cupy")`), found on the fork server's path."""
    from harp.security import ephemeral_pool, server_credentials
    from harp.server import PoolServer
    backend = backend_or_skip("cuda", memory="1GiB", cupy=emulated_cupy())
    server_tls, client_tls = ephemeral_pool(tmp_path_factory.mktemp("cuda-torch-pool"))
    server = PoolServer(backend, backend_options={"cupy": "harp_fake_cupy", "memory": "1GiB"},
                        warm_workers=1)
    with pytest.MonkeyPatch.context() as env:       # the fork server is started with it
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [FAKE_CUPY,
                                                              os.environ.get("PYTHONPATH")])))
        address = server.start(["127.0.0.1:0"], server_credentials(server_tls), server_tls)[0]
    yield f"harp://{address}", client_tls
    server.stop(grace=0.5)


@pytest.fixture(scope="session")
def cuda_stand_in_remote(cuda_stand_in_pool):
    """One session of that pool server, shared."""
    import harp
    url, tls = cuda_stand_in_pool
    dev = harp.connect(url, tls=tls)
    yield dev
    dev.close()
