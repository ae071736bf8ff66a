"""The Kubernetes API, through the Kubernetes Python client.

In a pod the client reads the service account's token and CA (in-cluster
configuration); elsewhere a kubeconfig file (`--kubeconfig`, else `$KUBECONFIG`).
"""
from __future__ import annotations

import os
from typing import Any

from harp.errors import ArgumentError


def resource_api(kubeconfig: str | None = None) -> Any:
    """A `kubernetes.client.ResourceV1Api` (resource.k8s.io/v1) for this process."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ArgumentError("the Kubernetes driver needs the Kubernetes Python client: "
                            "pip install 'harp[kubernetes]'") from None
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        if kubeconfig:
            api_client = config.new_client_from_config(config_file=kubeconfig)
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
    except (config.ConfigException, OSError, ValueError, TypeError) as exc:
        where = kubeconfig or "the pod's service account (in-cluster)"
        raise ArgumentError(f"no Kubernetes API configuration from {where}: {exc}") from None
    return client.ResourceV1Api(api_client)
