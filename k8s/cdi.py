"""The CDI spec of a prepared claim: what the container runtime adds to a container.

The Container Device Interface (CDI, cncf-tags/container-device-interface, SPEC.md) lets
a runtime (containerd, CRI-O) apply a vendor's edits to a container given a device id
`VENDOR/CLASS=NAME`. HARP's devices are remote, so a claim's edits are files and
environment, no device nodes: per request, a read-only bind mount of the request's
directory (lease file, CA, client certificate and key) at `/var/run/harp/REQUEST`, and

    HARP_LEASE=/var/run/harp/REQUEST/lease.json
    HARP_DEVICE=lease:/var/run/harp/REQUEST/lease.json
    HARP_TLS_CA, HARP_TLS_CERT, HARP_TLS_KEY = the files beside it

which is all `harp.connect()` needs. One spec file per claim, written atomically into the
CDI directory (`/var/run/cdi`), named as the CDI library names transient specs
(`k8s.DRIVER-claim_UID.json`); it holds paths, no secrets, so it is world-readable as
runtimes expect.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The oldest CDI version with every feature used here (device names that start with a
#: digit: a claim's UID): runtimes that read newer versions read it too.
CDI_VERSION = "0.5.0"
CONTAINER_ROOT = "/var/run/harp"
LEASE_FILE = "lease.json"
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "client.pem", "client.key"


def vendor(driver: str) -> str:
    return f"k8s.{driver}"


def kind(driver: str) -> str:
    """The CDI kind of the driver's claims: `k8s.harp.dev/claim`."""
    return f"{vendor(driver)}/claim"


def spec_path(cdi_dir: Path, driver: str, claim_uid: str) -> Path:
    return Path(cdi_dir) / f"{vendor(driver)}-claim_{claim_uid}.json"


def device_name(claim_uid: str, request: str) -> str:
    return f"{claim_uid}-{request}"


def device_id(driver: str, claim_uid: str, request: str) -> str:
    """The fully qualified CDI device id the kubelet hands the runtime."""
    return f"{kind(driver)}={device_name(claim_uid, request)}"


def container_dir(request: str) -> str:
    return f"{CONTAINER_ROOT}/{request}"


def environment(request: str) -> dict[str, str]:
    """The variables a container gets for a request (paths as the container sees them)."""
    where = container_dir(request)
    return {"HARP_LEASE": f"{where}/{LEASE_FILE}", "HARP_DEVICE": f"lease:{where}/{LEASE_FILE}",
            "HARP_TLS_CA": f"{where}/{CA_FILE}", "HARP_TLS_CERT": f"{where}/{CERT_FILE}",
            "HARP_TLS_KEY": f"{where}/{KEY_FILE}"}


def build_spec(driver: str, claim_uid: str, request_dirs: dict[str, Path]) -> dict[str, Any]:
    """The spec for a claim whose requests' files are in `request_dirs` (host paths)."""
    devices = []
    for request, host_dir in request_dirs.items():
        devices.append({
            "name": device_name(claim_uid, request),
            "containerEdits": {
                "env": [f"{k}={v}" for k, v in environment(request).items()],
                "mounts": [{"hostPath": str(host_dir), "containerPath": container_dir(request),
                            "options": ["ro", "nosuid", "nodev", "noexec", "bind"]}],
            },
        })
    return {"cdiVersion": CDI_VERSION, "kind": kind(driver), "devices": devices}


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    """Write atomically: a runtime reading the directory sees the old spec or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f, indent=2)
    os.replace(tmp, path)


def remove_spec(path: Path) -> None:
    Path(path).unlink(missing_ok=True)
