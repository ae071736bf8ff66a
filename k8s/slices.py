"""The pool as ResourceSlices: what the Kubernetes scheduler may allocate to claims.

One ResourceSlice per pool server that is up, as its own resource pool (named after the
server), with `allNodes: true`: HARP's devices are reached over the network, so a pod on
any node (a CPU-only one above all) can use them. Each HARP device is one DRA device,
named `KIND-INDEX` (`gpu-0`), with attributes a DeviceClass or a claim's CEL selector
can test (`device.attributes["harp.dev"].kind == "gpu"`):

    kind     string   gpu, fpga, npu, cpu
    backend  string   cuda, opencl, onnx, cpu
    server   string   the pool server's name
    index    int      the device's index on that server
    model    string   the device's name (cut to 64 characters, the API's limit)

and a capacity `memory` (bytes). Servers that are down or draining have no slice: the
scheduler would not place a lease on them either. A slice holds at most 128 devices (the
API's limit), so a server's devices past its 128th are not published. No I/O here: `desired_slices` is a
function of the scheduler's pool listing (`SchedulerClient.pool()`).
"""
from __future__ import annotations

import hashlib
import re
from typing import Any

#: The API's limits (resource.k8s.io/v1 validation).
MAX_DEVICES_PER_SLICE = 128
MAX_ATTRIBUTE_STRING = 64
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def dns_name(text: str, limit: int = 63) -> str:
    """`text` as a DNS label: lower case, other characters as '-', a hash suffix when it
    had to change (so two different names never become one)."""
    clean = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "x"
    if clean == text and len(clean) <= limit and _DNS_LABEL.fullmatch(clean):
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{clean[:limit - 9].rstrip('-')}-{digest}"


def slice_name(driver: str, server: str) -> str:
    """The ResourceSlice's name: `DRIVER-SERVER` (a DNS subdomain)."""
    return f"{driver}-{dns_name(server)}"


def device_name(kind: str, index: int) -> str:
    return dns_name(f"{kind}-{index}")


def _device(device: dict[str, Any], server: str) -> Any:
    from kubernetes import client
    kind = str(device.get("kind") or "device")
    attributes = {"index": client.V1DeviceAttribute(int=int(device["index"]))}
    for name, text in (("kind", kind), ("backend", device.get("backend")), ("server", server),
                       ("model", device.get("name"))):
        if text:
            attributes[name] = client.V1DeviceAttribute(string=str(text)[:MAX_ATTRIBUTE_STRING])
    return client.V1Device(
        name=device_name(kind, int(device["index"])), attributes=attributes,
        capacity={"memory": client.V1DeviceCapacity(value=str(int(device.get("memory", 0))))})


def desired_slices(driver: str, servers: list[dict[str, Any]]) -> dict[str, Any]:
    """Slice name -> `V1ResourceSlice` (pool generation 0: the controller sets it)."""
    from kubernetes import client
    out = {}
    for server in servers:
        if server.get("state") != "up" or not server.get("devices"):
            continue
        name = str(server["name"])
        devices = sorted(server["devices"], key=lambda d: int(d["index"]))
        out[slice_name(driver, name)] = client.V1ResourceSlice(
            api_version="resource.k8s.io/v1", kind="ResourceSlice",
            metadata=client.V1ObjectMeta(
                name=slice_name(driver, name),
                labels={"app.kubernetes.io/managed-by": "harp-kubernetes-controller"}),
            spec=client.V1ResourceSliceSpec(
                driver=driver, all_nodes=True,
                pool=client.V1ResourcePool(name=dns_name(name), generation=0,
                                           resource_slice_count=1),
                devices=[_device(d, name) for d in devices[:MAX_DEVICES_PER_SLICE]]))
    return out
