"""Compute shares, enforced: sessions sharing a device take turns in weighted fair order.

A device runs one session's kernels at a time, as a GPU time-slices the
contexts of separate processes. `FairShare` (no I/O, no threads) decides who
has the device: each session has a virtual time that grows by the device time
its kernels took divided by its share; the device goes to the waiting session
with the least virtual time, so over a window each busy session's device time
tracks its share. It is work-conserving: a session alone keeps the device as
long as nobody else asks, and a session that was idle starts again at the
virtual time of the busy ones (it cannot bank the time it did not use).

A holder keeps the device for at least `slice_ns` of device time once another
session asks (fewer switches), then hands it over at its next kernel boundary.

`SessionGate` is a session's side (a `harp.tenancy.ComputeGate`): held while a
kernel runs, charged the kernel's measured time. It talks to the arbiter
through a link: `DeviceArbiter` in the same process (thread isolation), or the
worker's control socket (process isolation, `harp.server.worker`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from harp.tenancy import ComputeGate

#: Device time a holder may use before it yields to a waiting session.
SLICE_NS = 5_000_000


@dataclass
class _Member:
    share: float
    vtime: float = 0.0
    device_ns: int = 0
    seq: int = 0            # when it started waiting (ties go to the earliest)


Action = tuple[str, str]    # ("grant" | "revoke", session id)


class FairShare:
    """Who holds one device, decided by weighted fair queuing on measured device time."""

    def __init__(self) -> None:
        self.members: dict[str, _Member] = {}
        self.holder: str | None = None
        self.waiting: set[str] = set()
        self._revoked = False
        self._clock = 0.0           # the virtual time of the last session served
        self._arrivals = 0

    def join(self, sid: str, share: float) -> None:
        self.members[sid] = _Member(share=max(float(share), 1e-6), vtime=self._clock)

    def _floor(self) -> float:
        active = [self.members[s].vtime for s in self.waiting]
        if self.holder is not None:
            active.append(self.members[self.holder].vtime)
        return min(active) if active else self._clock

    def request(self, sid: str) -> list[Action]:
        """`sid` has a kernel to run and does not hold the device."""
        m = self.members[sid]
        if sid == self.holder or sid in self.waiting:
            return []
        m.vtime = max(m.vtime, self._floor())
        self._arrivals += 1
        m.seq = self._arrivals
        if self.holder is None:
            return self._grant(sid)
        self.waiting.add(sid)
        if not self._revoked:
            self._revoked = True
            return [("revoke", self.holder)]
        return []

    def charge(self, sid: str, used_ns: int) -> None:
        """Device time `sid` used (while holding), counted now."""
        m = self.members.get(sid)
        if m is not None:
            m.device_ns += used_ns
            m.vtime += used_ns / m.share

    def release(self, sid: str, used_ns: int = 0, again: bool = False) -> list[Action]:
        """The holder gives the device back after `used_ns` more device time; `again` when it
        still has kernels to run (it waits in line like the others)."""
        if sid != self.holder:
            return []
        self.charge(sid, used_ns)
        self._clock = max(self._clock, self.members[sid].vtime)
        self.holder = None
        if again:
            m = self.members[sid]
            self._arrivals += 1
            m.seq = self._arrivals
            self.waiting.add(sid)
        return self._next()

    def leave(self, sid: str) -> list[Action]:
        """The session is over (closed, or its worker died)."""
        self.members.pop(sid, None)
        self.waiting.discard(sid)
        if self.holder == sid:
            self.holder = None
            return self._next()
        return []

    def _next(self) -> list[Action]:
        if not self.waiting:
            return []
        sid = min(self.waiting, key=lambda s: (self.members[s].vtime, self.members[s].seq))
        self.waiting.discard(sid)
        return self._grant(sid)

    def _grant(self, sid: str) -> list[Action]:
        self.holder = sid
        self._revoked = False
        actions: list[Action] = [("grant", sid)]
        if self.waiting:                 # others already wait: the new holder gets one slice
            self._revoked = True
            actions.append(("revoke", sid))
        return actions

    def device_ns(self, sid: str) -> int:
        m = self.members.get(sid)
        return m.device_ns if m is not None else 0


class GateLink:
    """How a `SessionGate` reaches its arbiter (calls may come from any thread)."""

    def request(self) -> None: ...
    def release(self, used_ns: int, again: bool) -> None: ...
    def charge(self, used_ns: int) -> None: ...
    def leave(self) -> None: ...


class SessionGate(ComputeGate):
    """A session's hold on a shared device: `enter` before a kernel, `exit` after it.

    Link calls are made outside the gate's lock (a grant or a revoke may come back
    through the arbiter on any thread, another gate's included)."""

    #: Charge device time to the arbiter at least this often while holding.
    CHARGE_NS = 50_000_000

    def __init__(self, link: GateLink, slice_ns: int = SLICE_NS, *,
                 own_process: bool = False) -> None:
        self.link = link
        self.slice_ns = slice_ns
        self.own_process = own_process
        self._cond = threading.Condition(threading.Lock())
        self._holding = False
        self._requested = False
        self._revoked = False
        self._running = 0
        self._waiting = 0            # threads blocked in enter
        self._used = 0               # device time since the grant
        self._uncharged = 0          # device time not yet told to the arbiter
        self._closed = False
        self._idle = True            # no kernel of the session waits or runs
        self.device_ns = 0

    # -- the session's side ------------------------------------------------------------
    def enter(self) -> None:
        with self._cond:                              # the common case: ours, nobody waits
            if self._holding and not self._revoked:
                self._running += 1
                self._idle = False
                return
        self._enter_slow()

    def try_enter(self) -> bool:
        with self._cond:
            if self._holding and not self._revoked:
                self._running += 1
                self._idle = False
                return True
        return False

    def _enter_slow(self) -> None:
        while True:
            todo: list = []
            with self._cond:
                self._idle = False
                if self._closed or (self._holding and
                                    not (self._revoked and self._used >= self.slice_ns)):
                    self._running += 1
                    return
                if self._holding and self._running == 0:
                    todo.append(self._give_back(again=True))    # our slice is over
                elif not self._holding and not self._requested:
                    self._requested = True
                    todo.append((self.link.request,))
                if not todo:
                    self._waiting += 1
                    self._cond.wait(1.0)
                    self._waiting -= 1
            for call in todo:
                call[0](*call[1:])

    def exit(self, device_ns: int) -> None:
        todo = None
        with self._cond:
            self._running -= 1
            self._used += device_ns
            self._uncharged += device_ns
            self.device_ns += device_ns
            if not self._revoked and self._uncharged < self.CHARGE_NS:
                return                                # the common case
            if self._holding and self._revoked and self._running == 0 and \
                    self._used >= self.slice_ns:
                # Busy still (it would go idle through `idle()`): back in line at once, so
                # the arbiter weighs its virtual time against the others'.
                todo = self._give_back(again=True)
            elif self._uncharged >= self.CHARGE_NS:
                todo = (self.link.charge, self._uncharged)
                self._uncharged = 0
        if todo is not None:
            todo[0](*todo[1:])

    def idle(self) -> None:
        todo = None
        with self._cond:
            if self._running == 0 and not self._waiting:
                self._idle = True
                if self._holding and self._revoked:
                    todo = self._give_back(again=False)
        if todo is not None:
            todo[0](*todo[1:])

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._holding = False
            self._cond.notify_all()
        self.link.leave()

    def _give_back(self, again: bool) -> tuple:
        """Let go of the device (with `_cond` held); returns the link call to make after.
        `again` also asks for the device back."""
        used, self._uncharged, self._used = self._uncharged, 0, 0
        self._holding = False
        self._revoked = False
        self._requested = again
        return (self.link.release, used, again)

    def wants_back(self, running_ns: int = 0) -> bool:
        """Another session waits and this one has had its slice, counting `running_ns` of a
        run of kernels not yet told to `exit`: end the run at the next kernel boundary.
        (Read without the lock: a hint; `exit` decides.)"""
        return self._revoked and self._used + running_ns >= self.slice_ns

    # -- the arbiter's side ------------------------------------------------------------
    def granted(self) -> None:
        with self._cond:
            self._holding = True
            self._requested = False
            self._revoked = False
            self._used = 0
            self._cond.notify_all()

    def revoked(self) -> None:
        """Another session waits: yield now if idle, else once this slice is used."""
        todo = None
        with self._cond:
            if not self._holding:
                return
            self._revoked = True
            if self._idle and self._running == 0 and not self._waiting:
                todo = self._give_back(again=False)
            else:
                self._cond.notify_all()
        if todo is not None:
            todo[0](*todo[1:])


class DeviceArbiter:
    """A `FairShare` for one device, with its sessions' gates reached by callbacks.

    Gates in this process (thread isolation) join with `local_gate`; remote ones (worker
    processes) join with `join`, giving the functions that deliver a grant or a revoke.
    """

    def __init__(self) -> None:
        self.policy = FairShare()
        self._lock = threading.Lock()
        self._deliver: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}

    def join(self, sid: str, share: float, grant: Callable[[], None],
             revoke: Callable[[], None]) -> None:
        with self._lock:
            self.policy.join(sid, share)
            self._deliver[sid] = (grant, revoke)

    def local_gate(self, sid: str, share: float) -> SessionGate:
        gate = SessionGate(_LocalLink(self, sid))
        self.join(sid, share, gate.granted, gate.revoked)
        return gate

    def request(self, sid: str) -> None:
        self._apply(lambda: self.policy.request(sid))

    def release(self, sid: str, used_ns: int, again: bool) -> None:
        self._apply(lambda: self.policy.release(sid, used_ns, again))

    def charge(self, sid: str, used_ns: int) -> None:
        with self._lock:
            self.policy.charge(sid, used_ns)

    def leave(self, sid: str) -> None:
        def go() -> list[Action]:
            actions = self.policy.leave(sid)
            self._deliver.pop(sid, None)
            return actions
        self._apply(go)

    def device_ns(self, sid: str) -> int:
        with self._lock:
            return self.policy.device_ns(sid)

    def _apply(self, decide: Callable[[], list[Action]]) -> None:
        with self._lock:
            actions = decide()
            calls = [self._deliver[s][0 if kind == "grant" else 1]
                     for kind, s in actions if s in self._deliver]
        for call in calls:           # outside the lock: a local gate may call back at once
            call()


class _LocalLink(GateLink):
    def __init__(self, arbiter: DeviceArbiter, sid: str) -> None:
        self.arbiter, self.sid = arbiter, sid

    def request(self) -> None:
        self.arbiter.request(self.sid)

    def release(self, used_ns: int, again: bool) -> None:
        self.arbiter.release(self.sid, used_ns, again)

    def charge(self, used_ns: int) -> None:
        self.arbiter.charge(self.sid, used_ns)

    def leave(self) -> None:
        self.arbiter.leave(self.sid)
