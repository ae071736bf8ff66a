"""A request's HARP parameters: the opaque device configuration for this driver, checked.

A DeviceClass and a ResourceClaim may carry `config` entries with `opaque.driver` set to
the driver's name and `opaque.parameters` an object like

    apiVersion: harp.dev/v1
    kind: LeaseParameters
    deviceKind: gpu         # a HARP device kind or backend (default: the allocated devices')
    memory: 4GiB            # memory quota per device (default: the whole device)
    share: 0.5              # compute share per device, (0, 1] (default: 1)
    uid: 1000               # owner of the files handed to the container (default: 0)
    gid: 1000

Kubernetes copies both into the claim's allocation when it allocates. For each request
the entries that name it, or name no request, apply in order, the class's before the
claim's, later fields over earlier ones. Everything here is checked, and a bad value is
a `ParameterError` that names the field, so the claim's prepare fails with that message.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

from harp.units import parse_size

API_VERSION = "harp.dev/v1"
KIND = "LeaseParameters"
_FIELDS = ("apiVersion", "kind", "deviceKind", "memory", "share", "uid", "gid")
_DEVICE_KIND = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_MAX_ID = 2**32 - 2                 # uid_t/gid_t, less (uid_t)-1


class ParameterError(ValueError):
    """A claim's parameters for this driver are malformed; the message says which field."""


@dataclass(frozen=True)
class LeaseParameters:
    """What one request's HARP lease asks for."""
    device_kind: str = ""        # "" = the kind of the devices Kubernetes allocated
    memory: int = 0              # bytes per device; 0 = the whole device
    share: float = 1.0           # compute share per device
    uid: int = 0                 # owner of the request's files in the container
    gid: int = 0


def _integer(value: Any, field: str, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(f"{field} must be a whole number, got {value!r}")
    if not 0 <= value <= top:
        raise ParameterError(f"{field} must be from 0 to {top}, got {value}")
    return value


def _memory(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ParameterError(f"memory must be a size such as 4GiB or a number of bytes, "
                             f"got {value!r}")
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise ParameterError(f"memory: {exc}") from None
    if size > 2**63 - 1:
        raise ParameterError(f"memory is too large: {value!r}")
    return size


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 < value <= 1:
        raise ParameterError(f"share must be a number in (0, 1], got {value!r}")
    return float(value)


def parse(parameters: Any) -> dict[str, Any]:
    """The fields one `opaque.parameters` object sets, checked (keyed as LeaseParameters)."""
    if not isinstance(parameters, dict):
        raise ParameterError(f"parameters must be an object, got {type(parameters).__name__}")
    unknown = sorted(str(k) for k in parameters if k not in _FIELDS)
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; known: "
                             f"{', '.join(_FIELDS)}")
    if parameters.get("apiVersion") != API_VERSION or parameters.get("kind") != KIND:
        raise ParameterError(f"parameters must say apiVersion: {API_VERSION} and kind: {KIND}, "
                             f"got {parameters.get('apiVersion')!r} and "
                             f"{parameters.get('kind')!r}")
    fields: dict[str, Any] = {}
    if "deviceKind" in parameters:
        kind = parameters["deviceKind"]
        if not isinstance(kind, str) or not _DEVICE_KIND.fullmatch(kind):
            raise ParameterError(f"deviceKind must be a device kind or backend name (gpu, fpga, "
                                 f"npu, cpu, cuda, ...), got {kind!r}")
        fields["device_kind"] = kind
    if "memory" in parameters:
        fields["memory"] = _memory(parameters["memory"])
    if "share" in parameters:
        fields["share"] = _share(parameters["share"])
    for name in ("uid", "gid"):
        if name in parameters:
            fields[name] = _integer(parameters[name], name, _MAX_ID)
    return fields


@dataclass(frozen=True)
class ConfigEntry:
    """One opaque configuration entry of an allocation, as far as this module needs it."""
    source: str                 # "FromClass" or "FromClaim"
    requests: tuple[str, ...]   # the requests it is for; () = all
    driver: str
    parameters: Any


def for_request(entries: Iterable[ConfigEntry], driver: str, request: str) -> LeaseParameters:
    """The parameters of `request`: every entry for `driver` that applies, class ones first."""
    ordered = sorted(enumerate(entries), key=lambda e: (e[1].source != "FromClass", e[0]))
    result = LeaseParameters()
    base = request.split("/", 1)[0]
    for _, entry in ordered:
        if entry.driver != driver:
            continue
        if entry.requests and request not in entry.requests and base not in entry.requests:
            continue
        where = "the device class's" if entry.source == "FromClass" else "the claim's"
        try:
            result = replace(result, **parse(entry.parameters))
        except ParameterError as exc:
            raise ParameterError(f"{where} parameters for {driver}: {exc}") from None
    return result
