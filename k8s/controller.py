"""The controller: keeps the driver's ResourceSlices equal to the pool.

Each pass asks the scheduler for the pool (the listing behind `harp pool ls`), lists the
driver's ResourceSlices (`fieldSelector=spec.driver=DRIVER`: every slice of the driver is
the controller's; the plugin publishes none), and then creates the slices of new
servers, replaces those whose devices changed (with the pool's generation one higher,
so the Kubernetes scheduler drops what it knew of the old one), and deletes those of
servers that are gone, down or draining. A pass that fails (the scheduler or the API
server away) changes nothing and is tried again at the next interval.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from .slices import desired_slices

log = logging.getLogger("harp.k8s")


@dataclass
class PassReport:
    """What one pass did, by slice name."""
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {"created": self.created, "updated": self.updated, "deleted": self.deleted,
                "unchanged": self.unchanged}


def _content(api_client: Any, resource_slice: Any) -> Any:
    """What decides whether a slice must change: its spec less the pool's generation."""
    spec = api_client.sanitize_for_serialization(resource_slice.spec) or {}
    spec.get("pool", {}).pop("generation", None)
    return spec


class SliceController:
    """Publishes a pool's devices as one driver's ResourceSlices."""

    def __init__(self, resources: Any, scheduler: Any, driver: str,
                 api_timeout_s: float = 10.0) -> None:
        self.resources = resources            # a kubernetes.client.ResourceV1Api
        self.scheduler = scheduler            # a harp.client.SchedulerClient
        self.driver = driver
        self.api_timeout_s = api_timeout_s

    def reconcile(self) -> PassReport:
        """One pass; raises (HarpError, ApiException, ...) if the pool or the slices
        cannot be read, before anything is written."""
        wanted = desired_slices(self.driver, self.scheduler.pool())
        existing = {s.metadata.name: s for s in self.resources.list_resource_slice(
            field_selector=f"spec.driver={self.driver}",
            _request_timeout=self.api_timeout_s).items or []}
        report = PassReport()
        for name in sorted(set(existing) - set(wanted)):
            self.resources.delete_resource_slice(name, _request_timeout=self.api_timeout_s)
            report.deleted.append(name)
        for name, body in sorted(wanted.items()):
            old = existing.get(name)
            if old is None:
                body.spec.pool.generation = 1
                self.resources.create_resource_slice(body, _request_timeout=self.api_timeout_s)
                report.created.append(name)
            elif _content(self.resources.api_client, old) != \
                    _content(self.resources.api_client, body):
                body.spec.pool.generation = (old.spec.pool.generation or 0) + 1
                body.metadata.resource_version = old.metadata.resource_version
                self.resources.replace_resource_slice(name, body,
                                                      _request_timeout=self.api_timeout_s)
                report.updated.append(name)
            else:
                report.unchanged.append(name)
        if report.created or report.updated or report.deleted:
            log.info("ResourceSlices: %s", report.to_dict())
        return report

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Reconcile every `interval_s` until `stop` is set; failures are logged, retried."""
        while not stop.is_set():
            try:
                self.reconcile()
            except Exception as exc:          # the API server or the scheduler away
                log.warning("ResourceSlice pass failed, will retry: %s", exc)
            stop.wait(interval_s)
