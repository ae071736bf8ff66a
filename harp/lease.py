"""Leases as a client holds them: what `harp attach` stores and `harp.connect()` opens.

A lease names one or more devices, each with the endpoints of its pool server
and a token signed by the scheduler. It is kept as JSON in the user's config
directory (or `$HARP_LEASE`), so a later `harp.connect()` or `harp run` finds it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LeaseError
from .types import DeviceInfo


def config_dir() -> Path:
    """`$XDG_CONFIG_HOME/harp`, else `~/.config/harp`."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".config") / "harp"


def data_dir() -> Path:
    """Where the scheduler keeps its database and key: `$HARP_DATA_DIR`, else `~/.local/share/harp`."""
    if explicit := os.environ.get("HARP_DATA_DIR"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_DATA_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share") / "harp"


def default_lease_path() -> Path:
    """`$HARP_LEASE`, else `lease.json` in the config directory."""
    if explicit := os.environ.get("HARP_LEASE"):
        return Path(explicit).expanduser()
    return config_dir() / "lease.json"


@dataclass
class LeaseDevice:
    """One device of a lease, and how to reach it."""
    server: str
    index: int
    endpoints: list[str]
    host: str
    token: str
    info: DeviceInfo | None = None


@dataclass
class Lease:
    """A grant of devices for a time, renewable through the scheduler that issued it."""
    lease_id: str
    state: str
    expires_at: float
    ttl_s: float
    memory: int
    share: float
    devices: list[LeaseDevice]
    scheduler: str = ""               # address of the scheduler, for renewals
    client_name: str = ""
    created_at: float = 0.0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    owner: str = ""                   # the identity that attached it
    token_ttl_s: float = 0.0          # tokens expire this long after issue (0: with the lease)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = [dict(asdict(x), info=x.info.to_dict() if x.info else None)
                        for x in self.devices]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Lease":
        devices = [LeaseDevice(**dict(x, info=DeviceInfo.from_dict(x["info"]) if x.get("info")
                                      else None)) for x in d.get("devices", [])]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in dict(d, devices=devices).items() if k in known})

    def save(self, path: Path | None = None) -> Path:
        """Write the lease (owner-only: it holds bearer tokens)."""
        path = Path(path or default_lease_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> "Lease":
        path = Path(path or default_lease_path())
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise LeaseError(f"no lease at {path}: run `harp attach` first") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise LeaseError(f"{path} is not a lease file: {exc}") from None
