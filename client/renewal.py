"""Keeping a lease alive while a program works: renew it in the background.

Renewals go every third of the lease's lifetime, or of its tokens' (a minute by
default), whichever is shorter, so a reconnect always finds a token that lives.
While the scheduler is away they fail quietly and are retried (the session
keeps running on the pool server); once the scheduler says the lease is over,
the keeper stops and remembers why, so the device can say so instead of a bare
transport error.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from harp.errors import HarpError, LeaseError, TransportError
from harp.lease import Lease

log = logging.getLogger("harp.client")


class LeaseKeeper:
    """Renews one lease until stopped or until the scheduler ends it."""

    def __init__(self, lease: Lease, scheduler: Any, *, min_interval_s: float = 0.2) -> None:
        self.lease = lease
        self.scheduler = scheduler            # a SchedulerClient
        life = min(t for t in (lease.ttl_s, lease.token_ttl_s) if t > 0) if \
            (lease.ttl_s > 0 or lease.token_ttl_s > 0) else 60.0
        self.interval_s = max(min_interval_s, life / 3)
        self.failure: LeaseError | None = None
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harp-lease-keeper", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        self.scheduler.close()

    def renew_now(self) -> Lease:
        self.lease = self.scheduler.renew(self.lease.lease_id)
        self.renewals += 1
        return self.lease

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew_now()
            except LeaseError as exc:
                self.failure = exc
                log.warning("lease %s: %s", self.lease.lease_id, exc)
                return
            except (TransportError, HarpError) as exc:
                log.info("lease %s: renewal failed, will retry: %s", self.lease.lease_id, exc)

    def explain(self, error: HarpError) -> HarpError:
        """Turn a session's transport failure into the lease's own end, when that is the cause."""
        if self.failure is not None and isinstance(error, TransportError):
            return LeaseError(f"the session ended because {self.failure.message}")
        return error
