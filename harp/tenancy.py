"""What a backend session may use of a shared device: memory accounts and a compute gate.

A backend that sessions share asks two things of the server (or, in a local
process, of itself) before it uses the device on a session's behalf:

- `MemoryBroker.reserve(nbytes)` before it allocates device memory (or keeps
  a module image): the broker checks the session's quota, the quota of its
  lease across every session of that lease on the device, and the device's
  capacity, and raises `QuotaError` or `OutOfMemoryError` when the bytes are
  not there. `release` gives them back. `mem_info` is what the session may
  still use.
- `ComputeGate.enter()` before it runs a kernel and `exit(device_ns)` after,
  with the kernel's measured device time: the gate dispatches sessions'
  kernels in weighted fair order by their compute shares.

The `Ledger` here is the accounting itself, used in-process by a backend on
its own (`harp.connect("local:cpu")`) and by a pool server for all its
sessions; a session in a worker process reaches the server's ledger through
`harp.server.worker`. Everything a session holds is released when it closes
or its process dies: the ledger forgets the session as a whole.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field

from .errors import OutOfMemoryError, QuotaError
from .types import MemInfo
from .units import format_size


class MemoryBroker(abc.ABC):
    """One session's memory account."""

    @abc.abstractmethod
    def reserve(self, nbytes: int) -> None:
        """Take `nbytes` for the session, or raise `QuotaError`/`OutOfMemoryError`."""

    @abc.abstractmethod
    def release(self, nbytes: int) -> None:
        """Give back `nbytes` the session reserved."""

    @abc.abstractmethod
    def mem_info(self) -> MemInfo:
        """Free and total bytes as the session sees them (its quota when it has one)."""

    def close(self) -> None:
        """The session is over: everything it reserved goes back."""


class ComputeGate(abc.ABC):
    """One session's turn on a device that sessions share by compute share."""

    #: The session has a process of its own (process isolation): a host device may then
    #: charge a run of kernels no more than the CPU time the process used while it ran
    #: (`harp.backends.hoststreams`), not the wall time during which a loaded host ran
    #: something else.
    own_process: bool = False

    @abc.abstractmethod
    def enter(self) -> None:
        """Block until the session may run a kernel."""

    @abc.abstractmethod
    def exit(self, device_ns: int) -> None:
        """A kernel that `enter` admitted is done; it took `device_ns` of device time."""

    def try_enter(self) -> bool:
        """Admit a short kernel (a host device's, run in the issuing thread) if that would
        not wait: the session holds the device and nobody has asked for it back, or the
        gate lets short kernels run beside the holder's and the session is not `curbed`.
        False, having entered nothing, otherwise."""
        return False

    def idle(self) -> None:
        """The session has no kernel waiting: another may have the device."""

    def quiet(self) -> None:
        """The session has no kernel waiting or running anywhere (a host device's, whose
        kernels run on the host: once they are done, nothing of the session's is on the
        device): as `idle`, and a holder lets go even if nobody asked. A quiet holder
        keeping the device would stand still in virtual time while sessions running
        short kernels beside it (`try_enter`) are held to it, and then bank that time
        against them once it resumed."""
        self.idle()

    #: A run of short kernels that `try_enter` admitted is charged (`exit`) and admitted
    #: again at least this often, by the kernels' time: so the arbiter hears of time
    #: spent beside the holder's within a batch, not at its end.
    run_charge_ns: int = 1_000_000
    #: The session's short kernels may not run beside the holder's now (it got ahead of
    #: the sessions in line): a run of them that `try_enter` admitted so ends at the next
    #: kernel boundary, and the next waits for the device.
    curbed: bool = False

    def wants_back(self, running_ns: int = 0) -> bool:
        """The gate would like the device back at the next kernel boundary, counting
        `running_ns` of kernels run since `enter` and not yet told to `exit`."""
        return False

    def close(self) -> None:
        """The session is over."""


@dataclass
class _Pot:
    limit: int | None            # None: no limit of its own
    used: int = 0


@dataclass
class _Session:
    card: _Pot
    lease: _Pot | None
    quota: int | None
    used: int = 0
    closed: bool = False
    lease_key: tuple | None = None
    extra: dict = field(default_factory=dict)


class Ledger:
    """Memory accounts of the devices one process serves: each device's capacity, each
    lease's quota (shared by all sessions of the lease on that device), each session's use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cards: dict[int, _Pot] = {}
        self._leases: dict[tuple, _Pot] = {}
        self._sessions: dict[str, _Session] = {}

    def add_device(self, index: int, capacity: int) -> None:
        with self._lock:
            self._cards.setdefault(index, _Pot(capacity))

    def open(self, session_id: str, device: int, *, quota: int | None = None,
             lease: str = "") -> "Account":
        """An account for a new session on `device`; sessions of one `lease` share its quota."""
        with self._lock:
            card = self._cards[device]
            pot = None
            key = None
            if lease and quota is not None:
                key = (lease, device)
                pot = self._leases.get(key)
                if pot is None:
                    pot = self._leases[key] = _Pot(quota)
                else:
                    pot.limit = quota
            self._sessions[session_id] = _Session(card, pot, None if pot else quota,
                                                  lease_key=key)
        return Account(self, session_id)

    def reserve(self, session_id: str, nbytes: int) -> None:
        with self._lock:
            s = self._sessions[session_id]
            if s.closed:
                raise QuotaError("the session is closed")
            if s.lease is not None and s.lease.used + nbytes > s.lease.limit:
                raise QuotaError(
                    f"allocating {format_size(nbytes)} would exceed the lease's memory quota "
                    f"on this device: {format_size(s.lease.used)} of "
                    f"{format_size(s.lease.limit)} in use by its sessions")
            if s.quota is not None and s.used + nbytes > s.quota:
                raise QuotaError(f"allocating {format_size(nbytes)} would exceed the session's "
                                 f"memory quota: {format_size(s.used)} of "
                                 f"{format_size(s.quota)} in use")
            card = s.card
            if card.used + nbytes > card.limit:
                raise OutOfMemoryError(
                    f"cannot allocate {format_size(nbytes)}: {format_size(card.limit - card.used)}"
                    f" of {format_size(card.limit)} free on the device")
            card.used += nbytes
            s.used += nbytes
            if s.lease is not None:
                s.lease.used += nbytes

    def release(self, session_id: str, nbytes: int) -> None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.closed:
                return
            nbytes = min(nbytes, s.used)
            s.used -= nbytes
            s.card.used -= nbytes
            if s.lease is not None:
                s.lease.used -= nbytes

    def mem_info(self, session_id: str) -> MemInfo:
        with self._lock:
            s = self._sessions[session_id]
            card_free = max(0, s.card.limit - s.card.used)
            if s.lease is not None:
                return MemInfo(free=max(0, min(s.lease.limit - s.lease.used, card_free)),
                               total=s.lease.limit)
            if s.quota is not None:
                return MemInfo(free=max(0, min(s.quota - s.used, card_free)), total=s.quota)
            return MemInfo(free=card_free, total=s.card.limit)

    def close(self, session_id: str) -> None:
        """Forget a session: whatever it still held goes back to its lease and device."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                return
            s.closed = True
            s.card.used -= s.used
            if s.lease is not None:
                s.lease.used -= s.used
                if s.lease.used == 0 and not any(o.lease is s.lease
                                                 for o in self._sessions.values()):
                    self._leases.pop(s.lease_key, None)

    # -- views -----------------------------------------------------------------------
    def capacity(self, device: int) -> int:
        with self._lock:
            return self._cards[device].limit

    def used(self, device: int) -> int:
        with self._lock:
            return self._cards[device].used

    def session_used(self, session_id: str) -> int:
        with self._lock:
            s = self._sessions.get(session_id)
            return s.used if s is not None else 0

    def lease_used(self, lease: str, device: int) -> int:
        with self._lock:
            pot = self._leases.get((lease, device))
            return pot.used if pot is not None else 0


@dataclass(frozen=True)
class Tenancy:
    """What a pool server hands `Backend.open` for one session: its memory account, and the
    gate to hold while it runs kernels (None: the session has the device to itself)."""
    memory: MemoryBroker
    compute: ComputeGate | None = None


class Account(MemoryBroker):
    """A session's account in a `Ledger` of the same process."""

    __slots__ = ("ledger", "session_id")

    def __init__(self, ledger: Ledger, session_id: str) -> None:
        self.ledger, self.session_id = ledger, session_id

    def reserve(self, nbytes: int) -> None:
        self.ledger.reserve(self.session_id, nbytes)

    def release(self, nbytes: int) -> None:
        self.ledger.release(self.session_id, nbytes)

    def mem_info(self) -> MemInfo:
        return self.ledger.mem_info(self.session_id)

    def close(self) -> None:
        self.ledger.close(self.session_id)

    @property
    def used(self) -> int:
        return self.ledger.session_used(self.session_id)
