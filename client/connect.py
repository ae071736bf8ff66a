"""From an address to a `RemoteDevice`: TLS credentials, channel, session.

    harp://HOST:PORT          mutual TLS (certificates from HARP_TLS_* or the default directory)
    harp://unix:/PATH         mutual TLS over a unix socket
    harp+insecure://HOST:PORT plain text, loopback only, for development
"""
from __future__ import annotations

import os

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from harp.errors import ArgumentError, AuthError, TransportError
from harp.security import TlsFiles, channel_credentials, tls_files
from harp.transport import (KEEPALIVE_S, KEEPALIVE_TIMEOUT_S, channel_options, diagnose_tls,
                            is_loopback)

from .address import parse_address
from .datachannel import opener
from .remote import RemoteDevice

if TYPE_CHECKING:
    from harp.lease import Lease


def pick_endpoint(endpoints: list[str], host: str) -> str:
    """The endpoint to dial: a unix socket when the device is on this host, else the first one."""
    import socket
    if host and host == socket.gethostname():
        local = [e for e in endpoints if "unix:" in e]
        if local:
            return local[0]
    remote = [e for e in endpoints if "unix:" not in e]
    if not remote:
        raise ArgumentError(f"the lease's server is on host {host!r} and offers only local "
                            "endpoints")
    return remote[0]


def connect_lease(lease: "Lease", *, index: int = 0, tls: TlsFiles | None = None,
                  cert_dir: str | Path | None = None, renew: bool = True,
                  **options: Any) -> RemoteDevice:
    """Open a session on device `index` of a lease, and renew the lease while it is open."""
    from harp.errors import HarpError, TransportError
    from .pool import SchedulerClient
    from .renewal import LeaseKeeper
    if not 0 <= index < len(lease.devices):
        raise ArgumentError(f"lease {lease.lease_id} has {len(lease.devices)} device(s); "
                            f"no device {index}")
    keeper = None
    if renew and lease.scheduler:
        keeper = LeaseKeeper(lease, SchedulerClient(lease.scheduler, tls=tls, cert_dir=cert_dir))
        try:
            lease = keeper.renew_now()          # a fresh token, and a check the lease lives
        except TransportError:
            pass                                # scheduler away: the stored token may still do
        except HarpError:
            keeper.stop()
            raise
    granted = lease.devices[index]
    try:
        device = connect_remote(pick_endpoint(granted.endpoints, granted.host), tls=tls,
                                cert_dir=cert_dir, device_index=granted.index,
                                token=granted.token, **options)
    except BaseException:
        if keeper is not None:
            keeper.stop()
        raise
    device.lease = lease
    if keeper is not None:
        keeper.start()
        device.lease_keeper = keeper
        device.explain = keeper.explain
        device.on_close.append(keeper.stop)
    return device


def connect_remote(target: str, *, tls: TlsFiles | None = None, cert_dir: str | Path | None = None,
                   device_index: int = 0, token: str = "", client_name: str = "",
                   server_name: str | None = None, connect_timeout: float = 30.0,
                   keepalive_s: float = KEEPALIVE_S,
                   keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
                   shared_memory: bool | None = None, data_channel: bool | None = None,
                   frames_on_data: bool | None = None, **unknown: Any) -> RemoteDevice:
    """Open a session on device `device_index` of the pool server at `target`.

    `connect_timeout` bounds the handshake (30 s: as long as a pool server may take to
    start a session's worker on a loaded machine); a keepalive ping every `keepalive_s` that goes
    unanswered for `keepalive_timeout_s` fails the session with `TransportError` (a dead
    link or a frozen server is noticed within their sum). On a unix socket the session
    moves bulk data through shared memory with the server (`shared_memory`, default: yes
    unless `HARP_SHARED_MEMORY=0`); over TCP with TLS through a data channel beside the
    stream (`data_channel`, default: yes unless `HARP_DATA_CHANNEL=0`); else, and when the
    server offers neither, over the stream. A data channel opens at once, in the
    background, and the session's calls and replies move onto it once it is open
    (`frames_on_data`, default: yes unless `HARP_FRAMES_ON_DATA=0`): one socket, without
    gRPC's hand-offs between threads on each frame."""
    if unknown:
        raise TypeError(f"unknown option(s) for a remote device: {', '.join(sorted(unknown))}")
    address, secure = parse_address(target)
    if shared_memory is None:
        shared_memory = os.environ.get("HARP_SHARED_MEMORY", "1") != "0"
    shared_memory = bool(shared_memory) and address.startswith("unix:")
    name = server_name or ("localhost" if address.startswith("unix") else None)
    options = channel_options(keepalive_s=keepalive_s, keepalive_timeout_s=keepalive_timeout_s,
                              server_name=name)
    files = None
    if secure:
        files = tls or tls_files("client", directory=cert_dir)
        channel = grpc.secure_channel(address, channel_credentials(files), options=options)
    else:
        if not is_loopback(address):
            raise AuthError(f"refusing plain text to non-loopback {address}: use harp:// "
                            "(mutual TLS)")
        channel = grpc.insecure_channel(address, options=options)
    if data_channel is None:
        data_channel = os.environ.get("HARP_DATA_CHANNEL", "1") != "0"
    data = opener(address, files, name) if data_channel and files is not None and \
        not address.startswith("unix:") else None
    if frames_on_data is None:
        frames_on_data = os.environ.get("HARP_FRAMES_ON_DATA", "1") != "0"
    try:
        return RemoteDevice(channel, device_index=device_index, token=token,
                            client_name=client_name, connect_timeout=connect_timeout,
                            target=target, shared_memory=shared_memory,
                            open_data_channel=data, frames_on_data=bool(frames_on_data))
    except TransportError as exc:
        channel.close()
        raise _explain_connect_failure(exc, target, address, files, name) from None
    except BaseException:
        channel.close()
        raise


def _explain_connect_failure(exc: TransportError, target: str, address: str,
                             files: TlsFiles | None, server_name: str | None) -> Exception:
    """A failed connect, said precisely: a TLS refusal (found by a handshake of our own),
    plain text against a TLS server or the reverse, or the server being unreachable."""
    if files is not None:
        why = diagnose_tls(address, str(files.ca), str(files.cert), str(files.key),
                           server_name=server_name)
        if why is not None:
            return AuthError(f"cannot open a session on {target}: {why}")
    return exc
