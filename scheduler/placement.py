"""Placement: which devices an attach gets, as a pure function of the pool's state.

Kept free of the database so the policy can be read and tested on its own. A refusal
says why in words for the client, and as a reason code for the scheduler's metrics
(`reason`, one of `REASONS`, on the error it raises).
"""
from __future__ import annotations

from dataclasses import dataclass

from harp.errors import ArgumentError, HarpError, NoCapacityError
from harp.units import format_size

SHARE_EPSILON = 1e-9

#: Why an attach was refused: a malformed request, a kind the pool does not have, no such
#: device on the client's host, only servers that are down or draining, or no room left.
BAD_REQUEST, UNKNOWN_KIND, NOT_ON_HOST, SERVERS_UNAVAILABLE, NO_ROOM = (
    "bad_request", "unknown_kind", "not_on_host", "servers_unavailable", "no_room")
REASONS = (BAD_REQUEST, UNKNOWN_KIND, NOT_ON_HOST, SERVERS_UNAVAILABLE, NO_ROOM)


def refusal(cls: type[HarpError], reason: str, message: str) -> HarpError:
    """An error of class `cls` saying `message`, carrying the reason code `reason`."""
    error = cls(message)
    error.reason = reason  # type: ignore[attr-defined]
    return error


@dataclass(frozen=True)
class Candidate:
    """A device as placement sees it: its size, its server, and what leases already hold."""
    server: str
    index: int
    kind: str
    host: str
    memory: int
    server_state: str       # "up", "down", "draining"
    used_memory: int
    used_share: float
    leases: int
    backend: str = ""       # the backend serving it ("cuda", "opencl", "onnx", ...)


@dataclass(frozen=True)
class Request:
    kind: str               # "" = any; a device kind (gpu, fpga, npu, cpu) or a backend name
    count: int
    memory: int             # 0 = the whole device
    share: float
    same_host: bool
    client_host: str
    policy: str             # "spread" or "pack"


def choose(candidates: list[Candidate], request: Request) -> list[tuple[Candidate, int]]:
    """Pick `request.count` devices; returns (device, memory quota) pairs, or raises why not."""
    if request.policy not in ("spread", "pack"):
        raise refusal(ArgumentError, BAD_REQUEST,
                      f"placement policy is 'spread' or 'pack', not {request.policy!r}")
    if not 0 < request.share <= 1:
        raise refusal(ArgumentError, BAD_REQUEST, f"share must be in (0, 1], got {request.share}")
    if request.count < 1:
        raise refusal(ArgumentError, BAD_REQUEST, f"count must be >= 1, got {request.count}")
    kinds = sorted({c.kind for c in candidates} | {c.backend for c in candidates if c.backend})
    pool = [c for c in candidates
            if not request.kind or request.kind in (c.kind, c.backend)]
    if not pool:
        raise refusal(ArgumentError, UNKNOWN_KIND,
                      f"no device of kind {request.kind!r} in the pool"
                      + (f"; kinds here: {', '.join(kinds)}" if kinds else
                         " (no pool server has registered)"))
    if request.same_host:
        pool = [c for c in pool if c.host == request.client_host]
        if not pool:
            raise refusal(NoCapacityError, NOT_ON_HOST, f"no {request.kind or 'device'} on "
                          f"this host ({request.client_host}) is in the pool")
    up = [c for c in pool if c.server_state == "up"]
    fits = [c for c in up
            if c.used_memory + (request.memory or c.memory) <= c.memory
            and c.used_share + request.share <= 1 + SHARE_EPSILON
            and (request.memory <= c.memory)]
    if len(fits) < request.count:
        why = (f"all {len(pool)} matching device(s) are on servers that are down or draining"
               if not up else
               f"{len(fits)} of {len(up)} matching device(s) have room for "
               f"{format_size(request.memory) if request.memory else 'a whole device'} at "
               f"compute share {request.share:g}")
        raise refusal(NoCapacityError, NO_ROOM if up else SERVERS_UNAVAILABLE,
                      f"no capacity for {request.count} {request.kind or 'device'}(s): {why}")
    load = lambda c: (c.leases, c.used_share, c.used_memory / max(c.memory, 1))  # noqa: E731
    fits.sort(key=load, reverse=request.policy == "pack")
    if request.policy == "spread":  # one device per server first, then the rest
        seen: set[str] = set()
        first = [c for c in fits if not (c.server in seen or seen.add(c.server))]
        fits = first + [c for c in fits if c not in first]
    return [(c, request.memory or c.memory) for c in fits[:request.count]]
