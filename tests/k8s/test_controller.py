"""The controller against the Kubernetes client's API objects: the ResourceSlices it
creates, replaces and deletes as the real pool changes, read back with the client's own
deserializer and validated against Kubernetes 1.35's schema."""
from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import HARP, MiB, ApiServer, deserialize, wait_until


def _valid(body):
    import kubernetes_validate
    kubernetes_validate.validate(body, "1.35.0", strict=True)


def _attributes(device):
    return {k: v.string if v.string is not None else v.int for k, v in device.attributes.items()}


@pytest.fixture(scope="module")
def api():
    server = ApiServer()
    try:
        yield server
    finally:
        server.close()


def _up(pool, name, devices):
    return wait_until(lambda: any(s["name"] == name and s["state"] == "up" and
                                  len(s["devices"]) == devices for s in pool.cli("pool", "ls")))


def test_slices_follow_the_pool(pool, api, tmp_path):
    from harp.client import SchedulerClient
    from harp.k8s.apiclient import resource_api
    from harp.k8s.controller import SliceController
    kubeconfig = api.kubeconfig(tmp_path / "config")
    env = {k: v for k, v in pool.env.items() if not k.startswith("HARP_")}
    once = [HARP, "kubernetes", "controller", "--once", "--json", "--kubeconfig",
            str(kubeconfig), "--scheduler", pool.url, "--cert-dir", str(pool.certs),
            "--cert-name", "dra-controller"]

    # the command line, one pass: the pool server p1 (two 256 MiB cpu devices) appears
    result = subprocess.run(once, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"created": ["harp.dev-p1"], "updated": [],
                                         "deleted": [], "unchanged": []}
    [(method, path, body)] = api.writes()
    assert (method, path) == ("POST", "/apis/resource.k8s.io/v1/resourceslices")
    _valid(body)
    created = deserialize(body, "V1ResourceSlice")
    assert created.spec.driver == "harp.dev" and created.spec.all_nodes is True
    assert (created.spec.pool.name, created.spec.pool.generation,
            created.spec.pool.resource_slice_count) == ("p1", 1, 1)
    assert [d.name for d in created.spec.devices] == ["cpu-0", "cpu-1"]
    assert _attributes(created.spec.devices[1]) == {
        "kind": "cpu", "backend": "cpu", "server": "p1", "index": 1,
        "model": _attributes(created.spec.devices[1])["model"]}
    assert created.spec.devices[0].capacity["memory"].value == str(256 * MiB)

    with SchedulerClient(pool.url, tls=pool.identity("client", "dra-controller")) as s:
        controller = SliceController(resource_api(str(kubeconfig)), s, "harp.dev")
        before = len(api.writes())
        assert controller.reconcile().unchanged == ["harp.dev-p1"]
        assert len(api.writes()) == before                # nothing changed, nothing written

        # a new server: a new slice; the same server back with other devices: replaced
        pool.start_server("c2", "64MiB", 2)
        assert controller.reconcile().created == ["harp.dev-c2"]
        pool.kill(pool.servers.pop("c2"))
        pool.start_server("c2", "128MiB", 1)
        assert _up(pool, "c2", 1)
        report = controller.reconcile()
        assert (report.updated, report.unchanged) == (["harp.dev-c2"], ["harp.dev-p1"])
        method, path, body = api.writes()[-1]
        assert (method, path) == ("PUT", "/apis/resource.k8s.io/v1/resourceslices/harp.dev-c2")
        _valid(body)
        replaced = deserialize(body, "V1ResourceSlice")
        assert replaced.spec.pool.generation == 2
        assert [(d.name, d.capacity["memory"].value) for d in replaced.spec.devices] == \
            [("cpu-0", str(128 * MiB))]

        # drained (and then gone): its slice is deleted
        pool.cli("server", "drain", "c2")
        assert controller.reconcile().deleted == ["harp.dev-c2"]
        assert api.writes()[-1][:2] == ("DELETE",
                                       "/apis/resource.k8s.io/v1/resourceslices/harp.dev-c2")
        pool.kill(pool.servers.pop("c2"))
        assert [s["metadata"]["name"] for s in api.slices()] == ["harp.dev-p1"]
        assert controller.reconcile().unchanged == ["harp.dev-p1"]


def test_the_controller_says_when_the_api_server_is_away(pool, tmp_path):
    dead = ApiServer()
    kubeconfig = dead.kubeconfig(tmp_path / "config")
    dead.close()
    env = {k: v for k, v in pool.env.items() if not k.startswith("HARP_")}
    result = subprocess.run([HARP, "kubernetes", "controller", "--once", "--kubeconfig",
                             str(kubeconfig), "--scheduler", pool.url, "--cert-dir",
                             str(pool.certs), "--cert-name", "dra-controller"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("harp kubernetes: error: the Kubernetes API:")
    assert "Traceback" not in result.stderr
