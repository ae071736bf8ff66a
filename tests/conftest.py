"""Fixtures shared by the suite.

`device` is the conformance fixture: every test that takes it runs once per
implementation of the `Device` interface. A new implementation joins the suite
by adding one entry to `DEVICE_KINDS` and one branch to `_open_device`.
"""
from __future__ import annotations

import os
import time

import pytest

import harp

DEVICE_KINDS = [
    "local-cpu", "remote-cpu", "remote-cpu-thread", "remote-cpu-shm", "remote-cpu-stream",
    "traced-cpu",
    # the cuda backend driving a host-memory stand-in for CuPy (needs g++ and NVRTC)
    "local-cuda-emulated", "remote-cuda-emulated", "traced-cuda-emulated",
    # the opencl backend on the OpenCL devices here (PoCL in CI)
    "local-opencl", "remote-opencl", "traced-opencl",
    # the onnx backend on ONNX Runtime's CPU provider
    "local-onnx", "remote-onnx", "traced-onnx",
    # the cuda backend, on a real GPU (skipped without one, see pytest_collection_modifyitems)
    pytest.param("local-cuda", marks=pytest.mark.gpu),
    pytest.param("remote-cuda", marks=pytest.mark.gpu),
]


def wait_until(predicate, timeout=15.0, interval=0.05):
    """Poll `predicate` until it is true or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def pattern(n, seed=0):
    """`n` random bytes as a uint8 array (seeded: the same every run)."""
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


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


from stand_ins import backend_or_skip, emulated_cupy  # noqa: E402  (tests/ is on sys.path for its conftest)


def _local(name: str, **options) -> harp.Device:
    backend = backend_or_skip(name, memory="2GiB", **options)
    return backend.open(0, trust_client_code=True)


def _open_device(kind: str, request) -> harp.Device:
    if kind.startswith("traced-"):
        inner = _open_device(kind.replace("traced-", "local-", 1), request)
        from harp.trace import record_to
        path = request.getfixturevalue("tmp_path") / "conformance.harptrace"
        return record_to(inner, str(path), payloads=True, meta={"target": kind})
    if kind == "local-cuda-emulated":
        return _local("cuda", cupy=emulated_cupy())
    if kind == "local-opencl":
        return _local("opencl")
    if kind == "local-onnx":
        return _local("onnx")
    if kind in ("remote-cuda-emulated", "remote-opencl", "remote-onnx"):
        pool = request.getfixturevalue(kind.replace("-", "_") + "_pool")
        return pool.connect()
    if kind == "local-cpu":
        return harp.connect("local:cpu", memory="2GiB", trust_client_code=True)
    if kind == "remote-cpu":
        pool = request.getfixturevalue("pool_server")
        dev = harp.connect(pool.url, tls=pool.client_tls)
        assert dev.data_channel, "a TCP session with TLS should open a data channel"
        return dev
    if kind == "remote-cpu-thread":
        pool = request.getfixturevalue("thread_pool_server")
        return harp.connect(pool.url, tls=pool.client_tls)
    if kind == "remote-cpu-stream":           # bulk data in gRPC frames, no data channel
        pool = request.getfixturevalue("pool_server")
        dev = harp.connect(pool.url, tls=pool.client_tls, data_channel=False)
        assert not dev.data_channel
        return dev
    if kind == "remote-cpu-shm":
        pool = request.getfixturevalue("unix_pool_server")
        dev = harp.connect(pool.url, tls=pool.client_tls)
        assert dev.shared_memory, "a unix-socket session should take a shared-memory window"
        return dev
    if kind == "local-cuda":
        return harp.connect("local:cuda", memory="2GiB")
    if kind == "remote-cuda":
        pool = request.getfixturevalue("cuda_pool_server")
        return harp.connect(pool.url, tls=pool.client_tls)
    raise ValueError(kind)


class Pool:
    """An in-process pool server on loopback with mutual TLS, and what a client needs."""

    backend = "cpu"

    def __init__(self, tmp_path, listen="127.0.0.1:0", **server_options):
        from harp.backends import load_backend
        from harp.security import ephemeral_pool, server_credentials
        from harp.server import PoolServer
        self.server_tls, self.client_tls = ephemeral_pool(tmp_path)
        self.server = PoolServer(load_backend(self.backend, memory="2GiB"),
                                 trust_client_code=True, **server_options)
        self.address = self.server.start([listen], server_credentials(self.server_tls),
                                         self.server_tls)[0]
        self.url = f"harp://{self.address}"

    def connect(self, **options) -> harp.Device:
        return harp.connect(self.url, tls=self.client_tls, **options)

    def stop(self):
        self.server.stop(grace=0.5)


@pytest.fixture(scope="session")
def pool_server(tmp_path_factory):
    """One pool server (cpu backend, 2 GiB, trusted, sessions in worker processes) shared
    by the whole run."""
    pool = Pool(tmp_path_factory.mktemp("pool"))
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def thread_pool_server(tmp_path_factory):
    """The same with thread isolation (sessions in the server process)."""
    pool = Pool(tmp_path_factory.mktemp("thread-pool"), isolation="thread")
    yield pool
    pool.stop()


def unix_listen() -> str:
    """A unix socket address in a short temporary directory (paths are limited to 107 bytes)."""
    import tempfile
    return f"unix:{tempfile.mkdtemp(prefix='harp-')}/pool.sock"


@pytest.fixture(scope="session")
def unix_pool_server(tmp_path_factory):
    """The process-isolated pool on a unix socket: same-host sessions with shared memory."""
    pool = Pool(tmp_path_factory.mktemp("unix-pool"), listen=unix_listen())
    yield pool
    pool.stop()


class CudaPool(Pool):
    """The same, serving the cuda backend's GPU 0 (2 GiB per device)."""
    backend = "cuda"


@pytest.fixture(scope="session")
def cuda_pool_server(tmp_path_factory):
    """One pool server over the cuda backend, shared by the whole run (needs a GPU)."""
    pool = CudaPool(tmp_path_factory.mktemp("cuda-pool"))
    yield pool
    pool.stop()


class BackendPool(Pool):
    """A pool server over a backend instance of the caller's."""

    def __init__(self, tmp_path, backend, **server_options):
        from harp.security import ephemeral_pool, server_credentials
        from harp.server import PoolServer
        self.server_tls, self.client_tls = ephemeral_pool(tmp_path)
        self.server = PoolServer(backend, trust_client_code=True, **server_options)
        self.address = self.server.start(["127.0.0.1:0"], server_credentials(self.server_tls),
                                         self.server_tls)[0]
        self.url = f"harp://{self.address}"


@pytest.fixture(scope="session")
def remote_cuda_emulated_pool(tmp_path_factory):
    """The cuda backend on the CuPy stand-in behind a pool server. Thread isolation: the
    stand-in is a module object of this process, which worker processes cannot import."""
    backend = backend_or_skip("cuda", memory="2GiB", cupy=emulated_cupy())
    pool = BackendPool(tmp_path_factory.mktemp("cuda-emulated-pool"), backend,
                       isolation="thread")
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def remote_opencl_pool(tmp_path_factory):
    """The opencl backend behind a pool server, sessions in worker processes."""
    pool = BackendPool(tmp_path_factory.mktemp("opencl-pool"),
                       backend_or_skip("opencl", memory="2GiB"))
    yield pool
    pool.stop()


@pytest.fixture(scope="session")
def remote_onnx_pool(tmp_path_factory):
    """The onnx backend behind a pool server, sessions in worker processes."""
    pool = BackendPool(tmp_path_factory.mktemp("onnx-pool"), backend_or_skip("onnx", memory="2GiB"))
    yield pool
    pool.stop()


@pytest.fixture
def fresh_pool(tmp_path):
    """A pool server of this test's own, for tests that inspect or break the server."""
    pool = Pool(tmp_path)
    yield pool
    pool.stop()


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
