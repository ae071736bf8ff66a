"""Placement: which devices an attach gets, as a pure function of the pool's state.

Kept free of the database so the policy can be read and tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from harp.errors import ArgumentError, NoCapacityError
from harp.units import format_size

SHARE_EPSILON = 1e-9


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
        raise ArgumentError(f"placement policy is 'spread' or 'pack', not {request.policy!r}")
    if not 0 < request.share <= 1:
        raise ArgumentError(f"share must be in (0, 1], got {request.share}")
    if request.count < 1:
        raise ArgumentError(f"count must be >= 1, got {request.count}")
    kinds = sorted({c.kind for c in candidates} | {c.backend for c in candidates if c.backend})
    pool = [c for c in candidates
            if not request.kind or request.kind in (c.kind, c.backend)]
    if not pool:
        raise ArgumentError(f"no device of kind {request.kind!r} in the pool"
                            + (f"; kinds here: {', '.join(kinds)}" if kinds else
                               " (no pool server has registered)"))
    if request.same_host:
        pool = [c for c in pool if c.host == request.client_host]
        if not pool:
            raise NoCapacityError(f"no {request.kind or 'device'} on this host "
                                  f"({request.client_host}) is in the pool")
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
        raise NoCapacityError(f"no capacity for {request.count} {request.kind or 'device'}(s): "
                              f"{why}")
    load = lambda c: (c.leases, c.used_share, c.used_memory / max(c.memory, 1))  # noqa: E731
    fits.sort(key=load, reverse=request.policy == "pack")
    if request.policy == "spread":  # one device per server first, then the rest
        seen: set[str] = set()
        first = [c for c in fits if not (c.server in seen or seen.add(c.server))]
        fits = first + [c for c in fits if c not in first]
    return [(c, request.memory or c.memory) for c in fits[:request.count]]
