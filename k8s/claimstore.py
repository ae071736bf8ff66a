"""Prepared claims on disk, so that a restarted plugin knows them.

Layout under the plugin's directory (`/var/lib/kubelet/plugins/harp.dev`):

    claims/UID/state.json        what was prepared: the claim, and per request its lease
    claims/UID/REQUEST/          what the container gets (bind-mounted read-only):
        lease.json               the lease, without its scheduler (see plugin.py)
        ca.pem client.pem client.key

Every file is 0600 and every directory 0700, owned by root unless the request's
parameters name a uid/gid (the container's user), so that only the claim's containers
(and root on the node) can read its credentials. `state.json` is written before the
request files and rewritten after each lease is attached, so a plugin that dies half
way still knows which leases to detach.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harp.lease import Lease

from .cdi import CA_FILE, CERT_FILE, KEY_FILE, LEASE_FILE

#: A claim's UID names a directory: accept only what a Kubernetes UID looks like.
_UID = re.compile(r"[0-9A-Za-z][0-9A-Za-z-]{0,63}")


class StateError(ValueError):
    """A claim's state on disk is unreadable or a name is unsafe."""


@dataclass
class PreparedRequest:
    """One request's lease."""
    request: str
    lease_id: str
    devices: list[list[str]]          # [pool, device] pairs Kubernetes allocated
    uid: int = 0
    gid: int = 0
    interval_s: float = 20.0          # how often the lease and its tokens are renewed


@dataclass
class PreparedClaim:
    """A claim the plugin prepared (or is preparing: `complete` false)."""
    uid: str
    namespace: str
    name: str
    requests: list[PreparedRequest] = field(default_factory=list)
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreparedClaim":
        return cls(uid=str(d["uid"]), namespace=str(d["namespace"]), name=str(d["name"]),
                   complete=bool(d.get("complete")),
                   requests=[PreparedRequest(**r) for r in d.get("requests", [])])


def _write(path: Path, data: bytes, uid: int, gid: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if (uid or gid) and os.geteuid() == 0:
        os.chown(tmp, uid, gid)
    os.replace(tmp, path)


class ClaimStore:
    """The `claims/` directory of the plugin."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "claims"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def claim_dir(self, uid: str) -> Path:
        if not _UID.fullmatch(uid):
            raise StateError(f"not a claim UID: {uid!r}")
        return self.root / uid

    def request_dir(self, uid: str, request: str) -> Path:
        return self.claim_dir(uid) / request

    def save(self, claim: PreparedClaim) -> None:
        directory = self.claim_dir(claim.uid)
        directory.mkdir(mode=0o700, exist_ok=True)
        _write(directory / "state.json", json.dumps(claim.to_dict(), indent=2).encode(), 0, 0)

    def load(self, uid: str) -> PreparedClaim | None:
        path = self.claim_dir(uid) / "state.json"
        try:
            return PreparedClaim.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(f"{path} is unreadable: {exc}") from None

    def all(self) -> list[PreparedClaim]:
        """Every claim with a readable state (unreadable ones are skipped: see `load`)."""
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_dir() and _UID.fullmatch(entry.name):
                try:
                    claim = self.load(entry.name)
                except StateError:
                    continue
                if claim is not None:
                    out.append(claim)
        return out

    def write_request(self, uid: str, prepared: PreparedRequest, lease: Lease,
                      credentials: tuple[bytes, bytes, bytes]) -> Path:
        """The request's directory with its lease and the pod's credentials (ca, cert, key)."""
        directory = self.request_dir(uid, prepared.request)
        directory.mkdir(mode=0o700, exist_ok=True)
        if (prepared.uid or prepared.gid) and os.geteuid() == 0:
            os.chown(directory, prepared.uid, prepared.gid)
        ca, cert, key = credentials
        for name, data in ((CA_FILE, ca), (CERT_FILE, cert), (KEY_FILE, key)):
            _write(directory / name, data, prepared.uid, prepared.gid)
        self.write_lease(uid, prepared, lease)
        return directory

    def write_lease(self, uid: str, prepared: PreparedRequest, lease: Lease) -> bool:
        """Rewrite the request's lease file (fresh tokens); False if the directory is gone."""
        directory = self.request_dir(uid, prepared.request)
        if not directory.is_dir():
            return False
        handed = lease.to_dict()
        handed["scheduler"] = ""          # the pod does not renew: the plugin does
        _write(directory / LEASE_FILE, json.dumps(handed, indent=2).encode(), prepared.uid,
               prepared.gid)
        return True

    def remove(self, uid: str) -> None:
        shutil.rmtree(self.claim_dir(uid), ignore_errors=True)
