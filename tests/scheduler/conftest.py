"""A real pool on loopback: a scheduler process and pool server processes, all with mTLS;
and a real PostgreSQL server for the replicated store (`postgres`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harp import security

from .pgserver import PostgresServer, unavailable

HARP = os.path.join(os.path.dirname(sys.executable), "harp")


def wait_until(predicate, timeout=15.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class Cluster:
    """Processes of one test pool, and the client-side settings to reach it."""

    def __init__(self, root: Path, heartbeat: float = 0.5):
        self.root = root
        self.certs = root / "certs"
        security.init_ca(self.certs)
        security.issue(self.certs, "server", "server")       # the scheduler's
        security.issue(self.certs, "client", "client")
        security.issue(self.certs, "admin", "admin")
        self.data = root / "scheduler"
        self.heartbeat = heartbeat
        self.env = dict(os.environ, HARP_CERT_DIR=str(self.certs),
                        HARP_LEASE=str(root / "lease.json"), XDG_CONFIG_HOME=str(root / "cfg"))
        self.client_tls = security.tls_files("client", directory=self.certs)
        self.scheduler = None
        self.scheduler_port = 0
        self.servers: dict[str, subprocess.Popen] = {}

    def _spawn(self, args):
        proc = subprocess.Popen([HARP, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=self.env)
        line = proc.stdout.readline()
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"{args[0]} did not start: {line}{proc.stdout.read()}")
        return proc, line

    def start_scheduler(self, token_ttl=None, extra=()):
        extra = (["--token-ttl", str(token_ttl)] if token_ttl else []) + list(extra)
        proc, line = self._spawn(["scheduler", "serve", "--listen",
                                  f"127.0.0.1:{self.scheduler_port}", "--data-dir",
                                  str(self.data), "--heartbeat", str(self.heartbeat),
                                  "--cert-dir", str(self.certs), *extra])
        self.scheduler = proc
        self.url = line.split("listening on ")[1].split()[0]
        self.scheduler_port = int(self.url.rsplit(":", 1)[1])
        self.env["HARP_SCHEDULER"] = self.url

    def identity(self, role, name):
        """Certificates for another identity (issued once), and their TLS files."""
        if not (self.certs / f"{name}.pem").exists():
            security.issue(self.certs, role, name)
        return security.tls_files(role, name, directory=self.certs)

    def start_server(self, name, memory="256MiB", devices=1, *extra):
        self.identity("server", name)        # a pool server registers under its cert's name
        proc, _ = self._spawn(["server", "serve", "--listen", "127.0.0.1:0", "--name", name,
                               "--scheduler", self.url, "--memory", memory,
                               "--devices", str(devices), "--cert-dir", str(self.certs),
                               "--cert-name", name, *extra])
        self.servers[name] = proc
        assert wait_until(lambda: any(s["name"] == name and s["state"] == "up"
                                      for s in self.cli("pool", "ls")))
        return proc

    def kill(self, proc, sig=signal.SIGKILL):
        proc.send_signal(sig)
        proc.wait(15)
        proc.stdout.close()

    def cli(self, *args, check=True, json_out=True):
        cmd = [HARP, *args] + (["--json"] if json_out else [])
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {result.stderr}")
        if not json_out or result.returncode != 0:
            return result
        return json.loads(result.stdout)

    def scheduler_client(self, tls=None):
        from harp.client import SchedulerClient
        return SchedulerClient(self.url, tls=tls or self.client_tls)

    def stop(self):
        for proc in [*self.servers.values(), self.scheduler]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc is not None and not proc.stdout.closed:
                proc.stdout.close()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    c.start_scheduler()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server from the machine's binaries for the whole run (skipped, saying
    why, where none can start)."""
    why = unavailable()
    if why is not None:
        pytest.skip(f"no PostgreSQL for the replicated store: {why}")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
