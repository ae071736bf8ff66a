"""Preparing and unpreparing claims: what the kubelet's two DRA calls do, without gRPC.

Prepare, per claim: read it from the API server (`resource.k8s.io/v1`), check it is the
claim the kubelet means (same UID) and allocated, turn its allocation and parameters
into one HARP lease per request (`claims.plan`), attach each lease through the
scheduler under the plugin's own identity, write each request's files and the claim's
CDI spec, and answer the CDI device ids. A claim already prepared is answered from its
state on disk (the kubelet repeats calls). Anything that fails fails that claim only,
with a message that says why, and what was attached for it is detached again.

Unprepare, per claim: detach its leases (an unknown or ended lease is already what we
want), remove its CDI spec and files. A claim the plugin does not know is done.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harp.errors import HarpError, LeaseError
from harp.lease import Lease

from . import cdi
from .claims import ClaimError, plan
from .claimstore import ClaimStore, PreparedClaim, PreparedRequest, StateError

log = logging.getLogger("harp.k8s")


@dataclass(frozen=True)
class ClaimRef:
    """A claim as the kubelet names it."""
    namespace: str
    uid: str
    name: str


@dataclass(frozen=True)
class PreparedDevice:
    """One allocated device in a prepare answer."""
    request: str
    pool: str
    device: str
    cdi_ids: tuple[str, ...]


@dataclass
class PrepareResult:
    devices: list[PreparedDevice] = field(default_factory=list)
    error: str = ""


def renew_interval(lease: Lease, minimum: float = 0.2) -> float:
    """A third of the shorter of the lease's and its tokens' lifetimes (as LeaseKeeper)."""
    lives = [t for t in (lease.ttl_s, lease.token_ttl_s) if t > 0]
    return max(minimum, min(lives) / 3) if lives else 20.0


_EXPECTED = (ClaimError, StateError, HarpError, OSError)


def _message(exc: Exception) -> str:
    """What the kubelet's error for a claim says: ours as they are, others with their type."""
    if isinstance(exc, HarpError):
        return exc.message
    if isinstance(exc, (ClaimError, StateError, OSError)):
        return str(exc)
    return f"internal error in the plugin: {type(exc).__name__}: {exc}"


def _api_failure(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return f"{status} {reason}" if status else str(reason)


class Preparer:
    """Prepares and unprepares claims for one node; calls are serialized."""

    def __init__(self, *, driver: str, store: ClaimStore, cdi_dir: Path, scheduler: Any,
                 resources: Any, credentials: tuple[bytes, bytes, bytes], node: str = "",
                 api_timeout_s: float = 10.0) -> None:
        self.driver = driver
        self.store = store
        self.cdi_dir = Path(cdi_dir)
        self.scheduler = scheduler            # a harp.client.SchedulerClient
        self.resources = resources            # a kubernetes.client.ResourceV1Api
        self.credentials = credentials        # the pod's ca, cert, key (PEM)
        self.node = node
        self.api_timeout_s = api_timeout_s
        self.lock = threading.Lock()

    # -- the API server -------------------------------------------------------------------

    def _read_claim(self, ref: ClaimRef) -> Any:
        from kubernetes.client.exceptions import ApiException
        try:
            claim = self.resources.read_namespaced_resource_claim(
                ref.name, ref.namespace, _request_timeout=self.api_timeout_s)
        except ApiException as exc:
            if exc.status == 404:
                raise ClaimError("the API server has no such claim") from None
            raise ClaimError(f"reading it from the API server failed: {_api_failure(exc)}") \
                from None
        except Exception as exc:             # urllib3 and socket errors, a bad answer
            raise ClaimError(f"reading it from the API server failed: {_api_failure(exc)}") \
                from None
        uid = claim.metadata.uid if claim.metadata is not None else None
        if uid != ref.uid:
            raise ClaimError(f"the API server's claim of that name has UID {uid}, not "
                             f"{ref.uid} (it was replaced)")
        return claim

    def _device_kinds(self) -> dict[tuple[str, str], str]:
        """(pool, device) -> the `kind` attribute, from the driver's ResourceSlices."""
        try:
            slices = self.resources.list_resource_slice(
                field_selector=f"spec.driver={self.driver}", _request_timeout=self.api_timeout_s)
        except Exception as exc:
            raise ClaimError(f"listing the driver's ResourceSlices failed: "
                             f"{_api_failure(exc)}") from None
        kinds = {}
        for item in slices.items or []:
            spec = item.spec
            if spec is None or spec.pool is None:
                continue
            for device in spec.devices or []:
                attribute = (device.attributes or {}).get("kind")
                if attribute is not None and attribute.string:
                    kinds[(spec.pool.name, device.name)] = attribute.string
        return kinds

    # -- prepare --------------------------------------------------------------------------

    def prepare(self, refs: list[ClaimRef]) -> dict[str, PrepareResult]:
        """One result per claim UID: its devices, or why it could not be prepared."""
        results: dict[str, PrepareResult] = {}
        kinds: dict[tuple[str, str], str] | None = None

        def device_kinds() -> dict[tuple[str, str], str]:
            nonlocal kinds
            if kinds is None:
                kinds = self._device_kinds()
            return kinds

        for ref in refs:
            where = f"claim {ref.namespace}/{ref.name} ({ref.uid})"
            try:
                with self.lock:
                    devices = self._prepare(ref, device_kinds)
                results[ref.uid] = PrepareResult(devices=devices)
                log.info("prepared %s: %d device(s)", where, len(devices))
            except Exception as exc:          # this claim fails; the others go on
                message = _message(exc)
                results[ref.uid] = PrepareResult(error=f"{where}: {message}")
                log.warning("could not prepare %s: %s", where, message,
                            exc_info=not isinstance(exc, _EXPECTED))
        return results

    def _answer(self, claim: PreparedClaim) -> list[PreparedDevice]:
        out = []
        for prepared in claim.requests:
            for i, (pool, device) in enumerate(prepared.devices):
                ids = (cdi.device_id(self.driver, claim.uid, prepared.request),) if i == 0 else ()
                out.append(PreparedDevice(prepared.request, pool, device, ids))
        return out

    def _write_spec(self, claim: PreparedClaim) -> None:
        spec = cdi.build_spec(self.driver, claim.uid,
                              {r.request: self.store.request_dir(claim.uid, r.request)
                               for r in claim.requests})
        cdi.write_spec(cdi.spec_path(self.cdi_dir, self.driver, claim.uid), spec)

    def _prepare(self, ref: ClaimRef,
                 device_kinds: Callable[[], dict[tuple[str, str], str]]) -> list[PreparedDevice]:
        existing = self.store.load(ref.uid)
        if existing is not None and existing.complete:
            self._write_spec(existing)            # in case /var/run/cdi was wiped (a reboot)
            return self._answer(existing)
        if existing is not None:                  # a prepare that died half way: start over
            self._release(existing)
        claim = self._read_claim(ref)
        plans = plan(claim, self.driver, device_kinds())
        state = PreparedClaim(uid=ref.uid, namespace=ref.namespace, name=ref.name)
        self.store.save(state)
        try:
            for p in plans:
                lease = self.scheduler.attach(
                    p.kind, count=p.count, memory=p.parameters.memory, share=p.parameters.share,
                    client_name=f"k8s {ref.namespace}/{ref.name} {p.request}"
                                + (f" on {self.node}" if self.node else ""))
                prepared = PreparedRequest(request=p.request, lease_id=lease.lease_id,
                                           devices=[list(d) for d in p.devices],
                                           uid=p.parameters.uid, gid=p.parameters.gid,
                                           interval_s=renew_interval(lease))
                state.requests.append(prepared)
                self.store.save(state)            # known before anything else can fail
                self.store.write_request(ref.uid, prepared, lease, self.credentials)
            self._write_spec(state)
            state.complete = True
            self.store.save(state)
        except BaseException:
            self._release(state, quiet=True)
            raise
        return self._answer(state)

    # -- unprepare ------------------------------------------------------------------------

    def unprepare(self, refs: list[ClaimRef]) -> dict[str, str]:
        """One entry per claim UID: "" when it is unprepared, else why not (retry later)."""
        results = {}
        for ref in refs:
            where = f"claim {ref.namespace}/{ref.name} ({ref.uid})"
            try:
                with self.lock:
                    state = self.store.load(ref.uid)
                    if state is not None:
                        self._release(state)
                        log.info("unprepared %s", where)
                results[ref.uid] = ""
            except Exception as exc:
                message = _message(exc)
                results[ref.uid] = f"{where}: {message}"
                log.warning("could not unprepare %s: %s", where, message,
                            exc_info=not isinstance(exc, _EXPECTED))
        return results

    def _release(self, state: PreparedClaim, quiet: bool = False) -> None:
        """Detach the claim's leases, then remove its CDI spec and files. A failed detach
        (the scheduler unreachable) keeps the state for the kubelet's retry, unless
        `quiet` (undoing a failed prepare: the lease then expires on its own)."""
        for prepared in state.requests:
            try:
                self.scheduler.detach(prepared.lease_id)
            except LeaseError:
                pass                              # unknown or already over
            except HarpError as exc:
                if not quiet:
                    raise
                log.warning("could not detach lease %s (it expires unrenewed): %s",
                            prepared.lease_id, exc)
        cdi.remove_spec(cdi.spec_path(self.cdi_dir, self.driver, state.uid))
        self.store.remove(state.uid)
