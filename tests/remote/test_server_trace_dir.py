"""`harp server serve --trace-dir`: the pool server records every session."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np

import harp
from harp import security
from harp.trace import open_trace

HARP = os.path.join(os.path.dirname(sys.executable), "harp")


def test_server_records_each_session_into_the_trace_dir(tmp_path):
    certs = tmp_path / "certs"
    server_tls, client_tls = security.ephemeral_pool(certs)
    traces = tmp_path / "traces"
    proc = subprocess.Popen([HARP, "server", "serve", "--listen", "127.0.0.1:0",
                             "--tls-ca", str(server_tls.ca), "--tls-cert", str(server_tls.cert),
                             "--tls-key", str(server_tls.key), "--trace-dir", str(traces)],
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split("listening on ")[1].split()[0]
        ids = []
        for n in (3, 5):
            with harp.connect(url, tls=client_tls) as dev:
                ids.append(dev.session_id)
                buf = dev.alloc(4 * n)
                dev.write(buf, 0, np.arange(n, dtype=np.int32))
                assert np.array_equal(np.frombuffer(dev.read(buf, 0, 4 * n), np.int32),
                                      np.arange(n, dtype=np.int32))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        proc.stdout.close()
    files = sorted(p.name for p in traces.iterdir())
    assert files == sorted(f"{i}.harptrace" for i in ids)
    for session_id in ids:
        trace = open_trace(traces / f"{session_id}.harptrace")
        apis = [c.api for c in trace.calls()]
        assert apis[:3] == ["alloc", "write", "read"]
        assert trace.complete
