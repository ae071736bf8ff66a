"""The kubelet plugin, played by the kubelet over its real unix sockets (real gRPC, the
vendored kubelet protos), against a real scheduler and pool server: a prepared claim's
CDI spec gives a process what `harp.connect()` needs to open the device, unprepare
detaches the lease (and ends the open session), state survives a plugin restart, and
bad claims get clear errors, each its own."""
from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import (HARP, MiB, ApiServer, Kubelet, container_env, make_claim, params,
                       run_in_container, wait_until)

DATA = Path(__file__).parent / "data"

CONNECT = """
import numpy as np, harp
dev = harp.connect()
buf = dev.alloc(4096)
dev.write(buf, 0, np.arange(1024, dtype=np.float32))
out = np.frombuffer(dev.read(buf, 0, 4096), np.float32)
assert out[7] == 7.0, out[:8]
print(dev.lease.lease_id, dev.info.kind, dev.mem_info().total)
dev.close()
"""

HOLD = """
import sys, time, harp
dev = harp.connect()
dev.alloc(1024)
dev.synchronize()
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        dev.synchronize()
    except harp.HarpError as exc:
        print(type(exc).__name__, exc, flush=True)
        break
    time.sleep(0.05)
else:
    print("still open", flush=True)
"""


class Plugin:
    """`harp kubernetes plugin` as a process of its own."""

    def __init__(self, pool, root: Path, kubeconfig: Path) -> None:
        self.root = root
        self.registry = root / "registry"
        self.plugin_dir = root / "plugin"
        self.cdi_dir = root / "cdi"
        self.args = [HARP, "kubernetes", "plugin", "--node-name", "node1",
                     "--kubeconfig", str(kubeconfig), "--registry-dir", str(self.registry),
                     "--plugin-dir", str(self.plugin_dir), "--cdi-dir", str(self.cdi_dir),
                     "--scheduler", pool.url, "--cert-dir", str(pool.certs),
                     "--cert-name", "dra-node1", "--pod-cert-dir", str(pool.certs),
                     "--pod-cert-name", "pod"]
        self.env = {k: v for k, v in pool.env.items() if not k.startswith("HARP_")}
        self.proc = None

    def start(self) -> str:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"the plugin did not start: {line}{self.proc.stdout.read()}")
        return line

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def node(pool, tmp_path_factory):
    """A node: the API server with the pool's ResourceSlices published, the plugin, and
    the kubelet that registered it."""
    import tempfile
    from harp.client import SchedulerClient
    from harp.k8s.apiclient import resource_api
    from harp.k8s.controller import SliceController
    api = ApiServer()
    root = Path(tempfile.mkdtemp(prefix="hk8s-", dir="/tmp"))   # short: unix socket paths
    kubeconfig = api.kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    with SchedulerClient(pool.url, tls=pool.identity("client", "dra-controller")) as s:
        SliceController(resource_api(str(kubeconfig)), s, "harp.dev").reconcile()
    plugin = Plugin(pool, root, kubeconfig)
    try:
        plugin.start()
        kubelet = Kubelet(plugin.registry)
        info = kubelet.register()
        yield SimpleNamespace(api=api, plugin=plugin, kubelet=kubelet, info=info, root=root,
                              owner=pool.identity("client", "dra-node1"))
    finally:
        plugin.stop()
        api.close()
        import shutil
        shutil.rmtree(root, ignore_errors=True)


def _leases(pool, node, ended=False):
    from harp.client import SchedulerClient
    with SchedulerClient(pool.url, tls=node.owner) as s:
        return {x.lease_id: x for x in s.leases(include_ended=ended)}


def _spec(node, uid):
    return json.loads((node.plugin.cdi_dir / f"k8s.harp.dev-claim_{uid}.json").read_text())


def _check_cdi_schema(spec):
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7
    schema = json.loads((DATA / "cdi-schema.json").read_text())
    defs = Resource.from_contents(json.loads((DATA / "defs.json").read_text()), DRAFT7)
    jsonschema.Draft7Validator(schema, registry=Registry().with_resource("defs.json", defs)) \
        .validate(spec)


def test_the_kubelet_registers_the_plugin(node):
    assert node.info.type == "DRAPlugin"
    assert node.info.name == "harp.dev"
    assert node.info.endpoint == str(node.plugin.plugin_dir / "dra.sock")
    assert list(node.info.supported_versions) == ["v1.DRAPlugin"]
    for sock in (Path(node.info.endpoint), node.plugin.registry / "harp.dev-reg.sock"):
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600


def test_a_prepared_claim_opens_its_device_and_unprepare_detaches_it(pool, node, tmp_path):
    uid = "7f1c2a9e-0000-4000-8000-000000000001"
    ref = ("default", uid, "train")
    node.api.put_claim(make_claim("train", uid, [("gpu", "p1", "cpu-0")],
                                  [("FromClaim", [], params(memory="32MiB", share=0.5))]))
    answer = node.kubelet.prepare(ref).claims[uid]
    assert answer.error == ""
    [device] = answer.devices
    assert (list(device.request_names), device.pool_name, device.device_name) == \
        (["gpu"], "p1", "cpu-0")
    assert list(device.cdi_device_ids) == [f"k8s.harp.dev/claim={uid}-gpu"]

    spec = _spec(node, uid)
    _check_cdi_schema(spec)
    assert spec["kind"] == "k8s.harp.dev/claim" and spec["cdiVersion"] == "0.5.0"
    edits = spec["devices"][0]["containerEdits"]
    assert {e.split("=", 1)[0] for e in edits["env"]} == \
        {"HARP_LEASE", "HARP_DEVICE", "HARP_TLS_CA", "HARP_TLS_CERT", "HARP_TLS_KEY"}
    assert "HARP_DEVICE=lease:/var/run/harp/gpu/lease.json" in edits["env"]
    [mount] = edits["mounts"]
    assert mount["containerPath"] == "/var/run/harp/gpu" and "ro" in mount["options"]
    host = Path(mount["hostPath"])
    assert stat.S_IMODE(host.stat().st_mode) == 0o700
    assert sorted(p.name for p in host.iterdir()) == ["ca.pem", "client.key", "client.pem",
                                                      "lease.json"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in host.iterdir())
    handed = json.loads((host / "lease.json").read_text())
    assert handed["scheduler"] == ""                    # the pod does not renew: the plugin does
    assert (host / "client.pem").read_bytes() == (pool.certs / "pod.pem").read_bytes()

    env = container_env(spec, f"{uid}-gpu")
    lease_id, kind, total = run_in_container(env, CONNECT, tmp_path).split()
    assert (kind, int(total)) == ("cpu", 32 * MiB)
    lease = _leases(pool, node)[lease_id]
    assert lease.owner == "dra-node1" and "default/train gpu on node1" in lease.client_name
    assert lease.share == 0.5

    again = node.kubelet.prepare(ref).claims[uid]     # the kubelet repeats itself: same answer
    assert again == answer and lease_id in _leases(pool, node)
    assert sum("default/train" in x.client_name for x in _leases(pool, node).values()) == 1

    token = handed["devices"][0]["token"]             # tokens live 6 s: the plugin renews
    assert wait_until(lambda: json.loads((host / "lease.json").read_text())["devices"][0]
                      ["token"] != token, timeout=20)

    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=env, cwd=tmp_path, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert node.kubelet.unprepare(ref).claims[uid].error == ""
        holder.stdin.write("go\n")
        holder.stdin.flush()
        said = holder.stdout.readline()
        assert said.startswith("LeaseError"), said + holder.stdout.read()
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    assert _leases(pool, node, ended=True)[lease_id].state == "ended"
    assert not host.exists() and not (node.plugin.cdi_dir /
                                      f"k8s.harp.dev-claim_{uid}.json").exists()
    assert node.kubelet.unprepare(ref).claims[uid].error == ""     # again: nothing to do


def test_prepared_claims_survive_a_plugin_restart(pool, node):
    uid = "7f1c2a9e-0000-4000-8000-000000000002"
    ref = ("ml", uid, "keep")
    node.api.put_claim(make_claim("keep", uid, [("accel", "p1", "cpu-1")], namespace="ml"))
    first = node.kubelet.prepare(ref).claims[uid]
    assert first.error == ""
    state = json.loads((node.plugin.plugin_dir / "claims" / uid / "state.json").read_text())
    lease_id = state["requests"][0]["lease_id"]

    node.plugin.stop(signal.SIGKILL)                   # a crash, not a clean stop
    assert "1 claim(s) prepared" in node.plugin.start()
    node.kubelet.register()
    assert node.kubelet.prepare(ref).claims[uid] == first        # from its state on disk
    lease_file = node.plugin.plugin_dir / "claims" / uid / "accel" / "lease.json"
    token = json.loads(lease_file.read_text())["devices"][0]["token"]
    assert wait_until(lambda: json.loads(lease_file.read_text())["devices"][0]["token"]
                      != token, timeout=20)             # renewing again
    assert node.kubelet.unprepare(ref).claims[uid].error == ""
    assert _leases(pool, node, ended=True)[lease_id].state == "ended"


def test_bad_claims_get_clear_errors_each_and_leave_no_lease(pool, node):
    def uid(n):
        return f"7f1c2a9e-0000-4000-8000-0000000001{n:02d}"
    claims = {
        "good": make_claim("good", uid(1), [("a", "p1", "cpu-0")],
                           [("FromClaim", [], params(memory="16MiB", share=0.25))]),
        "share": make_claim("share", uid(2), [("a", "p1", "cpu-0")],
                            [("FromClaim", ["a"], params(share=2))]),
        "field": make_claim("field", uid(3), [("a", "p1", "cpu-0")],
                            [("FromClaim", [], params(memroy="1GiB"))]),
        "kind": make_claim("kind", uid(4), [("a", "p1", "cpu-0")],
                           [("FromClass", [], {"apiVersion": "v1", "kind": "Other"})]),
        "stale": make_claim("stale", "another-uid", [("a", "p1", "cpu-0")]),
        "unallocated": make_claim("unallocated", uid(6), [("a", "p1", "cpu-0")],
                                  allocated=False),
        "big": make_claim("big", uid(7), [("a", "p1", "cpu-0")],
                          [("FromClaim", [], params(memory="1GiB"))]),
        "partial": make_claim("partial", uid(8), [("a", "p1", "cpu-0"), ("b", "p1", "cpu-1")],
                              [("FromClaim", [], params(memory="16MiB", share=0.25)),
                               ("FromClaim", ["b"], params(memory="1GiB"))]),
        "gone": make_claim("gone", uid(9), [("a", "p1", "npu-7")]),
    }
    for claim in claims.values():
        node.api.put_claim(claim)
    refs = [("default", c.metadata.uid if n != "stale" else uid(5), n) for n, c in claims.items()]
    refs.append(("default", uid(10), "missing"))
    answer = node.kubelet.prepare(*refs).claims
    assert set(answer) == {r[1] for r in refs}         # an entry for every claim
    errors = {name: answer[u].error for _, u, name in refs}
    assert errors["good"] == "" and len(answer[uid(1)].devices) == 1
    expected = {
        "share": "request a: the claim's parameters for harp.dev: share must be a number in "
                 "(0, 1], got 2",
        "field": "unknown parameter(s) memroy",
        "kind": "the device class's parameters for harp.dev: parameters must say apiVersion: "
                "harp.dev/v1 and kind: LeaseParameters",
        "stale": f"has UID another-uid, not {uid(5)} (it was replaced)",
        "unallocated": "it is not allocated",
        "big": "no capacity for 1 cpu(s)",
        "partial": "no capacity for 1 cpu(s)",
        "gone": "device npu-7 of pool p1 is not in the driver's ResourceSlices",
        "missing": "the API server has no such claim",
    }
    for name, text in expected.items():
        assert text in errors[name], (name, errors[name])
        assert errors[name].startswith(f"claim default/{name} ("), errors[name]
    mine = [x.client_name for x in _leases(pool, node).values()]
    assert sum("default/good" in n for n in mine) == 1
    assert not any(f"default/{name} " in n for n in mine for name in expected)   # none leaked
    assert not any((node.plugin.plugin_dir / "claims" / u).exists()
                   for _, u, name in refs if name != "good")
    assert node.kubelet.unprepare(*refs).claims[uid(1)].error == ""
    assert not any("default/good" in x.client_name for x in _leases(pool, node).values())


def test_a_lease_address_names_a_lease_file(tmp_path):
    import harp
    with pytest.raises(harp.ArgumentError, match="a lease address is lease:PATH"):
        harp.connect("lease:")
    with pytest.raises(harp.LeaseError, match="no lease at"):
        harp.connect(f"lease:{tmp_path}/none.json")


def test_the_plugin_refuses_to_hand_pods_its_own_identity_or_a_server_certificate(pool):
    for name, says in (("dra-node1", "is the plugin's own identity (dra-node1)"),
                       ("server", "is a server certificate")):
        result = subprocess.run(
            [HARP, "kubernetes", "plugin", "--kubeconfig", "/nonexistent", "--cert-dir",
             str(pool.certs), "--cert-name", "dra-node1", "--pod-cert-dir", str(pool.certs),
             "--pod-cert-name", name], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
