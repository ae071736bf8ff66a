"""From an address to a `RemoteDevice`: TLS credentials, channel, session.

    harp://HOST:PORT          mutual TLS (certificates from HARP_TLS_* or the default directory)
    harp://unix:/PATH         mutual TLS over a unix socket
    harp+insecure://HOST:PORT plain text, loopback only, for development
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from harp.errors import ArgumentError, AuthError
from harp.security import TlsFiles, channel_credentials, tls_files
from harp.transport import KEEPALIVE_S, channel_options, is_loopback

from .remote import RemoteDevice


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


def connect_remote(target: str, *, tls: TlsFiles | None = None, cert_dir: str | Path | None = None,
                   device_index: int = 0, token: str = "", client_name: str = "",
                   server_name: str | None = None, connect_timeout: float = 10.0,
                   keepalive_s: float = KEEPALIVE_S, **unknown: Any) -> RemoteDevice:
    """Open a session on device `device_index` of the pool server at `target`."""
    if unknown:
        raise TypeError(f"unknown option(s) for a remote device: {', '.join(sorted(unknown))}")
    address, secure = parse_address(target)
    options = channel_options(keepalive_s=keepalive_s, server_name=server_name or
                              ("localhost" if address.startswith("unix") else None))
    if secure:
        files = tls or tls_files("client", directory=cert_dir)
        channel = grpc.secure_channel(address, channel_credentials(files), options=options)
    else:
        if not is_loopback(address):
            raise AuthError(f"refusing plain text to non-loopback {address}: use harp:// "
                            "(mutual TLS)")
        channel = grpc.insecure_channel(address, options=options)
    try:
        return RemoteDevice(channel, device_index=device_index, token=token,
                            client_name=client_name, connect_timeout=connect_timeout)
    except BaseException:
        channel.close()
        raise
