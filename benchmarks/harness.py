"""What every benchmark section stands on: child processes, TLS material, timing.

Servers and limit peers run as child processes (`Child`), pinned to the server
core or the client core (`PLACEMENT`, from `--placement split`), and die with
the benchmark (their process group is signalled at `stop`, so a profiler's
child goes too). `Watchdog` bounds each section.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import platform


MiB = 1 << 20
HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")
Q = struct.Struct("<Q")
MSG64 = b"m" * 64
REC64 = b"r" * 64

#: Options of the bare gRPC channels and server (as in the transport-limits probe).
GRPC_OPTS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

LAUNCH_TARGET = 200_000.0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def emit(obj):
    sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


#: CPU sets for server and client processes (--placement split); empty = unpinned.
PLACEMENT: dict[str, set] = {"server": set(), "client": set()}


def _pdeathsig():
    """Child processes die with this script, even if it is SIGKILLed (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# ============================================================================
# TLS material
# ============================================================================

def tls_paths(cert_dir):
    """(server TlsFiles, client TlsFiles) of the ephemeral pool in cert_dir."""
    from pathlib import Path
    from harp.security import TlsFiles
    d = Path(cert_dir)
    return (TlsFiles(d / "ca.pem", d / "server.pem", d / "server.key"),
            TlsFiles(d / "ca.pem", d / "client.pem", d / "client.key"))


def ssl_server_ctx(cert_dir):
    import ssl
    srv, _ = tls_paths(cert_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(srv.cert), str(srv.key))
    ctx.load_verify_locations(str(srv.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED          # mutual TLS, like HARP
    return ctx


def ssl_client_ctx(cert_dir):
    import ssl
    _, cli = tls_paths(cert_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(cli.ca))
    ctx.load_cert_chain(str(cli.cert), str(cli.key))
    return ctx


def suite_conf(cert_dir, suite):
    """An OpenSSL config that forces one TLS 1.3 suite (Python's ssl cannot set them)."""
    path = os.path.join(cert_dir, "openssl-suite.cnf")
    with open(path, "w") as f:
        f.write("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n"
                "[ssl_sect]\nsystem_default = sysdef\n[sysdef]\n"
                "Ciphersuites = %s\n" % suite)
    return path


def grpc_cipher_probe(cert_dir):
    """Which TLS 1.3 suite gRPC's BoringSSL client prefers: point a channel at a
    Python ssl server that honours the client's preference (as limits.py does)."""
    import ssl
    import grpc
    from harp.security import channel_credentials
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    srv, cli = tls_paths(cert_dir)
    ctx.load_cert_chain(str(srv.cert), str(srv.key))
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["h2"])
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(5)
    res = {"cipher": None}

    def srv_thread():
        try:
            c, _ = ls.accept()
            c.settimeout(5)
            t = ctx.wrap_socket(c, server_side=True)
            res["cipher"] = t.cipher()[0]
            t.close()
        except Exception as exc:  # informational only
            res["error"] = str(exc)
    th = threading.Thread(target=srv_thread, daemon=True)
    th.start()
    ch = grpc.secure_channel("127.0.0.1:%d" % ls.getsockname()[1], channel_credentials(cli))
    try:
        grpc.channel_ready_future(ch).result(timeout=3)
    except Exception:
        pass
    th.join(6)
    ch.close()
    ls.close()
    return res["cipher"]


# ============================================================================
# process management
# ============================================================================

class Child:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, name, argv, env=None, stdin=False):
        self.name = name
        self.lines = queue.Queue()
        cpus = PLACEMENT["server" if "server" in name else "client"]

        def setup():
            _pdeathsig()
            if cpus:
                os.sched_setaffinity(0, cpus)
        # A process group of its own, so that `stop` reaches whatever it started (a
        # profiler's child, a pool server's workers) and nothing outlives the run.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
                                     stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                     preexec_fn=setup, process_group=0)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pred, timeout):
        """The first stdout line for which pred(line) holds, or RuntimeError."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("%s: no expected output within %.0f s" % (self.name, timeout))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError("%s exited (rc=%s) before it was ready"
                                   % (self.name, self.proc.poll()))
            if pred(line):
                return line

    def command(self, text, timeout):
        """Send one command line; return the JSON of its RESULT line."""
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self.wait_line(lambda ln: ln.startswith("RESULT "), timeout)
        return json.loads(line[7:])

    def pid_to_signal(self):
        """The process to signal: under py-spy, the profiled grandchild."""
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                kids = f.read().split()
            if kids and os.path.basename(self.proc.args[0]).startswith("py-spy"):
                return int(kids[0])
        except OSError:
            pass
        return self.proc.pid

    def stop(self, timeout=10):
        """Ask the child to stop (SIGTERM to the profiled process under py-spy, so that
        py-spy writes its output), then end its whole process group."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    try:
                        self.proc.stdin.write("quit\n")
                        self.proc.stdin.flush()
                        self.proc.stdin.close()
                    except (OSError, ValueError):
                        pass
                try:
                    os.kill(self.pid_to_signal(), signal.SIGTERM)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2 if sig == signal.SIGTERM else 0)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Watchdog:
    """Bounds each section: when it runs late, kill the servers (so a blocked client
    call fails), and if that does not unblock us, exit the process."""

    def __init__(self, children):
        self.children = children
        self.timer = None
        self.fired = None

    def arm(self, seconds, what):
        self.disarm()
        self.timer = threading.Timer(seconds, self._fire, (what, seconds))
        self.timer.daemon = True
        self.timer.start()

    def disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self, what, seconds):
        self.fired = what
        log("!! watchdog: %s ran past %.0f s; killing the servers" % (what, seconds))
        for c in list(self.children):
            try:
                c.proc.kill()
            except Exception:
                pass

        def last_resort():
            log("!! watchdog: still stuck; exiting")
            import faulthandler
            faulthandler.dump_traceback(all_threads=True)
            os._exit(3)
        t = threading.Timer(30, last_resort)
        t.daemon = True
        t.start()


def harp_server_argv(cert_dir, memory="2GiB", extra=(), listen="127.0.0.1:0"):
    exe = os.path.join(os.path.dirname(sys.executable), "harp")
    head = [exe] if os.path.exists(exe) else \
        [sys.executable, "-c", "import sys; from harp.cli.main import main; sys.exit(main())"]
    return head + ["server", "serve", "--listen", listen, "--cert-dir", cert_dir,
                   "--memory", memory, *extra]


def start_harp_server(cert_dir, children, prefix=(), memory="2GiB", extra=(),
                      listen="127.0.0.1:0"):
    c = Child("harp server", list(prefix) + harp_server_argv(cert_dir, memory, extra, listen))
    children.append(c)
    line = c.wait_line(lambda ln: "listening on harp://" in ln, 60)
    url = line.split("listening on ")[1].split()[0]
    return c, url


def start_role(role, a, children, extra=(), env=None, stdin=False):
    argv = [sys.executable, HERE, "--role", role, "--cert-dir", a.cert_dir,
            "--bulk", str(a.bulk)] + list(extra)
    c = Child(role, argv, env=env, stdin=stdin)
    children.append(c)
    line = c.wait_line(lambda ln: ln.startswith("READY"), 60)
    return c, line.split()[1:]


# ============================================================================
# measurements
# ============================================================================

def timed_rate(fn, dur, per=1, batch=32):
    """Calls fn() in batches until dur seconds pass; returns calls/s * per."""
    cnt = 0
    t0 = time.perf_counter()
    deadline = t0 + dur
    while True:
        for _ in range(batch):
            fn()
        cnt += batch
        now = time.perf_counter()
        if now >= deadline:
            return cnt * per / (now - t0)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds one process has used (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, idle ticks) of the machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def idle_fraction(seconds: float = 0.5) -> float:
    """The share of the machine's CPU time that was idle over the next `seconds`."""
    (t0, i0) = machine_ticks()
    time.sleep(seconds)
    (t1, i1) = machine_ticks()
    return (i1 - i0) / max(1, t1 - t0)


def settle(max_wait: float = 30.0, idle: float = 0.9) -> tuple[float, float]:
    """Wait (at most `max_wait` s) until the machine is at least `idle` idle: what an earlier
    section or run left behind (a hundred exiting session processes) must not be measured
    as the next section's noise. Returns (seconds waited, the idle share last seen)."""
    t0 = time.time()
    seen = idle_fraction()
    while seen < idle and time.time() - t0 < max_wait:
        seen = idle_fraction()
    return time.time() - t0, seen


def machine_meta(a):
    import grpc
    import msgpack
    import numpy
    import harp
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    meta = {"cpu_model": cpu, "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "placement": {k: sorted(v) for k, v in PLACEMENT.items()} if PLACEMENT["server"]
            else "free",
            "python": platform.python_version(), "grpc": grpc.__version__,
            "numpy": numpy.__version__, "msgpack": ".".join(map(str, msgpack.version)),
            "harp": harp.__version__, "kernel": platform.release(),
            "loadavg_start": " ".join("%.2f" % x for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "reps": a.reps, "bulk_bytes": a.bulk, "dur_s": a.dur, "launch_s": a.launch_s,
            "local_s": a.local_s, "quick": a.quick}
    try:
        meta["git_head"] = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.dirname(HERE)), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", os.path.dirname(os.path.dirname(HERE)), "status", "--porcelain",
             "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.split("\n")
        meta["git_modified"] = [ln[3:] for ln in dirty if ln.strip()]
    except Exception:
        pass
    return meta
