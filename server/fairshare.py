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

Short kernels run beside the holder's. A host device runs a kernel known to be
short (`harp.backends.host.INLINE_NS`) in the session's issuing thread without
taking the device (`SessionGate.try_enter`), and charges its time as it goes:
a run of them ends, and is charged, after each millisecond of kernel time.
Taking the device for each of them was most of their cost when many sessions
launched them (a grant and a yield through the server per batch: 64 sessions of
noop launches reached 0.6-0.7x of the rate without a gate). Such a session stays
within its share all the same: when a charge for time beside puts it more than
a slice of virtual time ahead of the sessions that hold or wait for the device,
the arbiter curbs it ("curb", sent again at each such charge while it lasts),
and its kernels then wait in line like anyone's until it has had its turn
(`SessionGate.granted` lifts the curb). A session already in line runs none
beside. A kernel misjudged short runs beside to its end, and is charged then:
the session is curbed and repays the time in line.

A host device's holder lets go of the device once its kernels are done
(`SessionGate.quiet`), even if nobody asked: holding it quiet, its virtual time
would stand still while the sessions running beside are held to it, and it
would bank that time against them when it resumed. (A GPU's holder keeps the
device until asked, as before: its kernels may still be running on the device,
and nothing runs beside it.)

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
    curbed: bool = False    # its short kernels may not run beside the holder's
    turns: int = 0          # times it was granted the device
    curbs: int = 0          # times it was curbed
    curbed_charges: int = 0  # charges for time beside while curbed (each curbs it again)


Action = tuple[str, str]    # ("grant" | "revoke" | "curb", session id)


class FairShare:
    """Who holds one device, decided by weighted fair queuing on measured device time."""

    def __init__(self, slice_ns: int = SLICE_NS) -> None:
        #: How far ahead of the sessions in line one running short kernels beside them
        #: may get (device time at its share) before it is curbed.
        self.slice_ns = slice_ns
        self.members: dict[str, _Member] = {}
        self.holder: str | None = None
        self.waiting: set[str] = set()
        self._revoked = False
        #: The holder asked for the device (another of its threads, in the moment between
        #: its gate letting go and the release reaching here): back in line at its release.
        self._asked_again = False
        self._clock = 0.0           # the virtual time of the last session served
        self._arrivals = 0

    def join(self, sid: str, share: float) -> None:
        self.members[sid] = _Member(share=max(float(share), 1e-6), vtime=self._clock)

    def _floor(self, besides: str | None = None) -> float | None:
        """The least virtual time of the sessions that hold or wait for the device, other
        than `besides`; None when there are none."""
        active = [self.members[s].vtime for s in self.waiting if s != besides]
        if self.holder is not None and self.holder != besides:
            active.append(self.members[self.holder].vtime)
        return min(active) if active else None

    def request(self, sid: str) -> list[Action]:
        """`sid` has a kernel to run and does not hold the device."""
        m = self.members[sid]
        if sid == self.holder:
            self._asked_again = True
            return []
        if sid in self.waiting:
            return []
        floor = self._floor()
        m.vtime = max(m.vtime, self._clock if floor is None else floor)
        self._arrivals += 1
        m.seq = self._arrivals
        if self.holder is None:
            return self._grant(sid)
        self.waiting.add(sid)
        if not self._revoked:
            self._revoked = True
            return [("revoke", self.holder)]
        return []

    def charge(self, sid: str, used_ns: int, beside: bool = False) -> list[Action]:
        """Device time `sid` used, counted now: while holding the device, or (`beside`) in
        short kernels run beside the holder's, after which it may be curbed (see the
        module's text; a session charged beside while curbed is curbed again)."""
        m = self.members.get(sid)
        if m is None:
            return []
        m.device_ns += used_ns
        if not beside or sid == self.holder or sid in self.waiting:
            m.vtime += used_ns / m.share
            return []
        if m.curbed:
            m.curbed_charges += 1
        floor = self._floor(besides=sid)
        if floor is None:
            # Nobody holds or waits: it ran on a device it had to itself. The virtual time
            # a session asking now starts from moves on with it (nothing is banked).
            m.vtime = max(m.vtime, self._clock) + used_ns / m.share
            self._clock = max(self._clock, m.vtime)
            return []
        # Time it did not use while others were busy is not banked either.
        m.vtime = max(m.vtime, floor) + used_ns / m.share
        if m.vtime > floor + self.slice_ns / m.share:
            m.curbed = True
            m.curbs += 1
            return [("curb", sid)]
        return []

    def release(self, sid: str, used_ns: int = 0, again: bool = False) -> list[Action]:
        """The holder gives the device back after `used_ns` more device time; `again` when it
        still has kernels to run (it waits in line like the others)."""
        if sid != self.holder:
            return []
        again = again or self._asked_again
        self._asked_again = False
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
        self._asked_again = False
        m = self.members[sid]
        m.curbed = False
        m.turns += 1
        self._revoked = False
        actions: list[Action] = [("grant", sid)]
        if self.waiting:                 # others already wait: the new holder gets one slice
            self._revoked = True
            actions.append(("revoke", sid))
        return actions

    def device_ns(self, sid: str) -> int:
        m = self.members.get(sid)
        return m.device_ns if m is not None else 0

    def turns(self, sid: str) -> tuple[int, int, int]:
        """How often `sid` was granted the device, how often it was curbed, and how many of
        its charges for time beside came while it was curbed."""
        m = self.members.get(sid)
        return (m.turns, m.curbs, m.curbed_charges) if m is not None else (0, 0, 0)


class GateLink:
    """How a `SessionGate` reaches its arbiter (calls may come from any thread)."""

    def request(self) -> None: ...
    def release(self, used_ns: int, again: bool) -> None: ...
    def charge(self, used_ns: int, beside: bool) -> None: ...
    def leave(self) -> None: ...


class SessionGate(ComputeGate):
    """A session's hold on a shared device: `enter` before a kernel, `exit` after it;
    `try_enter` for a short kernel, which runs beside the holder's unless the session
    is curbed (see the module's text).

    Link calls are made outside the gate's lock (a grant or a revoke may come back
    through the arbiter on any thread, another gate's included)."""

    #: Charge device time to the arbiter at least this often: how late the arbiter may
    #: learn that a session running short kernels beside the holder's got ahead of it,
    #: or how far the holder got meanwhile.
    CHARGE_NS = 1_000_000
    run_charge_ns = CHARGE_NS

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
        self._curbed = False         # short kernels too wait for the device
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
        """Admit a short kernel without waiting: while the session holds the device and
        nobody has asked for it back, or beside the holder's while it is neither curbed
        nor in line (its queued kernels wait for the device: so do its short ones)."""
        with self._cond:
            if self._closed or (self._revoked if self._holding
                                else self._curbed or self._requested):
                return False
            self._running += 1
            self._idle = False
            return True

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
            if self._holding:
                self._used += device_ns          # its slice (time beside is not)
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
                todo = (self.link.charge, self._uncharged, not self._holding)
                self._uncharged = 0
        if todo is not None:
            todo[0](*todo[1:])

    def idle(self) -> None:
        self._went_idle(unasked=False)

    def quiet(self) -> None:
        """As `idle`, and a holder lets go of the device even though nobody asked (a host
        device's session, whose kernels all ran: see `ComputeGate.quiet`)."""
        self._went_idle(unasked=True)

    def _went_idle(self, unasked: bool) -> None:
        """No kernel of the session runs or waits: a holder gives the device back if
        someone asked for it, or (`unasked`) anyway."""
        todo = None
        with self._cond:
            if self._running == 0 and not self._waiting:
                self._idle = True
                if self._holding and (unasked or self._revoked):
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

    @property
    def curbed(self) -> bool:
        """Short kernels wait for the device (a hint, read without the lock)."""
        return self._curbed and not self._holding

    # -- the arbiter's side ------------------------------------------------------------
    def granted(self) -> None:
        with self._cond:
            self._holding = True
            self._requested = False
            self._revoked = False
            self._curbed = False     # its turn came: its short kernels run beside again
            self._used = 0
            self._cond.notify_all()

    def curb(self) -> None:
        """The session ran short kernels beside the holder's until it got ahead of the
        sessions in line: from now on they wait for the device, until its turn comes."""
        with self._cond:
            if not self._holding:
                self._curbed = True

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

    def __init__(self, slice_ns: int = SLICE_NS) -> None:
        self.policy = FairShare(slice_ns)
        self._lock = threading.Lock()
        self._deliver: dict[str, dict[str, Callable[[], None]]] = {}

    def join(self, sid: str, share: float, grant: Callable[[], None],
             revoke: Callable[[], None], curb: Callable[[], None] | None = None) -> None:
        with self._lock:
            self.policy.join(sid, share)
            self._deliver[sid] = {"grant": grant, "revoke": revoke}
            if curb is not None:
                self._deliver[sid]["curb"] = curb

    def local_gate(self, sid: str, share: float) -> SessionGate:
        gate = SessionGate(_LocalLink(self, sid), self.policy.slice_ns)
        self.join(sid, share, gate.granted, gate.revoked, gate.curb)
        return gate

    def request(self, sid: str) -> None:
        self._apply(lambda: self.policy.request(sid))

    def release(self, sid: str, used_ns: int, again: bool) -> None:
        self._apply(lambda: self.policy.release(sid, used_ns, again))

    def charge(self, sid: str, used_ns: int, beside: bool = False) -> None:
        self._apply(lambda: self.policy.charge(sid, used_ns, beside))

    def leave(self, sid: str) -> None:
        def go() -> list[Action]:
            actions = self.policy.leave(sid)
            self._deliver.pop(sid, None)
            return actions
        self._apply(go)

    def device_ns(self, sid: str) -> int:
        with self._lock:
            return self.policy.device_ns(sid)

    def turns(self, sid: str) -> tuple[int, int, int]:
        with self._lock:
            return self.policy.turns(sid)

    def _apply(self, decide: Callable[[], list[Action]]) -> None:
        with self._lock:
            actions = decide()
            calls = [self._deliver[s][kind] for kind, s in actions
                     if kind in self._deliver.get(s, ())]
        for call in calls:           # outside the lock: a local gate may call back at once
            call()


class _LocalLink(GateLink):
    def __init__(self, arbiter: DeviceArbiter, sid: str) -> None:
        self.arbiter, self.sid = arbiter, sid

    def request(self) -> None:
        self.arbiter.request(self.sid)

    def release(self, used_ns: int, again: bool) -> None:
        self.arbiter.release(self.sid, used_ns, again)

    def charge(self, used_ns: int, beside: bool) -> None:
        self.arbiter.charge(self.sid, used_ns, beside)

    def leave(self) -> None:
        self.arbiter.leave(self.sid)
