"""Claim parameters for the driver, checked without a cluster: values, unknown fields,
which config entries apply to which request, and in which order."""
from __future__ import annotations

import pytest

from harp.k8s.parameters import ConfigEntry, LeaseParameters, ParameterError, for_request, parse

from .conftest import params


def test_fields_are_parsed_and_checked():
    assert parse(params(deviceKind="cuda", memory="512MiB", share=0.25, uid=1000, gid=7)) == \
        {"device_kind": "cuda", "memory": 512 << 20, "share": 0.25, "uid": 1000, "gid": 7}
    assert parse(params(memory=4096)) == {"memory": 4096}
    for bad, says in [
            (params(share=0), "share must be a number in (0, 1]"),
            (params(share=True), "share must be a number"),
            (params(share=float("nan")), "share must be a number"),
            (params(memory="lots"), "memory: not a size"),
            (params(memory=-1), "memory: a size cannot be negative"),
            (params(memory=[1]), "memory must be a size"),
            (params(uid=-1), "uid must be from 0"),
            (params(gid="0"), "gid must be a whole number"),
            (params(deviceKind="GPU!"), "deviceKind must be a device kind"),
            (params(count=2), "unknown parameter(s) count"),
            ({"memory": "1GiB"}, "parameters must say apiVersion: harp.dev/v1"),
            ([1, 2], "parameters must be an object, got list")]:
        with pytest.raises(ParameterError, match=None) as info:
            parse(bad)
        assert says in str(info.value), (bad, str(info.value))


def test_class_entries_apply_first_then_the_claims_in_order_for_their_requests():
    entries = [
        ConfigEntry("FromClaim", (), "harp.dev", params(share=0.5)),
        ConfigEntry("FromClaim", ("b",), "harp.dev", params(memory="1GiB")),
        ConfigEntry("FromClass", (), "harp.dev", params(share=0.25, memory="2GiB")),
        ConfigEntry("FromClaim", (), "other.example.com", {"anything": "goes"}),
    ]
    assert for_request(entries, "harp.dev", "a") == LeaseParameters(memory=2 << 30, share=0.5)
    assert for_request(entries, "harp.dev", "b/fast") == LeaseParameters(memory=1 << 30,
                                                                         share=0.5)
    assert for_request([], "harp.dev", "a") == LeaseParameters()
    with pytest.raises(ParameterError, match="the device class's parameters for harp.dev"):
        for_request([ConfigEntry("FromClass", (), "harp.dev", params(share=3))], "harp.dev", "a")


def test_config_for_a_subrequest_applies_to_the_request_allocated_under_it():
    """Kubernetes names a request allocated through one of its subrequests (firstAvailable)
    `<request>/<subrequest>`, and config may name it so: its memory and share must reach the
    lease (they were dropped, and the lease took a whole device at share 1)."""
    from types import SimpleNamespace as Obj

    from harp.k8s.claims import ClaimError, plan

    def claim(*requests):
        results = [Obj(driver="harp.dev", request=r, pool="p", device=f"d{i}")
                   for i, r in enumerate(requests)]
        config = [Obj(source="FromClaim", requests=["gpu/small"],
                      opaque=Obj(driver="harp.dev", parameters=params(memory="1GiB",
                                                                        share=0.25)))]
        return Obj(status=Obj(allocation=Obj(devices=Obj(results=results, config=config))))

    kinds = {("p", "d0"): "gpu", ("p", "d1"): "gpu"}
    (only,) = plan(claim("gpu/small"), "harp.dev", kinds)
    assert only.request == "gpu" and only.parameters == LeaseParameters(memory=1 << 30,
                                                                         share=0.25)
    (other,) = plan(claim("gpu/large"), "harp.dev", kinds)
    assert other.parameters == LeaseParameters()           # config for another subrequest
    with pytest.raises(ClaimError, match="allocated as both gpu/small and gpu/large"):
        plan(claim("gpu/small", "gpu/large"), "harp.dev", kinds)
