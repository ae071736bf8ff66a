"""What the DRA driver's tests stand on: a real pool, an API server and a kubelet, played.

- `pool`: a real scheduler and a real cpu pool server (processes, mutual TLS, loopback),
  shared by the package's tests, with certificates for the plugin ("dra-node1", whose
  leases they are) and for pods ("pod").
- `ApiServer`: a loopback HTTP server that answers the `resource.k8s.io/v1` paths the
  driver calls (claims, ResourceSlices: get, list with field selectors, create, replace
  with resourceVersion checks, delete), holding JSON made from the Kubernetes client's
  own model objects, so the driver's real client serializes and deserializes.
- `Kubelet`: the kubelet's side of the plugin registration and DRA gRPC APIs, over the
  plugin's real unix sockets, with the vendored protos.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import pytest

from scheduler.conftest import HARP, Cluster, wait_until  # noqa: F401 - tests use them

GROUP = "/apis/resource.k8s.io/v1"
DRIVER = "harp.dev"
MiB = 1 << 20


def serialize(model: Any) -> Any:
    """A Kubernetes client model as the API server's JSON."""
    from kubernetes.client import ApiClient
    return ApiClient().sanitize_for_serialization(model)


def deserialize(body: Any, kind: str) -> Any:
    """JSON as the Kubernetes client reads it (its own deserializer)."""
    from kubernetes.client import ApiClient

    class Response:
        data = json.dumps(body)
    return ApiClient().deserialize(Response(), kind)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
            "reason": reason, "message": message}


def _matches(obj: dict[str, Any], selector: str) -> bool:
    """A field selector of `a.b=value` terms joined by commas (what the API allows here)."""
    for term in filter(None, selector.split(",")):
        path, _, value = term.partition("=")
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if str(node) != value:
            return False
    return True


class ApiServer:
    """The API server's resource.k8s.io/v1 paths the driver uses, on 127.0.0.1:0."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}     # path -> object JSON
        self.requests: list[tuple[str, str, Any]] = []   # (method, path, body)
        self.lock = threading.Lock()
        self._rv = itertools.count(100)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def _send(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                body = self._body() if method in ("POST", "PUT") else None
                with server.lock:
                    server.requests.append((method, url.path, body))
                    code, obj = server.answer(method, url.path, parse_qs(url.query), body)
                self._send(code, obj)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}]}))
        return path

    # -- the store -----------------------------------------------------------------------

    def put_claim(self, claim: Any) -> None:
        obj = serialize(claim)
        meta = obj["metadata"]
        with self.lock:
            self.objects[f"{GROUP}/namespaces/{meta['namespace']}/resourceclaims/"
                         f"{meta['name']}"] = obj

    def slices(self) -> list[dict[str, Any]]:
        with self.lock:
            return [o for p, o in self.objects.items() if p.startswith(f"{GROUP}/resourceslices/")]

    def writes(self) -> list[tuple[str, str, Any]]:
        with self.lock:
            return [r for r in self.requests if r[0] != "GET"]

    def answer(self, method: str, path: str, query: dict[str, list[str]],
               body: Any) -> tuple[int, Any]:
        collection = f"{GROUP}/resourceslices"
        if method == "GET" and path == collection:
            selector = (query.get("fieldSelector") or [""])[0]
            items = [o for p, o in sorted(self.objects.items())
                     if p.startswith(collection + "/") and _matches(o, selector)]
            return 200, {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList",
                         "metadata": {"resourceVersion": str(next(self._rv))}, "items": items}
        if method == "POST" and path == collection:
            name = body["metadata"]["name"]
            if f"{collection}/{name}" in self.objects:
                return 409, _status(409, "AlreadyExists", f"resourceslices {name} exists")
            body["metadata"].update(uid=f"uid-{name}", resourceVersion=str(next(self._rv)),
                                    creationTimestamp=datetime.now(timezone.utc).strftime(
                                        "%Y-%m-%dT%H:%M:%SZ"))
            self.objects[f"{collection}/{name}"] = body
            return 201, body
        old = self.objects.get(path)
        if old is None:
            return 404, _status(404, "NotFound", f"{path} not found")
        if method == "GET":
            return 200, old
        if method == "PUT":
            if body["metadata"].get("resourceVersion") != old["metadata"]["resourceVersion"]:
                return 409, _status(409, "Conflict", "the object has been modified")
            body["metadata"].update(uid=old["metadata"]["uid"],
                                    creationTimestamp=old["metadata"]["creationTimestamp"],
                                    resourceVersion=str(next(self._rv)))
            self.objects[path] = body
            return 200, body
        if method == "DELETE":
            return 200, self.objects.pop(path)
        return 405, _status(405, "MethodNotAllowed", method)


class Kubelet:
    """The kubelet's calls to a DRA plugin, over the plugin's unix sockets."""

    def __init__(self, registry_dir: Path) -> None:
        self.registry_dir = registry_dir
        self.endpoint = ""

    def register(self, driver: str = DRIVER) -> Any:
        from harp.proto import pluginregistration_v1_pb2 as reg
        from harp.proto import pluginregistration_v1_pb2_grpc as reg_grpc
        with grpc.insecure_channel(f"unix:{self.registry_dir}/{driver}-reg.sock") as channel:
            stub = reg_grpc.RegistrationStub(channel)
            info = stub.GetInfo(reg.InfoRequest(), timeout=10)
            stub.NotifyRegistrationStatus(reg.RegistrationStatus(plugin_registered=True),
                                          timeout=10)
        self.endpoint = info.endpoint
        return info

    def _call(self, method: str, claims: list[tuple[str, str, str]]) -> Any:
        from harp.proto import dra_v1_pb2 as dra
        from harp.proto import dra_v1_pb2_grpc as dra_grpc
        request_type = dra.NodePrepareResourcesRequest if method == "NodePrepareResources" \
            else dra.NodeUnprepareResourcesRequest
        request = request_type(claims=[dra.Claim(namespace=ns, uid=uid, name=name)
                                       for ns, uid, name in claims])
        with grpc.insecure_channel(f"unix:{self.endpoint}") as channel:
            return getattr(dra_grpc.DRAPluginStub(channel), method)(request, timeout=60)

    def prepare(self, *claims: tuple[str, str, str]) -> Any:
        return self._call("NodePrepareResources", list(claims))

    def unprepare(self, *claims: tuple[str, str, str]) -> Any:
        return self._call("NodeUnprepareResources", list(claims))


def make_claim(name: str, uid: str, results: list[tuple[str, str, str]],
               configs: list[tuple[str, list[str], Any]] = (), namespace: str = "default",
               allocated: bool = True) -> Any:
    """A ResourceClaim as the Kubernetes scheduler leaves it: `results` are (request, pool,
    device) of this driver, `configs` (source, requests, parameters) its opaque configs."""
    from kubernetes import client
    requests = sorted({r for r, _, _ in results})
    allocation = client.V1AllocationResult(devices=client.V1DeviceAllocationResult(
        results=[client.V1DeviceRequestAllocationResult(request=r, driver=DRIVER, pool=p,
                                                        device=d) for r, p, d in results],
        config=[client.V1DeviceAllocationConfiguration(
            source=source, requests=reqs or None,
            opaque=client.V1OpaqueDeviceConfiguration(driver=DRIVER, parameters=params))
            for source, reqs, params in configs])) if allocated else None
    return client.ResourceV1ResourceClaim(
        api_version="resource.k8s.io/v1", kind="ResourceClaim",
        metadata=client.V1ObjectMeta(name=name, namespace=namespace, uid=uid),
        spec=client.V1ResourceClaimSpec(devices=client.V1DeviceClaim(requests=[
            client.V1DeviceRequest(name=r, exactly=client.V1ExactDeviceRequest(
                device_class_name=DRIVER, count=sum(1 for x, _, _ in results if x == r)))
            for r in requests])),
        status=client.V1ResourceClaimStatus(allocation=allocation))


def params(**fields: Any) -> dict[str, Any]:
    return {"apiVersion": "harp.dev/v1", "kind": "LeaseParameters", **fields}


@pytest.fixture(scope="package")
def pool(tmp_path_factory):
    """A scheduler (tokens live 6 s, so renewals show) and pool server p1 (2 cpu devices)."""
    cluster = Cluster(tmp_path_factory.mktemp("k8s-pool"))
    cluster.identity("client", "dra-node1")
    cluster.identity("client", "pod")
    cluster.identity("client", "dra-controller")
    cluster.start_scheduler(token_ttl=6)
    try:
        cluster.start_server("p1", "256MiB", 2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hk8s-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def container_env(spec: dict[str, Any], device_name: str) -> dict[str, str]:
    """The environment a container gets from a CDI device, with its mounts' container
    paths turned back into the host paths (the test runs where the runtime would mount)."""
    device = next(d for d in spec["devices"] if d["name"] == device_name)
    edits = device["containerEdits"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARP_")}
    for line in edits["env"]:
        key, _, value = line.partition("=")
        for mount in edits.get("mounts", []):
            value = value.replace(mount["containerPath"], mount["hostPath"])
        env[key] = value
    return env


def run_in_container(env: dict[str, str], code: str, cwd: Path, timeout: float = 90) -> str:
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
