"""The kubelet plugin's two gRPC services, each on its own unix socket.

- Registration (`pluginregistration.Registration`, the kubelet's plugin watcher API) on
  `REGISTRY_DIR/DRIVER-reg.sock`: the kubelet finds the socket, asks `GetInfo` (type
  `DRAPlugin`, the driver's name, the DRA socket's path, the service versions: `v1.DRAPlugin`)
  and says whether it registered the plugin (`NotifyRegistrationStatus`).
- DRA (`k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin`) on `PLUGIN_DIR/dra.sock`:
  `NodePrepareResources` and `NodeUnprepareResources`, answered by a `Preparer`, with an
  entry for every claim the kubelet named.

The DRA socket listens before the registration socket appears, and the registration
socket goes first at stop, so the kubelet never calls a plugin that is not there. Both
sockets are 0600 (the kubelet runs as root; nothing else on the node may prepare claims).
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from harp.errors import ArgumentError
from harp.proto import dra_v1_pb2 as dra
from harp.proto import dra_v1_pb2_grpc as dra_grpc
from harp.proto import pluginregistration_v1_pb2 as reg
from harp.proto import pluginregistration_v1_pb2_grpc as reg_grpc

from .preparer import ClaimRef, Preparer

log = logging.getLogger("harp.k8s")

#: What the kubelet's plugin watcher calls a DRA plugin (pluginregistration/v1 constants).
PLUGIN_TYPE = "DRAPlugin"
#: The DRA service version this plugin serves (dra/v1 types.go: DRAPluginService).
SERVICE_VERSIONS = ("v1.DRAPlugin",)
#: A unix socket path's limit on Linux (sun_path less its terminating NUL).
_MAX_SOCKET_PATH = 107


def _refs(claims: Any) -> list[ClaimRef]:
    return [ClaimRef(namespace=c.namespace, uid=c.uid, name=c.name) for c in claims]


class DraService(dra_grpc.DRAPluginServicer):
    """NodePrepareResources / NodeUnprepareResources over a `Preparer`."""

    def __init__(self, preparer: Preparer) -> None:
        self.preparer = preparer

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        results = self.preparer.prepare(_refs(request.claims))
        reply = dra.NodePrepareResourcesResponse()
        for uid, result in results.items():
            entry = reply.claims[uid]
            entry.error = result.error
            for d in result.devices:
                entry.devices.add(request_names=[d.request], pool_name=d.pool,
                                  device_name=d.device, cdi_device_ids=list(d.cdi_ids))
        return reply

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        reply = dra.NodeUnprepareResourcesResponse()
        for uid, error in self.preparer.unprepare(_refs(request.claims)).items():
            reply.claims[uid].error = error
        return reply


class RegistrationService(reg_grpc.RegistrationServicer):
    """What the kubelet's plugin watcher asks a plugin, and what it says back."""

    def __init__(self, driver: str, endpoint: str) -> None:
        self.driver = driver
        self.endpoint = endpoint
        self.registered = threading.Event()
        self.error = ""

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return reg.PluginInfo(type=PLUGIN_TYPE, name=self.driver, endpoint=self.endpoint,
                              supported_versions=list(SERVICE_VERSIONS))

    def NotifyRegistrationStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.error = request.error
        if request.plugin_registered:
            self.registered.set()
            log.info("the kubelet registered DRA plugin %s", self.driver)
        else:
            self.registered.clear()
            log.warning("the kubelet did not register DRA plugin %s: %s", self.driver,
                        request.error)
        return reg.RegistrationStatusResponse()


def _listen(path: Path, add: Any) -> grpc.Server:
    if len(str(path)) > _MAX_SOCKET_PATH:
        raise ArgumentError(f"socket path {path} is longer than {_MAX_SOCKET_PATH} bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)                # a previous instance's
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="harp-dra"))
    add(server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    os.chmod(path, 0o600)
    return server


class KubeletPlugin:
    """The registration and DRA sockets of one driver on one node."""

    def __init__(self, preparer: Preparer, *, registry_dir: Path, plugin_dir: Path) -> None:
        self.preparer = preparer
        self.driver = preparer.driver
        self.dra_socket = Path(plugin_dir) / "dra.sock"
        self.registration_socket = Path(registry_dir) / f"{self.driver}-reg.sock"
        self.registration = RegistrationService(self.driver, str(self.dra_socket))
        self._servers: list[tuple[grpc.Server, Path]] = []

    def start(self) -> "KubeletPlugin":
        dra_service = DraService(self.preparer)
        try:
            server = _listen(self.dra_socket, lambda s: dra_grpc.add_DRAPluginServicer_to_server(
                dra_service, s))
            self._servers.append((server, self.dra_socket))
            server = _listen(self.registration_socket, lambda s: reg_grpc.
                             add_RegistrationServicer_to_server(self.registration, s))
            self._servers.append((server, self.registration_socket))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Registration socket first (the kubelet deregisters), then the DRA socket."""
        for server, path in reversed(self._servers):
            path.unlink(missing_ok=True)
            server.stop(grace_s).wait(grace_s + 1)
        self._servers.clear()
