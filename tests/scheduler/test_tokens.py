"""Lease tokens across versions and replicas: the term claim, old tokens, the key file."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

import harp
from harp import tokens


def _claims(**changes):
    base = dict(lease_id="lease-1", server="p1", device=0, memory=0, share=1.0,
                expires_at=time.time() + 60, issued_at=time.time(), key_id="")
    return {**base, **changes}


def _sign_raw(key: tokens.SigningKey, claims: dict) -> str:
    """A token over exactly these claims, as another version of the scheduler signs them."""
    body = f"{tokens.PREFIX}.{tokens._b64(json.dumps(claims, sort_keys=True).encode())}"
    return f"{body}.{tokens._b64(key._private.sign(body.encode()))}"


def test_a_replica_token_carries_its_term_and_a_single_schedulers_token_none():
    key = tokens.SigningKey.generate()
    replica = key.sign(tokens.Claims(**_claims(key_id=key.key_id, term=7)))
    single = key.sign(tokens.Claims(**_claims(key_id=key.key_id)))
    assert tokens.verify(replica, key.public_bytes, server="p1", device=0).term == 7
    assert "term" not in json.loads(tokens._unb64(single.split(".")[1]))
    assert tokens.verify(single, key.public_bytes, server="p1", device=0).term == 0


def test_old_tokens_without_a_term_and_newer_ones_with_unknown_claims_verify():
    key = tokens.SigningKey.generate()
    old = _sign_raw(key, _claims(key_id=key.key_id))                  # before terms existed
    assert tokens.verify(old, key.public_bytes, server="p1", device=0).term == 0
    newer = _sign_raw(key, _claims(key_id=key.key_id, term=3, zone="eu-1"))
    assert tokens.verify(newer, key.public_bytes, server="p1", device=0).term == 3
    for bad in ("3", True, None):
        with pytest.raises(harp.LeaseError, match="unreadable"):
            tokens.verify(_sign_raw(key, _claims(key_id=key.key_id, term=bad)),
                          key.public_bytes, server="p1", device=0)
    with pytest.raises(harp.LeaseError, match="unreadable"):
        tokens.verify(_sign_raw(key, ["not", "claims"]), key.public_bytes, server="p1", device=0)


def test_replicas_starting_at_once_share_one_key_file_and_others_may_not_read_it(tmp_path):
    path = tmp_path / "keys" / "scheduler-signing.key"
    made: list = []
    threads = [threading.Thread(target=lambda: made.append(tokens.SigningKey.load_or_create(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({k.key_id for k in made}) == 1                # one key, whoever wrote first
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no partial files left
    os.chmod(path, 0o644)
    with pytest.raises(harp.LeaseError, match="chmod 600"):
        tokens.SigningKey.load_or_create(path)
