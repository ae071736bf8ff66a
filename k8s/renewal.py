"""Keeping prepared claims' leases alive, and their containers' tokens fresh.

The leases belong to the plugin's identity, so the plugin renews them, not the pods
(whose certificate is another identity, which the scheduler would refuse). Each renewal
returns fresh tokens, written into the request's lease file, which containers see through
their bind mount: a container that connects (or reconnects) at any time finds a token
that lives. One thread renews every prepared lease, each at a third of its lifetime or
its tokens' (the client's `LeaseKeeper` rule); the scheduler being away is retried, and a
lease the scheduler has ended is left for unprepare to clean up.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from harp.errors import HarpError, LeaseError

from .claimstore import ClaimStore

log = logging.getLogger("harp.k8s")


class Renewer:
    """Renews the leases of every claim in a `ClaimStore` until stopped."""

    def __init__(self, store: ClaimStore, scheduler: Any, lock: threading.Lock,
                 tick_s: float = 0.5) -> None:
        self.store = store
        self.scheduler = scheduler            # a harp.client.SchedulerClient
        self.lock = lock                      # the preparer's: files change under it only
        self.tick_s = tick_s
        self.renewals = 0
        self.ended: dict[str, str] = {}       # lease id -> why the scheduler ended it
        self._due: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="harp-dra-renewal", daemon=True)

    def start(self) -> "Renewer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15)

    def renew_due(self, now: float | None = None) -> None:
        """Renew every lease whose time has come (first seen: one interval from now)."""
        now = time.monotonic() if now is None else now
        live = set()
        for claim in self.store.all():
            if not claim.complete:
                continue
            for prepared in claim.requests:
                live.add(prepared.lease_id)
                due = self._due.setdefault(prepared.lease_id, now + prepared.interval_s)
                if prepared.lease_id in self.ended or due > now:
                    continue
                self._due[prepared.lease_id] = now + prepared.interval_s
                try:
                    lease = self.scheduler.renew(prepared.lease_id)
                except LeaseError as exc:
                    self.ended[prepared.lease_id] = exc.message
                    log.warning("lease %s of claim %s/%s: %s", prepared.lease_id,
                                claim.namespace, claim.name, exc.message)
                    continue
                except HarpError as exc:
                    log.info("lease %s: renewal failed, will retry: %s", prepared.lease_id, exc)
                    continue
                with self.lock:                    # not while the claim is being unprepared
                    if self.store.write_lease(claim.uid, prepared, lease):
                        self.renewals += 1
        for lease_id in set(self._due) - live:
            self._due.pop(lease_id, None)
            self.ended.pop(lease_id, None)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.renew_due()
            except Exception:                     # never let the thread die: log and go on
                log.exception("lease renewal pass failed")
