"""Running the numba programs of tests/numba/programs as a user runs them.

Each program runs (a) in Numba's CUDA simulator without HARP (the reference),
(b) under `harp run --device local:cpu`, (c) under `harp run --device harp://...`
against the session's pool server. The simulator runs every CUDA thread as a
Python thread, so the programs keep their grids small, and runs go in parallel.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import harp
from harp.types import DeviceInfo

PROGRAMS_DIR = Path(__file__).parent / "programs"
PROGRAMS = ["saxpy", "matmul", "reduction", "histogram", "pipeline"]
BIN = Path(sys.executable).parent
HARP = str(BIN / "harp")
#: Variables of HARP and numba that must not leak from the test run into the programs.
CLEAN = ("HARP_RUN_DEVICE", "HARP_RUN_TRACE", "HARP_RUN_CERT_DIR", "HARP_DEVICE", "HARP_TRACE",
         "HARP_TRACE_PAYLOADS", "NUMBA_ENABLE_CUDASIM")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"   # `python` is this interpreter
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def reference_cmd(program: str) -> list[str]:
    return ["python", str(PROGRAMS_DIR / f"{program}.py")]


def harp_run_cmd(program: str, *options: str) -> list[str]:
    return [HARP, "run", *options, "--", "python", str(PROGRAMS_DIR / f"{program}.py")]


def remote_options(pool) -> list[str]:
    tls = pool.client_tls
    return ["--device", pool.url, "--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert),
            "--tls-key", str(tls.key)]


def run_all(jobs: dict, cwd: Path, workers: int = 3) -> dict:
    """Run {key: (cmd, env)} concurrently; {key: CompletedProcess}."""
    with ThreadPoolExecutor(workers) as pool:
        futures = {k: pool.submit(run, cmd, env, cwd) for k, (cmd, env) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


@pytest.fixture(scope="session")
def hook_installed():
    """`harp run --install-hook` once (harp run installs it on first use anyway)."""
    out = subprocess.run([HARP, "run", "--install-hook"], capture_output=True, text=True,
                         env=base_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="session")
def program_runs(pool_server, tmp_path_factory, hook_installed):
    """Every program: the simulator reference, harp run local:cpu, harp run remote."""
    cwd = tmp_path_factory.mktemp("programs")
    jobs = {}
    for p in PROGRAMS:
        jobs[(p, "reference")] = (reference_cmd(p), base_env(NUMBA_ENABLE_CUDASIM="1"))
        jobs[(p, "local")] = (harp_run_cmd(p, "--device", "local:cpu"), base_env())
        jobs[(p, "remote")] = (harp_run_cmd(p, *remote_options(pool_server)), base_env())
    return run_all(jobs, cwd)


def _ptxas() -> str | None:
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "bin" / "ptxas"
    return str(path) if path.exists() else None


@pytest.fixture(scope="session")
def ptxas():
    """ptxas from the nvidia-cuda-nvcc wheel (numba-cuda[cu12] brings it)."""
    path = _ptxas()
    if path is None:
        pytest.skip("ptxas not installed (pip install 'harp[numba]' brings nvidia-cuda-nvcc)")
    return path


def assemble(ptxas: str, ptx_file: Path, arch: str = "sm_90") -> None:
    """Assemble PTX with ptxas; fail the test with ptxas's message if it does not."""
    out = subprocess.run([ptxas, f"-arch={arch}", str(ptx_file), "-o",
                          str(ptx_file.with_suffix(".cubin"))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert ptx_file.with_suffix(".cubin").stat().st_size > 0


class RecordingDevice(harp.Device):
    """A test double for a CUDA device: memory is a real local cpu device, but it says it
    takes `formats` (compute capability 9.0) and records the modules, functions and launches
    it is sent instead of running them."""

    def __init__(self, formats: tuple[str, ...] = ("ptx", "catalog")) -> None:
        self.inner = harp.connect("local:cpu")
        base = self.inner.info
        self._info = DeviceInfo(kind="gpu", name="recording device", backend="test", index=0,
                                memory=base.memory, compute_capability=(9, 0),
                                formats=formats)
        self.modules: list[tuple[str, str]] = []
        self.functions: list[str] = []
        self.launches: list[tuple[str, tuple, tuple, list, int]] = []

    info = property(lambda self: self._info)

    def load_module(self, image, format):
        self.modules.append((format, image if isinstance(image, str) else image.decode()))
        return harp.Module(len(self.modules), format)

    def function(self, module, name):
        self.functions.append(name)
        return harp.Function(len(self.functions), name)

    def launch(self, fn, grid, block, args, shared_mem=0, stream=None):
        self.launches.append((fn.name, grid, block, list(args), shared_mem))

    # memory, streams and events: the cpu device's
    mem_info = lambda self: self.inner.mem_info()                         # noqa: E731
    alloc = lambda self, n: self.inner.alloc(n)                           # noqa: E731
    free = lambda self, b: self.inner.free(b)                             # noqa: E731
    write = lambda self, *a, **k: self.inner.write(*a, **k)               # noqa: E731
    read = lambda self, *a, **k: self.inner.read(*a, **k)                 # noqa: E731
    copy = lambda self, *a, **k: self.inner.copy(*a, **k)                 # noqa: E731
    fill = lambda self, *a, **k: self.inner.fill(*a, **k)                 # noqa: E731
    stream = lambda self: self.inner.stream()                             # noqa: E731
    event = lambda self: self.inner.event()                               # noqa: E731
    record = lambda self, *a, **k: self.inner.record(*a, **k)             # noqa: E731
    wait = lambda self, *a, **k: self.inner.wait(*a, **k)                 # noqa: E731
    synchronize = lambda self, *a, **k: self.inner.synchronize(*a, **k)   # noqa: E731
    elapsed = lambda self, *a: self.inner.elapsed(*a)                     # noqa: E731
    close = lambda self: self.inner.close()                               # noqa: E731
