"""Lease tokens: what the scheduler signs (Ed25519) and a pool server checks.

A token names one lease, one device on one server, the session's quotas, the
lease's expiry and its own, and the scheduler term that issued it. A pool server verifies it with the scheduler's
public key, which it pins at registration, so it needs no call to the scheduler
to admit a session (sessions keep opening and running while the scheduler
restarts). Tokens are short-lived (`expires_at`, a minute by default): the
client's lease keeper renews them, so a token of a lease that was detached is
refused soon even by a server that missed the scheduler's word of it.

Scheduler replicas (PostgreSQL) all sign with one key and write their leadership
term into each token (`term`); a single scheduler's tokens carry none (term 0, the
claim left out, so they read as they always have). A pool server uses the term
only to refuse what a deposed leader could sign after its successor began
(`server/registration.py`); tokens issued before a failover stay valid.

Format: `harp1.<base64url(JSON claims)>.<base64url(signature over the first two parts)>`.
Claims this version does not know are ignored, so a newer scheduler's tokens verify.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import LeaseError

PREFIX = "harp1"


@dataclass(frozen=True)
class Claims:
    """What a token grants."""
    lease_id: str
    server: str              # pool server name
    device: int              # device index on that server
    memory: int              # memory quota in bytes (0: the whole device)
    share: float             # compute share (0, 1]
    expires_at: float        # unix seconds: the token is refused from then on
    issued_at: float
    key_id: str              # fingerprint of the signing key
    lease_expires_at: float = 0.0   # the lease's own end (sessions run until then, renewed)
    owner: str = ""          # the identity that attached the lease
    term: int = 0            # the scheduler leader's term that issued it (0: a single scheduler)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: bytes) -> str:
    """A short fingerprint of a raw Ed25519 public key."""
    return hashlib.sha256(public_key).hexdigest()[:16]


class SigningKey:
    """The scheduler's Ed25519 key, kept in a 0600 file so a restart keeps it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public_bytes)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> "SigningKey":
        """Load the key at `path`, creating it (owner-only) on first use.

        Replicas that share one key file may start at once: the key is written to a
        private temporary file and linked into place, so a reader never sees half of it
        and the first writer wins. A key file others may read or write is refused."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                try:
                    os.link(partial, path)
                except FileExistsError:
                    pass                      # another replica made it first: use theirs
            finally:
                partial.unlink(missing_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise LeaseError(f"the scheduler's signing key {path} may be read or written by "
                             f"others (mode {mode:04o}): chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LeaseError(f"{path} does not hold an Ed25519 key")
        return cls(key)

    def sign(self, claims: Claims) -> str:
        signed = asdict(claims)
        if not claims.term:
            del signed["term"]               # a single scheduler's tokens read as before
        body = f"{PREFIX}.{_b64(json.dumps(signed, sort_keys=True).encode())}"
        return f"{body}.{_b64(self._private.sign(body.encode()))}"


def verify(token: str, public_key: bytes, *, server: str, device: int,
           now: float | None = None) -> Claims:
    """The claims of a valid token for this server's `device`, or a `LeaseError` saying why not."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3 or parts[0] != PREFIX:
        raise LeaseError("no valid lease token: this pool server admits sessions only with a "
                         "token from its scheduler (harp attach, then harp.connect(lease))")
    try:
        signature = _unb64(parts[2])
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature,
                                                              f"{parts[0]}.{parts[1]}".encode())
    except (InvalidSignature, ValueError):
        raise LeaseError("the lease token's signature does not verify with this server's "
                         "scheduler key (forged, or from another scheduler)") from None
    try:
        known = {f.name for f in fields(Claims)}
        claims = Claims(**{k: v for k, v in json.loads(_unb64(parts[1])).items() if k in known})
        if not isinstance(claims.term, int) or isinstance(claims.term, bool):
            raise ValueError("term")
    except (ValueError, TypeError, AttributeError):
        raise LeaseError("the lease token's claims are unreadable") from None
    if claims.key_id != key_id(public_key):
        raise LeaseError("the lease token names another scheduler key")
    if claims.server != server or claims.device != device:
        raise LeaseError(f"the lease token is for device {claims.device} on server "
                         f"{claims.server!r}, not device {device} on {server!r}")
    if claims.expires_at <= (time.time() if now is None else now):
        raise LeaseError(f"lease {claims.lease_id} has expired")
    return claims
