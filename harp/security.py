"""Mutual-TLS certificates for a HARP pool: one private CA, and the identities it issues.

Every server and client in a pool holds a leaf certificate signed by the pool's CA,
and each side refuses a peer whose certificate that CA did not sign. Keys are EC
P-256 and are written owner-only (0o600) from the moment the file exists.

A certificate also says who its holder is and what it may do: its subject's common
name is the holder's identity (`alice`, `gpu-host-1`), and its organizational unit
its role: `client` (attach, and see, renew and detach its own leases), `server` (a
pool server: register and heartbeat under its own name), `admin` (everything,
every lease), or `monitor` (read the services' metrics endpoints, nothing else).
`peer_identity` reads both from a gRPC peer's certificate.
"""
from __future__ import annotations

import datetime as _dt
import functools
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harp.errors import AuthError

__all__ = [
    "CertError", "TlsFiles", "default_cert_dir", "init_ca", "issue", "tls_files",
    "server_credentials", "channel_credentials", "ephemeral_pool", "describe",
    "ssl_server_context", "MONITOR_ROLES",
]

CA_CERT, CA_KEY = "ca.pem", "ca.key"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ROLES = ("client", "server", "admin", "monitor")
_ROLE_EKU = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH,
             "admin": ExtendedKeyUsageOID.CLIENT_AUTH, "monitor": ExtendedKeyUsageOID.CLIENT_AUTH}
#: What each role's certificate may do. A server certificate also authenticates its holder
#: as a client: a pool server uses it to register with the scheduler, which admits only
#: server certificates to Register/Heartbeat (a user's client certificate cannot pose as a
#: pool server).
_ROLE_USAGES = {"server": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
                "admin": [ExtendedKeyUsageOID.CLIENT_AUTH],
                "monitor": [ExtendedKeyUsageOID.CLIENT_AUTH]}
_SERVER_DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")


class CertError(AuthError):
    """A certificate or key is missing, unreadable, or cannot be created as asked."""


def default_cert_dir() -> Path:
    """The pool's certificate directory: `$HARP_CERT_DIR`, else `$XDG_CONFIG_HOME/harp/certs`."""
    if explicit := os.environ.get("HARP_CERT_DIR"):
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / "harp" / "certs"


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=not leaf,
        crl_sign=not leaf, encipher_only=False, decipher_only=False)


def _check_free(paths: Sequence[Path], overwrite: bool) -> None:
    taken = [str(p) for p in paths if p.exists()]
    if taken and not overwrite:
        raise CertError(f"{', '.join(taken)} already exist(s): pass overwrite=True to replace")


def _write(cert_path: Path, key_path: Path, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey, overwrite: bool) -> None:
    """Write the key owner-only from creation (O_EXCL, no readable window), then the cert."""
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if overwrite:
        key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(directory: Path, *, name: str = "HARP pool CA", days: int = 3650,
            overwrite: bool = False) -> Path:
    """Create the pool's self-signed CA (`ca.pem`, `ca.key`) in `directory`; return the cert path.

    Refuses to replace an existing CA unless `overwrite`, since that orphans every issued cert.
    """
    directory = Path(directory).expanduser()
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _check_free((cert_path, key_path), overwrite)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(leaf=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(cert_path, key_path, cert, key, overwrite)
    return cert_path


def _check_name(name: str) -> None:
    if not _SAFE_NAME.fullmatch(name) or name == "ca":
        raise CertError(f"bad certificate name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(not starting with '.' or '-', and not 'ca')")


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def issue(directory: Path, role: Literal["server", "client", "admin", "monitor"], name: str, *,
          sans: Sequence[str] = (), days: int = 825, overwrite: bool = False) -> tuple[Path, Path]:
    """Issue a `role` leaf cert `{name}.pem`/`{name}.key` signed by the CA in `directory`.

    The subject is CN=`name`, OU=`role`. Server certs always also cover localhost,
    127.0.0.1 and ::1 so local pools work unconfigured.
    """
    if role not in _ROLE_EKU:
        raise CertError(f"bad role {role!r}: expected one of {', '.join(ROLES)}")
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise CertError(f"a certificate must be valid for at least 1 day, not {days!r}")
    _check_name(name)
    directory = Path(directory).expanduser()
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if not (ca_cert_path.is_file() and ca_key_path.is_file()):
        raise CertError(f"no pool CA in {directory}: run `harp certs init` first")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _check_free((cert_path, key_path), overwrite)

    all_sans = [*sans, *(_SERVER_DEFAULT_SANS if role == "server" else ())]
    general_names = list(dict.fromkeys(_general_name(s) for s in all_sans))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    key = ec.generate_private_key(ec.SECP256R1())
    now = _dt.datetime.now(_dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                 x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(leaf=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_ROLE_USAGES[role]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
    )
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    _write(cert_path, key_path, builder.sign(ca_key, hashes.SHA256()), key, overwrite)
    return cert_path, key_path


@dataclass(frozen=True)
class TlsFiles:
    """Where one endpoint's TLS material lives: the pool CA, its own cert and its key."""

    ca: Path
    cert: Path
    key: Path

    def load(self) -> tuple[bytes, bytes, bytes]:
        """Read and return (ca_pem, cert_pem, key_pem), naming any file that cannot be read."""
        out = []
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert),
                           ("private key", self.key)):
            try:
                out.append(Path(path).read_bytes())
            except OSError as exc:
                hint = ""
                if isinstance(exc, FileNotFoundError):
                    hint = ("; on one machine `harp up` creates the pool's certificates; else "
                            "create the pool CA with `harp certs init` and issue yours with "
                            "`harp certs issue client NAME`, or point --cert-dir (or HARP_TLS_CA, "
                            "HARP_TLS_CERT, HARP_TLS_KEY) at the certificates you were given")
                raise CertError(f"cannot read TLS {what} {path}: {exc.strerror or exc}{hint}") \
                    from exc
        return out[0], out[1], out[2]


def tls_files(role: str, name: str | None = None, *, directory: Path | str | None = None,
              ca: Path | str | None = None, cert: Path | str | None = None,
              key: Path | str | None = None) -> TlsFiles:
    """Resolve an endpoint's TLS paths so servers, clients and the CLI agree on where they live.

    Each path comes from its argument, else `directory`, else `$HARP_TLS_CA`/`_CERT`/`_KEY`,
    else the default directory (`ca.pem`, `{name or role}.pem`/`.key`).
    """
    stem = name or role
    _check_name(stem)
    base = Path(directory).expanduser() if directory is not None else None

    def pick(explicit: Path | str | None, env: str, filename: str) -> Path:
        if explicit is not None:
            return Path(explicit).expanduser()
        if base is not None:
            return base / filename
        if value := os.environ.get(env):
            return Path(value).expanduser()
        return default_cert_dir() / filename

    return TlsFiles(ca=pick(ca, "HARP_TLS_CA", CA_CERT),
                    cert=pick(cert, "HARP_TLS_CERT", f"{stem}.pem"),
                    key=pick(key, "HARP_TLS_KEY", f"{stem}.key"))


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials that present `files.cert` and require a client cert from the CA."""
    ca_pem, cert_pem, key_pem = files.load()
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=True)


def ssl_server_context(files: TlsFiles) -> ssl.SSLContext:
    """A Python `ssl` context for a service beside gRPC (a data channel, a metrics endpoint):
    TLS 1.3 with the service's certificate, requiring a client certificate of the pool CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(str(files.cert), str(files.key))
    context.load_verify_locations(str(files.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """gRPC channel credentials that trust only the pool CA and present the client cert."""
    ca_pem, cert_pem, key_pem = files.load()
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                        certificate_chain=cert_pem)


def ephemeral_pool(directory: Path) -> tuple[TlsFiles, TlsFiles]:
    """Create a throwaway CA plus `server` and `client` certs in `directory`, for demos and tests.

    Returns (server_files, client_files).
    """
    ca_path = init_ca(directory, name="HARP ephemeral CA", days=2)
    server_cert, server_key = issue(directory, "server", "server", days=1)
    client_cert, client_key = issue(directory, "client", "client", days=1)
    return TlsFiles(ca_path, server_cert, server_key), TlsFiles(ca_path, client_cert, client_key)


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _extension(cert: x509.Certificate, cls: type[Any]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


@dataclass(frozen=True)
class Identity:
    """Who a peer is (its certificate's common name) and its role."""
    name: str
    role: str              # "client", "server", "admin", "monitor"

    def __str__(self) -> str:
        return f"{self.role} {self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_monitor(self) -> bool:
        """A monitoring system's identity: it reads metrics endpoints and may do nothing
        else (no session, no lease)."""
        return self.role == "monitor"


#: The roles whose certificates may read a metrics endpoint: an operator, and a monitoring
#: system (Prometheus) that may do nothing else.
MONITOR_ROLES = ("admin", "monitor")


def refuse_monitor(who: Identity, service: str) -> None:
    """Raise `AuthError` for a monitor certificate at a service other than metrics."""
    if who.is_monitor:
        raise AuthError(f"{who} is a monitor certificate: it may read metrics endpoints, not "
                        f"use the {service}")


#: The identity of every peer of a plain-text (--insecure, loopback-only) service: there are
#: no certificates to tell peers apart, so loopback development has no access control.
ANONYMOUS = Identity("anonymous", "admin")


@functools.lru_cache(maxsize=1024)
def identity_from_pem(pem: bytes) -> Identity:
    """The identity a PEM certificate states (role from its OU; from its key usage for
    certificates issued before roles were written into the subject)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise AuthError("the peer's certificate is unreadable") from None
    name = _common_name(cert.subject) or ""
    units = [str(a.value) for a in
             cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    role = next((u for u in units if u in ROLES), None)
    if role is None:
        eku = _extension(cert, x509.ExtendedKeyUsage)
        role = "server" if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH in eku else "client"
    return Identity(name, role)


def peer_identity(auth_context: dict, *, insecure: bool = False) -> Identity:
    """The identity of a gRPC peer, from its verified client certificate."""
    pems = auth_context.get("x509_pem_cert")
    if not pems:
        if insecure:
            return ANONYMOUS
        raise AuthError("the peer presented no client certificate")
    return identity_from_pem(bytes(pems[0]))


def certificate_name(path: Path | str) -> str:
    """The common name of the certificate in a PEM file (the identity it gives its holder)."""
    try:
        return identity_from_pem(Path(path).read_bytes()).name
    except OSError as exc:
        raise CertError(f"cannot read certificate {path}: {exc.strerror or exc}") from None


def is_server_certificate(pem: bytes) -> bool:
    """Whether a PEM certificate may act as a server (its key usage includes serverAuth)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.SERVER_AUTH in eku


def describe(cert_path: Path | str) -> dict[str, Any]:
    """Summarise a certificate (subject, issuer, expiry, SANs, role, SHA-256 fingerprint).

    Used by the CLI's listing; `role` is "server"/"client" from the EKU, "ca" for a CA, else None.
    """
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot read certificate {cert_path}: {exc}") from exc
    san = _extension(cert, x509.SubjectAlternativeName)
    sans = [str(v) for v in (*san.get_values_for_type(x509.DNSName),
                             *san.get_values_for_type(x509.IPAddress))] if san is not None else []
    basic = _extension(cert, x509.BasicConstraints)
    if basic is not None and basic.ca:
        role = "ca"
    else:
        role = identity_from_pem(cert.public_bytes(serialization.Encoding.PEM)).role
    return {
        "subject": _common_name(cert.subject),
        "issuer": _common_name(cert.issuer),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sans": sans,
        "role": role,
        "fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
    }
