"""Tests for harp.security: the pool CA, leaf certificates, path resolution and real mTLS."""
from __future__ import annotations

import ipaddress
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from harp import security
from harp.security import CertError, TlsFiles


def _load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (set(san.get_values_for_type(x509.DNSName)),
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def test_default_cert_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HARP_CERT_DIR", str(tmp_path / "explicit"))
    assert security.default_cert_dir() == tmp_path / "explicit"
    monkeypatch.delenv("HARP_CERT_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert security.default_cert_dir() == tmp_path / "xdg" / "harp" / "certs"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert security.default_cert_dir() == tmp_path / "home" / ".config" / "harp" / "certs"


def test_init_ca_files_and_permissions(tmp_path):
    directory = tmp_path / "certs"
    ca_path = security.init_ca(directory, name="Test CA")
    assert ca_path == directory / "ca.pem"
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600
    ca = _load(ca_path)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)
    assert security.describe(ca_path)["role"] == "ca"


def test_init_ca_refuses_overwrite(tmp_path):
    security.init_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(CertError, match="already exist"):
        security.init_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    security.init_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
    assert _mode(tmp_path / "ca.key") == 0o600


def test_issue_server_cert(tmp_path):
    ca_path = security.init_ca(tmp_path)
    cert_path, key_path = security.issue(tmp_path, "server", "node-1",
                                         sans=["gpu1.example", "10.0.0.7", "127.0.0.1"])
    assert (cert_path, key_path) == (tmp_path / "node-1.pem", tmp_path / "node-1.key")
    assert _mode(key_path) == 0o600
    cert, ca = _load(cert_path), _load(ca_path)
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    dns, ips = _sans(cert)
    assert dns == {"gpu1.example", "localhost"}
    assert ips == {"10.0.0.7", "127.0.0.1", "::1"}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    info = security.describe(cert_path)
    assert info["subject"] == "node-1" and info["issuer"] == "HARP pool CA"
    assert info["role"] == "server"
    assert set(info["sans"]) == {"gpu1.example", "localhost", "10.0.0.7", "127.0.0.1", "::1"}
    assert len(info["fingerprint"]) == 64
    assert info["not_after"] == cert.not_valid_after_utc.isoformat()


def test_issue_client_cert(tmp_path):
    ca_path = security.init_ca(tmp_path)
    cert_path, _ = security.issue(tmp_path, "client", "alice", sans=["fe80::1"])
    cert = _load(cert_path)
    cert.verify_directly_issued_by(_load(ca_path))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _sans(cert) == (set(), {str(ipaddress.ip_address("fe80::1"))})
    assert security.describe(cert_path)["role"] == "client"


def test_issue_refuses_overwrite(tmp_path):
    security.init_ca(tmp_path)
    cert_path, _ = security.issue(tmp_path, "client", "bob")
    before = cert_path.read_bytes()
    with pytest.raises(CertError, match="already exist"):
        security.issue(tmp_path, "client", "bob")
    security.issue(tmp_path, "client", "bob", overwrite=True)
    assert cert_path.read_bytes() != before


@pytest.mark.parametrize("name", ["", "../evil", "a/b", ".hidden", "-flag", "sp ace", "ca"])
def test_issue_refuses_bad_names(tmp_path, name):
    security.init_ca(tmp_path)
    with pytest.raises(CertError, match="bad certificate name"):
        security.issue(tmp_path, "server", name)


def test_issue_without_ca(tmp_path):
    with pytest.raises(CertError, match=r"no pool CA in .*: run `harp certs init` first"):
        security.issue(tmp_path, "server", "node")


def test_tls_files_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HARP_CERT_DIR", str(tmp_path / "default"))
    for var in ("HARP_TLS_CA", "HARP_TLS_CERT", "HARP_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    default = tmp_path / "default"
    assert security.tls_files("client") == TlsFiles(
        default / "ca.pem", default / "client.pem", default / "client.key")
    assert security.tls_files("server", "node-1").cert == default / "node-1.pem"

    monkeypatch.setenv("HARP_TLS_CA", str(tmp_path / "env-ca.pem"))
    monkeypatch.setenv("HARP_TLS_CERT", str(tmp_path / "env.pem"))
    files = security.tls_files("client")
    assert files == TlsFiles(tmp_path / "env-ca.pem", tmp_path / "env.pem", default / "client.key")

    explicit = security.tls_files("client", cert=tmp_path / "mine.pem",
                                  directory=tmp_path / "dir")
    assert explicit == TlsFiles(tmp_path / "dir" / "ca.pem", tmp_path / "mine.pem",
                                tmp_path / "dir" / "client.key")


def test_tls_files_load_names_missing_file(tmp_path):
    server, _ = security.ephemeral_pool(tmp_path)
    assert server.load()[0] == server.ca.read_bytes()
    server.key.unlink()
    with pytest.raises(CertError, match="private key .*server.key"):
        server.load()


# --- real mutual TLS over gRPC ------------------------------------------------

_METHOD = "/harp.test.Echo/Ping"


@pytest.fixture
def mtls_server(tmp_path):
    """An echo server requiring client certs from a fresh pool CA; yields (port, client files)."""
    server_files, client_files = security.ephemeral_pool(tmp_path / "pool")
    handler = grpc.method_handlers_generic_handler(
        "harp.test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", security.server_credentials(server_files))
    server.start()
    try:
        yield port, client_files
    finally:
        server.stop(grace=None)


def _ping(port: int, credentials: grpc.ChannelCredentials) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return channel.unary_unary(_METHOD)(b"ping", timeout=5)


def test_mtls_client_with_pool_cert_succeeds(mtls_server):
    port, client_files = mtls_server
    assert _ping(port, security.channel_credentials(client_files)) == b"ping"


def test_mtls_client_without_cert_is_refused(mtls_server):
    port, client_files = mtls_server
    ca_pem, _, _ = client_files.load()
    with pytest.raises(grpc.RpcError) as info:
        _ping(port, grpc.ssl_channel_credentials(root_certificates=ca_pem))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_from_other_ca_is_refused(mtls_server, tmp_path):
    port, client_files = mtls_server
    _, rogue_client = security.ephemeral_pool(tmp_path / "rogue")
    ca_pem, _, _ = client_files.load()
    _, cert_pem, key_pem = rogue_client.load()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                               certificate_chain=cert_pem)
    with pytest.raises(grpc.RpcError) as info:
        _ping(port, credentials)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
