"""What preparing a ResourceClaim means for HARP: one lease per request of the claim.

Kubernetes allocated the claim's devices from the driver's ResourceSlices; the
allocation lists, per request, the devices it got (pool and device name) and the
opaque configuration of the class and the claim. `plan` turns that into what the
plugin attaches: for each request (subrequests of `firstAvailable` count as their
request), how many devices, of which kind, with which memory and share. No I/O: the
claim and the slices' device kinds come in as arguments.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .parameters import ConfigEntry, LeaseParameters, ParameterError, for_request

#: Request names are DNS labels; they name directories and CDI devices, so check them.
_REQUEST = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class ClaimError(ValueError):
    """The claim cannot be prepared as it is; the message says why."""


@dataclass(frozen=True)
class RequestPlan:
    """One request of a claim, as a HARP lease."""
    request: str                           # the request's name (a subrequest's parent)
    devices: tuple[tuple[str, str], ...]   # (pool, device) that Kubernetes allocated
    parameters: LeaseParameters
    kind: str                              # what the lease attaches: a kind or backend

    @property
    def count(self) -> int:
        return len(self.devices)


def _entries(allocation: Any) -> list[ConfigEntry]:
    out = []
    for entry in allocation.devices.config or []:
        if entry.opaque is None:
            continue
        out.append(ConfigEntry(source=entry.source or "", requests=tuple(entry.requests or ()),
                               driver=entry.opaque.driver or "",
                               parameters=entry.opaque.parameters))
    return out


def plan(claim: Any, driver: str, kinds: dict[tuple[str, str], str]) -> list[RequestPlan]:
    """The leases `claim` (a `ResourceV1ResourceClaim`) needs from `driver`.

    `kinds` maps (pool, device) to the `kind` attribute the driver's ResourceSlices give
    that device; a request without `deviceKind` attaches that kind."""
    allocation = claim.status.allocation if claim.status is not None else None
    if allocation is None or allocation.devices is None:
        raise ClaimError("it is not allocated")
    results = [r for r in allocation.devices.results or [] if r.driver == driver]
    if not results:
        raise ClaimError(f"its allocation has no device of driver {driver}")
    grouped: dict[str, list[tuple[str, str]]] = {}
    #: The name each request was allocated under: itself, or one of its subrequests
    #: ("gpu/small"), which config may name (Kubernetes' <request>/<subrequest> form).
    allocated_as: dict[str, str] = {}
    for result in results:
        full = result.request or ""
        request = full.split("/", 1)[0]
        if not _REQUEST.fullmatch(request):
            raise ClaimError(f"bad request name {result.request!r} in its allocation")
        if allocated_as.setdefault(request, full) != full:
            raise ClaimError(f"request {request} is allocated as both "
                             f"{allocated_as[request]} and {full}")
        grouped.setdefault(request, []).append((result.pool or "", result.device or ""))
    entries = _entries(allocation)
    plans = []
    for request, devices in grouped.items():
        try:
            parameters = for_request(entries, driver, allocated_as[request])
        except ParameterError as exc:
            raise ClaimError(f"request {request}: {exc}") from None
        kind = parameters.device_kind
        if not kind:
            found = {kinds.get(d) for d in devices}
            if None in found:
                missing = next(d for d in devices if d not in kinds)
                raise ClaimError(f"request {request}: device {missing[1]} of pool {missing[0]} "
                                 "is not in the driver's ResourceSlices (it left the pool?); "
                                 "say deviceKind in the claim's parameters")
            if len(found) != 1:
                raise ClaimError(f"request {request}: its devices are of different kinds "
                                 f"({', '.join(sorted(k for k in found if k))}); a HARP lease "
                                 "has one kind")
            kind = found.pop() or ""
        plans.append(RequestPlan(request=request, devices=tuple(devices),
                                 parameters=parameters, kind=kind))
    return plans
