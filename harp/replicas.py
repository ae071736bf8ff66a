"""A scheduler reached at several addresses: which replica to call, and when to move on.

Scheduler replicas share one PostgreSQL database and one of them leads; the others
refuse changes with `NOT_LEADER` and name the leader (`harp-leader` in the trailing
metadata). Clients (`SchedulerClient`) and pool servers (their `Registrar`) take a
comma-separated list of addresses and call the replica they last found leading; a
refusal by a follower sends them to the leader it names, and an unreachable replica
to the next address. Both sides use this one rule, so it lives here, below them.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import grpc

from .errors import ArgumentError

#: Trailing metadata key in which a follower names the leader's address.
LEADER_METADATA = "harp-leader"
#: The status details of a follower's refusal start with this code.
NOT_LEADER = "NOT_LEADER"
#: Pause between rounds of the addresses while a failover is under way.
FAILOVER_PAUSE_S = 0.25


def split_addresses(text: str) -> list[str]:
    """Scheduler addresses from "harp://a:1,harp://b:2" (a bare HOST:PORT gets harp://)."""
    addresses = [a.strip() for a in (text or "").split(",") if a.strip()]
    if not addresses:
        raise ArgumentError(f"no scheduler address in {text!r}")
    return [a if "://" in a else f"harp://{a}" for a in addresses]


def _scheme(address: str) -> str:
    return address.partition("://")[0]


def is_not_leader(exc: grpc.RpcError) -> bool:
    """A follower's refusal: the request changed nothing, another replica leads."""
    return (exc.details() or "").startswith(NOT_LEADER + ":")


def leader_hint(exc: grpc.RpcError) -> str | None:
    """The leader's address a follower named in its refusal, if any."""
    try:
        metadata = exc.trailing_metadata() or ()
    except Exception:                      # a call that never reached a server has none
        return None
    for key, value in metadata:
        if key == LEADER_METADATA and isinstance(value, str) and value:
            return value
    return None


def should_move_on(exc: grpc.RpcError) -> bool:
    """Whether another replica may answer: this one is away, busy or not the leader."""
    return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
        or is_not_leader(exc)


class ReplicaSet:
    """Stubs for each scheduler address, and the one to call now.

    `channel_for(address)` opens a channel (TLS as the caller needs); `stub_for(channel)`
    wraps it. A leader a follower names is added to the set if it is not there yet, but
    only on the scheme the set already uses, so a hint can never turn mutual TLS into
    plain text."""

    def __init__(self, addresses: list[str], channel_for: Callable[[str], grpc.Channel],
                 stub_for: Callable[[grpc.Channel], Any]) -> None:
        if not addresses:
            raise ArgumentError("no scheduler address")
        self.addresses = list(addresses)
        self._channel_for = channel_for
        self._stub_for = stub_for
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self._current = 0
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        """The address calls go to now."""
        with self._lock:
            return self.addresses[self._current]

    def stub(self, address: str | None = None) -> Any:
        """The stub for `address` (default: the current one), its channel opened once."""
        address = address or self.current
        with self._lock:
            if address not in self._stubs:
                channel = self._channel_for(address)
                self._channels[address] = channel
                self._stubs[address] = self._stub_for(channel)
            return self._stubs[address]

    def moved(self, exc: grpc.RpcError, address: str) -> None:
        """`address` failed with `exc`: go to the leader it named, else to the next address."""
        hint = leader_hint(exc) if is_not_leader(exc) else None
        with self._lock:
            if self.addresses[self._current] != address:
                return                      # another thread has moved on already
            if hint and hint != address and _scheme(hint) == _scheme(address):
                if hint not in self.addresses:
                    self.addresses.append(hint)
                self._current = self.addresses.index(hint)
            else:
                self._current = (self._current + 1) % len(self.addresses)

    def call(self, method: str, request: Any, timeout: float) -> Any:
        """Call `method` on the current replica, moving on while replicas are away or not
        leading. While some replica answers that it follows (a failover is under way), the
        call goes round again, within `timeout` in all; when every address is unreachable
        it gives up after one round. Raises the last `grpc.RpcError`."""
        deadline = time.monotonic() + timeout
        last: grpc.RpcError | None = None
        followers = tried = 0
        while True:
            remaining = deadline - time.monotonic()
            if last is not None and remaining <= 0:
                raise last
            address = self.current
            try:
                return getattr(self.stub(address), method)(request,
                                                           timeout=max(remaining, 0.5))
            except grpc.RpcError as exc:
                if not should_move_on(exc):
                    raise
                last = exc
                followers += is_not_leader(exc)
                self.moved(exc, address)
            tried += 1
            if tried >= len(self.addresses):        # one round done
                if not followers:
                    raise last
                tried = followers = 0
                time.sleep(min(FAILOVER_PAUSE_S, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Close every channel opened."""
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            self._stubs.clear()
