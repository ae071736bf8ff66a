"""`harp kubernetes plugin|controller`: HARP's Kubernetes DRA driver (harp.k8s).

`plugin` runs on every node where pods may use pool devices (a DaemonSet): the kubelet
plugin that prepares claims by attaching HARP leases. `controller` runs once per
cluster (a Deployment): it publishes the pool's devices as ResourceSlices.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from .common import add_scheduler_options, positive_float, say, scheduler_client, \
    wait_for_signal

DEFAULT_DRIVER = "harp.dev"
_DRIVER = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def driver_name(text: str) -> str:
    """A DRA driver name: a DNS subdomain of at most 63 characters."""
    if len(text) > 63 or not _DRIVER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"a driver name is a DNS subdomain of at most 63 "
                                         f"characters (like harp.dev), got {text!r}")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    plugin = sub.add_parser("plugin", help="the kubelet plugin of one node (a DaemonSet): "
                                           "prepares claims by attaching HARP leases")
    controller = sub.add_parser("controller", help="publishes the pool's devices as "
                                                   "ResourceSlices (one per cluster)")
    for q in (plugin, controller):
        q.add_argument("--driver", type=driver_name, default=DEFAULT_DRIVER,
                       help=f"the DRA driver's name (default {DEFAULT_DRIVER})")
        q.add_argument("--kubeconfig", default=None,
                       help="kubeconfig file (default: $KUBECONFIG, else the pod's service "
                            "account)")
        add_scheduler_options(q)
    plugin.add_argument("--node-name", default=None,
                        help="this node's name, for lease names (default: $NODE_NAME, else "
                             "the host name)")
    plugin.add_argument("--registry-dir", type=Path, default=Path("/var/lib/kubelet/"
                                                                  "plugins_registry"),
                        help="the kubelet's plugin registration directory (default "
                             "/var/lib/kubelet/plugins_registry)")
    plugin.add_argument("--plugin-dir", type=Path, default=None,
                        help="the DRA socket and prepared claims (default "
                             "/var/lib/kubelet/plugins/DRIVER)")
    plugin.add_argument("--cdi-dir", type=Path, default=Path("/var/run/cdi"),
                        help="where the container runtime reads CDI specs (default "
                             "/var/run/cdi)")
    plugin.add_argument("--pod-cert-dir", type=Path, required=True,
                        help="the credentials handed to pods: ca.pem and NAME.pem/NAME.key "
                             "(a client certificate that is not the plugin's own)")
    plugin.add_argument("--pod-cert-name", default="pod",
                        help="the pods' certificate name in --pod-cert-dir (default: pod)")
    controller.add_argument("--interval", type=positive_float, default=10.0,
                            help="seconds between passes (default 10)")
    controller.add_argument("--once", action="store_true",
                            help="one pass, print what it did, and exit")
    controller.add_argument("--json", action="store_true", help="with --once: as JSON")


def pod_credentials(args: argparse.Namespace) -> tuple[bytes, bytes, bytes]:
    """The pods' CA, certificate and key, checked: a client certificate, and another
    identity than the plugin's (which owns every lease the plugin attaches)."""
    from harp.errors import ArgumentError
    from harp.security import identity_from_pem, tls_files
    pods = tls_files("client", args.pod_cert_name, directory=args.pod_cert_dir)
    ca, cert, key = pods.load()
    who = identity_from_pem(cert)
    if who.role != "client":
        raise ArgumentError(f"{pods.cert} is a {who.role} certificate ({who.name}); pods get a "
                            "client certificate: harp certs issue client NAME")
    own = tls_files("client", args.cert_name, directory=args.cert_dir).cert
    if own.exists() and identity_from_pem(own.read_bytes()).name == who.name:
        raise ArgumentError(f"the pods' certificate {pods.cert} is the plugin's own identity "
                            f"({who.name}): a pod could then renew or detach every lease of "
                            "this node; issue pods a certificate of their own")
    return ca, cert, key


def _plugin(args: argparse.Namespace) -> int:
    from harp.k8s.claimstore import ClaimStore
    from harp.k8s.plugin import KubeletPlugin
    from harp.k8s.preparer import Preparer
    from harp.k8s.renewal import Renewer
    plugin_dir = args.plugin_dir or Path("/var/lib/kubelet/plugins") / args.driver
    credentials = pod_credentials(args)
    resources = _resource_api(args)
    scheduler = scheduler_client(args)
    store = ClaimStore(plugin_dir)
    preparer = Preparer(driver=args.driver, store=store, cdi_dir=args.cdi_dir,
                        scheduler=scheduler, resources=resources, credentials=credentials,
                        node=args.node_name or os.environ.get("NODE_NAME") or
                        socket.gethostname())
    plugin = KubeletPlugin(preparer, registry_dir=args.registry_dir, plugin_dir=plugin_dir)
    plugin.start()
    renewer = Renewer(store, scheduler, preparer.lock).start()
    say(f"HARP DRA plugin {args.driver} listening on unix:{plugin.dra_socket} (registration "
        f"unix:{plugin.registration_socket}; {len(store.all())} claim(s) prepared)")
    try:
        wait_for_signal()
    finally:
        plugin.stop()
        renewer.stop()
        scheduler.close()
    return 0


def _controller(args: argparse.Namespace) -> int:
    from harp.k8s.controller import SliceController
    from harp.output import emit_json
    resources = _resource_api(args)
    with scheduler_client(args) as scheduler:
        controller = SliceController(resources, scheduler, args.driver)
        if args.once:
            try:
                report = controller.reconcile()
            except Exception as exc:
                from harp.errors import HarpError
                if isinstance(exc, HarpError):
                    raise
                print(f"harp kubernetes: error: the Kubernetes API: {_why(exc)}",
                      file=sys.stderr)
                return 1
            if args.json:
                emit_json(report.to_dict())
            else:
                for what, names in report.to_dict().items():
                    say(f"{what}: {', '.join(names) or '-'}")
            return 0
        stop = threading.Event()
        loop = threading.Thread(target=controller.run, args=(args.interval, stop),
                                name="harp-dra-controller", daemon=True)
        loop.start()
        say(f"HARP DRA controller publishing the pool as {args.driver} ResourceSlices every "
            f"{args.interval:g} s")
        try:
            wait_for_signal()
        finally:
            stop.set()
            loop.join(30)
    return 0


def _why(exc: Any) -> str:
    status = getattr(exc, "status", None)
    return f"{status} {getattr(exc, 'reason', '')}".strip() if status else str(exc)


def _resource_api(args: argparse.Namespace) -> Any:
    from harp.k8s.apiclient import resource_api
    resources = resource_api(args.kubeconfig)
    if not args.verbose:      # urllib3 logs each retry; a failure is said once, in our words
        import logging        # (a filter: the client's every Configuration resets the level)
        logging.getLogger("urllib3.connectionpool").addFilter(
            lambda record: record.levelno >= logging.ERROR)
    return resources


def run(args: argparse.Namespace) -> int:
    return _plugin(args) if args.action == "plugin" else _controller(args)
