"""A cuda pool server (on the CuPy stand-in) against a hostile tenant's CUDA C.

The server compiles no tenant source unless it trusts client code; when it does, the
source may name no file but CUDA's own headers, so the `#include` trick that once put
the server's TLS key into a compile log gets a refusal that quotes nothing. Runs a real
`harp server serve --backend cuda` process with sessions in worker processes.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

import harp
from harp import security
from harp.backends.cuda import nvrtc

HERE = pathlib.Path(__file__).resolve().parent
FAKE = HERE / "fake_cupy"


def _needs_stand_in():
    if shutil.which(os.environ.get("CXX", "g++")) is None or not nvrtc.available()[0]:
        pytest.skip("the CuPy stand-in needs g++ (to emulate the catalog) and NVRTC")


def _serve(tmp_path, *extra):
    _needs_stand_in()
    certs = tmp_path / "certs"
    security.init_ca(certs)
    security.issue(certs, "server", "server")
    security.issue(certs, "client", "client")
    env = dict(os.environ, PYTHONPATH=str(FAKE), HARP_CUDA_CUPY="harp_fake_cupy")
    harp_cli = os.path.join(os.path.dirname(sys.executable), "harp")
    proc = subprocess.Popen([harp_cli, "server", "serve", "--backend", "cuda", "--listen",
                             "127.0.0.1:0", "--cert-dir", str(certs), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"the cuda server did not start: {line}{proc.stdout.read()}")
    url = line.split("listening on ")[1].split()[0]
    return proc, url, security.tls_files("client", directory=certs), certs / "server.key"


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _attacks(path):
    return [
        f'static_assert(false,\n#include "{path}"\n);\n',
        f'#define F "{path}"\n#include F\n',
        f'# /* hidden */ include "{path}"\n',
        f'#inc\\\nlude "{path}"\n',
        f'%:include "{path}"\n',
        '#include <../../../../../../../../etc/hostname>\n',
        f'#if __has_include("{path}")\nint x;\n#endif\n',
    ]


def _secret_lines(key):
    return [line for line in key.read_text().splitlines() if line and "-----" not in line]


def test_an_untrusting_server_compiles_no_tenant_source(tmp_path):
    proc, url, tls, key = _serve(tmp_path)
    try:
        with harp.connect(url, tls=tls) as dev:
            assert "cuda-source" not in dev.info.formats and "ptx" in dev.info.formats
            for attack in _attacks(key):
                dev.load_module(attack, "cuda-source")
                with pytest.raises(harp.PermissionDeniedError,
                                   match="compile on the client") as info:
                    dev.synchronize()
                assert not any(s in str(info.value) for s in _secret_lines(key))
            # harp.RawKernel sees a device without cuda-source and compiles PTX here
            kernel = harp.RawKernel('extern "C" __global__ void k(float* x) { x[0] = 1; }', "k")
            assert kernel.module._load(dev)[2] == "ptx"
            dev.synchronize()
    finally:
        assert _stop(proc) == 0


def test_a_trusting_server_compiles_with_cuda_headers_only(tmp_path):
    proc, url, tls, key = _serve(tmp_path, "--trust-client-code")
    try:
        with harp.connect(url, tls=tls) as dev:
            assert "cuda-source" in dev.info.formats
            for attack in _attacks(key):
                dev.load_module(attack, "cuda-source")
                with pytest.raises(harp.PermissionDeniedError) as info:
                    dev.synchronize()
                text = str(info.value)
                assert not any(s in text for s in _secret_lines(key)), text
            good = ('#include <cuda_fp16.h>\n'
                    'extern "C" __global__ void h(float* x) '
                    '{ x[0] = __half2float(__float2half(x[0])); }\n')
            dev.function(dev.load_module(good, "cuda-source"), "h")
            dev.synchronize()                      # CUDA's own headers compile
        # and SIGTERM still stops the server after a compile (it once did not)
        t0 = time.monotonic()
        assert _stop(proc) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
