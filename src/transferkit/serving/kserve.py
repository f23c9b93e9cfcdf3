"""A KServe InferenceService for the serving image: `transferkit build RUN --k8s DIR --kserve` writes
DIR/kserve/inferenceservice.yaml beside the plain manifests (`kubectl apply -f DIR/kserve` on a cluster with
KServe, or `kubectl apply -f DIR` without it: one or the other, not both).

It is derived from the Deployment that k8s.py writes, so resources, the worker count, security, the preStop
pause, the grace period and the API key Secret stay one definition. What changes for KServe:

- A custom predictor: KServe runs our container as `kserve-container` and learns its protocol from the
  container's PROTOCOL variable (v2: the Open Inference Protocol, v2_routes.py), which routes KServe's
  clients, its InferenceGraph and its model-ready checks to /v2.
- Probes on the protocol's health routes (/v2/health/ready, /v2/health/live), answered by the same server.
- RawDeployment mode: a Deployment and an HPA on CPU as with the plain manifests, no Knative needed; the
  autoscaler's bounds and target come from the same --k8s-* options (minReplicas, maxReplicas, scaleTarget).
- The port is named http1, the name Knative accepts should the annotation be dropped for Serverless mode.
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "serving.kserve.io/v1beta1"
FILE = "kserve/inferenceservice.yaml"
CONTAINER_NAME = "kserve-container"  # the name KServe's webhook gives, and looks for in, a custom predictor
PROBE_PATHS = {"/readyz": "/v2/health/ready", "/livez": "/v2/health/live"}


def inference_service(deployment: dict, options: Any) -> dict:
    """The InferenceService that serves what `deployment` (k8s.manifests' Deployment) serves, over v2, with the
    autoscaler bounds of `options` (k8s.K8sOptions; k8s.py imports this module, not the other way round)."""
    pod = copy.deepcopy(deployment["spec"]["template"])
    container = pod["spec"]["containers"][0]
    port = container["ports"][0]["containerPort"]
    container["name"] = CONTAINER_NAME
    container["env"] = [{"name": "PROTOCOL", "value": "v2"}, *container["env"]]
    container["ports"] = [{"name": "http1", "containerPort": port, "protocol": "TCP"}]
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[key]["httpGet"]
        get["path"], get["port"] = PROBE_PATHS[get["path"]], port
    spec = pod["spec"]
    predictor = {
        "minReplicas": options.min_replicas,
        "maxReplicas": options.max_replicas,
        "scaleMetric": "cpu",
        "scaleTarget": options.target_cpu,
        "automountServiceAccountToken": spec["automountServiceAccountToken"],
        "terminationGracePeriodSeconds": spec["terminationGracePeriodSeconds"],
        "securityContext": spec["securityContext"],
        "containers": [container],
        "volumes": spec["volumes"],
    }
    metadata = copy.deepcopy(deployment["metadata"])
    metadata["annotations"]["serving.kserve.io/deploymentMode"] = "RawDeployment"
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor},
    }
