"""deploy/kubernetes/ against Kubernetes 1.35's schemas (offline, strict: an unknown or
misspelt field fails), and against the driver itself: the commands its containers run
are valid `harp` command lines, the example's parameters are the driver's, the
DeviceClasses select its driver, the plugin mounts the kubelet's directories, and no
secret is committed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
FILES = sorted(ROOT.glob("*.yaml"))


def _docs():
    return [(path.name, doc) for path in FILES for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]


def _containers(doc):
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else spec
    return pod.get("containers", []) if doc["kind"] in ("Deployment", "DaemonSet", "Pod") else []


def test_there_are_the_manifests_the_docs_list():
    kinds = {doc["kind"] for _, doc in _docs()}
    assert {"Namespace", "Deployment", "DaemonSet", "Service", "PersistentVolumeClaim",
            "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DeviceClass",
            "ResourceClaimTemplate", "Pod"} <= kinds


@pytest.mark.parametrize("name,doc", _docs(), ids=lambda x: x if isinstance(x, str) else
                         f"{x.get('kind')}/{x.get('metadata', {}).get('name')}")
def test_each_manifest_is_valid_for_kubernetes_1_35(name, doc):
    import kubernetes_validate
    kubernetes_validate.validate(doc, "1.35.0", strict=True)


def test_the_validator_catches_a_wrong_field():
    import kubernetes_validate
    [device_class] = [d for _, d in _docs() if d["kind"] == "DeviceClass"][:1]
    bad = dict(device_class, spec={"selectors": [{"cell": {"expression": "true"}}]})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.35.0", strict=True)


def test_containers_run_valid_harp_command_lines():
    from harp.cli.main import build_parser
    seen = set()
    for _, doc in _docs():
        for container in _containers(doc):
            command = container.get("command", [])
            if command[:1] != ["harp"]:
                continue
            args = build_parser(command[1]).parse_args(command[1:])
            seen.add((args.command, getattr(args, "action", None)))
    assert {("scheduler", "serve"), ("server", "serve"), ("kubernetes", "plugin"),
            ("kubernetes", "controller")} <= seen


def test_the_example_and_the_classes_speak_the_drivers_language():
    from harp.k8s.parameters import parse
    docs = [d for _, d in _docs()]
    templates = [d for d in docs if d["kind"] == "ResourceClaimTemplate"]
    for template in templates:
        for config in template["spec"]["spec"]["devices"]["config"]:
            assert config["opaque"]["driver"] == "harp.dev"
            assert parse(config["opaque"]["parameters"])["memory"] == 4 << 30
    for device_class in (d for d in docs if d["kind"] == "DeviceClass"):
        assert all('device.driver == "harp.dev"' in s["cel"]["expression"]
                   for s in device_class["spec"]["selectors"])


def test_the_plugin_mounts_the_kubelets_directories_at_their_host_paths():
    [plugin] = [d for _, d in _docs() if d["kind"] == "DaemonSet" and
                d["metadata"]["name"] == "harp-dra-plugin"]
    pod = plugin["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert set(host.values()) == {"/var/lib/kubelet/plugins_registry",
                                  "/var/lib/kubelet/plugins", "/var/run/cdi"}
    assert all(mounts[name] == path for name, path in host.items())


def test_no_secret_is_committed():
    assert not [d for _, d in _docs() if d["kind"] == "Secret"]
    for path in ROOT.iterdir():
        assert "PRIVATE KEY" not in path.read_text()
