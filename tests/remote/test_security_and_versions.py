"""Remote-only cases: who may connect, and what a version mismatch looks like."""
from __future__ import annotations

import grpc
import pytest

import harp
from harp import security, wire
from harp.client import RemoteDevice
from harp.proto import session_pb2 as pb


def _raw_stream(pool, frames, creds=None):
    """Send raw frames on a session stream; return the server's frames."""
    creds = creds or security.channel_credentials(pool.client_tls)
    with grpc.secure_channel(pool.address, creds) as channel:
        call = channel.stream_stream(wire.METHOD)(iter(frames), timeout=10)
        return list(call)


def test_client_without_certificate_is_refused(fresh_pool):
    ca = fresh_pool.client_tls.load()[0]
    channel = grpc.secure_channel(fresh_pool.address, grpc.ssl_channel_credentials(ca))
    with pytest.raises(harp.HarpError) as info:
        RemoteDevice(channel, connect_timeout=5)
    assert isinstance(info.value, (harp.AuthError, harp.TransportError))
    assert not fresh_pool.server.sessions


def test_client_from_another_ca_is_refused(fresh_pool, tmp_path):
    _, foreign_client = security.ephemeral_pool(tmp_path / "other")
    with pytest.raises((harp.AuthError, harp.TransportError)):
        harp.connect(fresh_pool.url, tls=foreign_client, connect_timeout=5)
    assert not fresh_pool.server.sessions


def test_plain_text_client_cannot_talk_to_a_tls_server(fresh_pool):
    with pytest.raises(harp.TransportError):
        harp.connect(f"harp+insecure://{fresh_pool.address}", connect_timeout=5)


def test_plain_text_is_refused_off_loopback(tmp_path):
    from harp.backends import load_backend
    from harp.server import PoolServer
    server = PoolServer(load_backend("cpu", memory="64MiB"))
    with pytest.raises(harp.AuthError, match="non-loopback"):
        server.start(["0.0.0.0:0"], None)
    with pytest.raises(harp.AuthError, match="non-loopback"):
        harp.connect("harp+insecure://192.0.2.1:1")


def test_plain_text_on_loopback_works_with_the_explicit_flag():
    from harp.backends import load_backend
    from harp.server import PoolServer
    server = PoolServer(load_backend("cpu", memory="64MiB"))
    address = server.start(["127.0.0.1:0"], None)[0]
    try:
        with harp.connect(f"harp+insecure://{address}") as dev:
            buf = dev.alloc(8)
            dev.write(buf, 0, b"12345678")
            assert bytes(dev.read(buf, 0, 8)) == b"12345678"
    finally:
        server.stop()


def test_version_mismatch_is_a_clear_error(fresh_pool, monkeypatch):
    request = pb.HandshakeRequest(versions=pb.VersionRange(min=90, max=99))
    frames = _raw_stream(fresh_pool, [request.SerializeToString()])
    reply = pb.HandshakeReply.FromString(frames[0])
    assert reply.error.code == "VERSION"
    assert "90..99" in reply.error.message and "upgrade" in reply.error.message

    import harp.client.remote as remote
    real = pb.VersionRange
    monkeypatch.setattr(remote.pb, "VersionRange", lambda **_: real(min=90, max=99))
    with pytest.raises(harp.VersionMismatchError, match="no common protocol version"):
        fresh_pool.connect()
    assert not fresh_pool.server.sessions


def test_unknown_device_index_is_refused(fresh_pool):
    with pytest.raises(harp.BackendError, match="no device 3"):
        fresh_pool.connect(device_index=3)


def test_health_service_reports_serving(fresh_pool):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    creds = security.channel_credentials(fresh_pool.client_tls)
    with grpc.secure_channel(fresh_pool.address, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", wire.HEALTH_SERVICE):
            got = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert got.status == health_pb2.HealthCheckResponse.SERVING
