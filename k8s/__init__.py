"""HARP on Kubernetes: a Dynamic Resource Allocation (DRA) driver, `resource.k8s.io/v1`.

Two programs make the driver:

- the kubelet plugin (`plugin.py`, `harp kubernetes plugin`, one per node): registers on
  the kubelet's plugin registration socket and serves `NodePrepareResources` /
  `NodeUnprepareResources`; preparing a claim attaches a HARP lease for it through the
  scheduler and hands the pod's containers the lease and a client certificate through a
  CDI spec; unpreparing detaches it.
- the controller (`controller.py`, `harp kubernetes controller`, one per cluster):
  publishes the pool's devices as ResourceSlices, so that the Kubernetes scheduler can
  allocate them to claims, and keeps them in step with the pool.

The Kubernetes Python client is needed only here (`pip install 'harp[kubernetes]'`).
"""
from __future__ import annotations

#: The driver's name: DeviceClasses select `device.driver == "harp.dev"`, claims' opaque
#: configuration names it, and the CDI kind is `k8s.harp.dev/claim`.
DRIVER_NAME = "harp.dev"

__all__ = ["DRIVER_NAME"]
