"""HARP addresses of remote services: harp://HOST:PORT, harp://unix:/PATH, harp+insecure://..."""
from __future__ import annotations

from harp.errors import ArgumentError


def parse_address(target: str) -> tuple[str, bool]:
    """(gRPC target, secure) from a harp:// address."""
    for scheme, secure in (("harp://", True), ("harp+insecure://", False)):
        if target.startswith(scheme):
            rest = target[len(scheme):].rstrip("/")
            if not rest:
                break
            return rest, secure
    if target.startswith("unix:"):
        return target, True
    raise ArgumentError(f"a remote device address is harp://HOST:PORT, harp://unix:/PATH or "
                        f"harp+insecure://HOST:PORT, got {target!r}")
