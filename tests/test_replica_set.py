"""`harp.replicas`: which scheduler replica a client calls, and where a refusal sends it.
(The same rules against real replica processes: tests/scheduler/test_replicas.py.)"""
from __future__ import annotations

import grpc
import pytest

import harp
from harp.replicas import LEADER_METADATA, ReplicaSet, split_addresses


class Refusal(grpc.RpcError):
    """A failed call as gRPC reports it: status, details, trailing metadata."""

    def __init__(self, code, details="", leader=None):
        self._code, self._details, self._leader = code, details, leader

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ((LEADER_METADATA, self._leader),) if self._leader else ()


def _not_leader(leader=None):
    return Refusal(grpc.StatusCode.UNAVAILABLE, "NOT_LEADER: follower", leader)


class Replica:
    """Answers `Pool` with its name, or raises the refusal it was given."""

    def __init__(self, address, answers):
        self.address, self.answers, self.calls = address, answers, 0

    def Pool(self, request, timeout):
        self.calls += 1
        answer = self.answers.get(self.address, self.address)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _replica_set(addresses, answers):
    replicas = {}

    def stub_for(address):
        return replicas.setdefault(address, Replica(address, answers))
    return ReplicaSet(addresses, lambda address: address, stub_for), replicas


def test_addresses_are_a_comma_separated_list():
    assert split_addresses("a:1, harp://b:2,,harp+insecure://127.0.0.1:3") == \
        ["harp://a:1", "harp://b:2", "harp+insecure://127.0.0.1:3"]
    with pytest.raises(harp.ArgumentError, match="no scheduler address"):
        split_addresses(" , ")


def test_a_follower_sends_the_call_to_the_leader_it_names_on_the_same_scheme():
    answers = {"harp://a:1": _not_leader("harp://c:3")}
    replicas, made = _replica_set(["harp://a:1", "harp://b:2"], answers)
    assert replicas.call("Pool", None, 5) == "harp://c:3"     # followed the hint, not b
    assert replicas.addresses[-1] == "harp://c:3" and made["harp://c:3"].calls == 1
    assert "harp://b:2" not in made
    answers["harp://a:1"] = _not_leader("harp+insecure://127.0.0.1:9")
    downgrade, made = _replica_set(["harp://a:1", "harp://b:2"], answers)
    assert downgrade.call("Pool", None, 5) == "harp://b:2"    # no plain-text hint taken
    assert "harp+insecure://127.0.0.1:9" not in downgrade.addresses


def test_unreachable_replicas_are_tried_once_each_and_other_errors_not_retried():
    away = Refusal(grpc.StatusCode.UNAVAILABLE, "connection refused")
    replicas, made = _replica_set(["harp://a:1", "harp://b:2"],
                                  {"harp://a:1": away, "harp://b:2": away})
    with pytest.raises(grpc.RpcError) as failed:
        replicas.call("Pool", None, 5)
    assert failed.value is away and [r.calls for r in made.values()] == [1, 1]
    denied = Refusal(grpc.StatusCode.PERMISSION_DENIED, "AUTH: no")
    replicas, made = _replica_set(["harp://a:1", "harp://b:2"], {"harp://a:1": denied})
    with pytest.raises(grpc.RpcError) as failed:
        replicas.call("Pool", None, 5)
    assert failed.value is denied and list(made) == ["harp://a:1"]


def test_while_a_failover_is_under_way_the_call_goes_round_until_its_timeout():
    answers = {"harp://a:1": _not_leader("harp://b:2"),
               "harp://b:2": Refusal(grpc.StatusCode.UNAVAILABLE, "gone")}
    replicas, made = _replica_set(["harp://a:1", "harp://b:2"], answers)
    with pytest.raises(grpc.RpcError):
        replicas.call("Pool", None, 1.0)
    assert made["harp://a:1"].calls >= 3                      # rounds, not a single try
