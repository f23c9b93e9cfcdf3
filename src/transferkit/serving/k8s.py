"""Kubernetes manifests for the serving image: `transferkit build RUN --k8s DIR` writes deployment.yaml,
service.yaml, hpa.yaml, networkpolicy.yaml and pdb.yaml into DIR, for `kubectl apply -f DIR`.

    write_manifests("k8s/", image="registry.example/transferkit-mnist:v1", model_tag="transferkit-mnist:abc",
                    options=K8sOptions(cpu="2", max_replicas=8))

Plain dicts and yaml.safe_dump: no cluster, Docker or Bento is needed, only the image and model tag. Why:

- Workers follow the CPU request. The server sizes its workers from the CPUs it may use, but a CPU limit is a
  CFS quota, not an affinity mask: on a 32-core node it would start 4 workers x 8 threads inside a quota of
  2 cores and be throttled. So TRANSFERKIT_WORKERS and TRANSFERKIT_THREADS come from the request, and limits
  equal requests: Guaranteed QoS (evicted last; the kubelet's static CPU manager gives whole cores).
- Probes: a startup probe on /readyz (200 only after the model has run once) holds the other two off while the
  model loads and warms up, so a slow start on a busy node is not killed. Then /readyz keeps a pod out of the
  Service while it cannot answer, and /livez restarts a hung one; liveness is lenient (30 s), as a restart drops
  in-flight requests and repeats the warm-up.
- Shutdown: the kubelet sends SIGTERM while the endpoint controllers and kube-proxy are still taking the pod out
  of the Service; a server that stopped accepting at once would refuse what is routed to it in that window.
  A preStop sleep keeps it serving until it is out of rotation; SIGTERM then lets in-flight requests finish
  within the image's drain bound (the drain's default and Dockerfile.j2's uvicorn bound).
  terminationGracePeriodSeconds covers the sleep, the drain and the workers' exit, so SIGKILL never cuts a drain
  short. The sleep runs the image's own Python: the base image need not ship `sleep`, and Kubernetes' own sleep
  action needs 1.30 or newer.
- Security: the restricted Pod Security Standard. runAsNonRoot with the numeric UID of the image's `bentoml`
  user (the kubelet cannot check a user name, and the model files are private to that user), no privilege
  escalation, no capabilities, the default seccomp profile, no service-account token (the server never calls
  the API). The root filesystem is read-only: BentoML's home (metrics files, client id), ONNX Runtime's cache
  go to an emptyDir at /tmp (checked with `docker run --read-only --tmpfs /tmp`); uploads stay in memory.
- No spec.replicas: the HPA owns the count, which a count in the Deployment would reset on every apply. The HPA
  scales on CPU utilisation, a share of the request; 70% leaves room for the warm-up of the pods it adds.
  Rollouts add a pod before removing one (maxUnavailable 0), so capacity never dips.
- The selector is name + instance only: a Deployment's selector is immutable, so it must not carry a version.
- An API key comes from a Secret, never as a literal in a manifest that may land in version control, mounted as
  a file (TRANSFERKIT_API_KEY_FILE): the kubelet updates a mounted Secret in place and the server re-reads it,
  so putting a second key in the Secret and later removing the first rotates keys without a restart
  (serving/keys.py). The command line refuses to write manifests without a key unless `--no-auth` says the open
  server is meant.
- A NetworkPolicy lets traffic in on the serving port only and none out: the server calls nothing (no API, no
  DNS), so a compromised worker cannot reach the rest of the cluster. A PodDisruptionBudget lets a node drain
  evict one pod at a time (maxUnavailable 1, which never blocks a drain even at one replica; with
  --k8s-min-replicas 2 or more a pod always serves).
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from transferkit.errors import ConfigError, TransferkitError
from transferkit.options import cli
from transferkit.serving.settings import API_KEY_FILE_ENV, PREFIX, ServingSettings, default_workers
from transferkit.version import __version__

PORT, PORT_NAME, SERVICE_PORT = 3000, "http", 80  # the image's EXPOSE (BentoML's default port)
IMAGE_UID = 1034  # BentoML's Dockerfile template creates the image's user `bentoml` with this UID and GID
IMAGE_PYTHON = "/app/.venv/bin/python"  # Dockerfile.j2's venv
PRESTOP_SLEEP_S = 5  # endpoint removal usually reaches kube-proxy and ingress controllers within 1-3 s
EXIT_MARGIN_S = 5  # after the drain: workers stop and the server exits (under 1 s measured with `docker stop`)
KEY_DIR = "/var/run/secrets/transferkit"  # the API key Secret, mounted read-only
# memory a further 32-224 px model takes in a worker (its runtime, weights and batch buffers; docs/serving.md)
EXTRA_MODEL_MI = 160
TMP_SIZE = "1Gi"  # BentoML's home and ONNX Runtime's cache; uploads are kept in memory (http_app.py)
FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "networkpolicy.yaml", "pdb.yaml")
_CPU = re.compile(r"(\d+(?:\.\d+)?)(m?)")
_MEMORY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_BYTES = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
MIN_MEMORY = 256 * 2**20  # below this not even one worker with a small model fits


@dataclass(frozen=True)
class K8sOptions:
    # CPU request and limit per pod, e.g. 2 or 500m; sets the server's workers
    cpu: str = field(default="2", metadata=cli(metavar="CPU"))
    # memory request and limit per pod, e.g. 2Gi (2 workers serving MobileNetV2 at 32 px use ~310 MiB)
    memory: str | None = field(default=None, metadata=cli(metavar="MEM", default_text="256Mi + 384Mi per worker"))
    min_replicas: int = field(default=1, metadata=cli(metavar="N"))  # autoscaler minimum
    max_replicas: int = field(default=4, metadata=cli(metavar="N"))  # autoscaler maximum
    # autoscaler target, percent of the CPU request
    target_cpu: int = field(default=70, metadata=cli(metavar="PERCENT"))
    # set TRANSFERKIT_API_KEY from this Secret's KEY (default key: api-key)
    api_key_secret: str | None = field(default=None, metadata=cli(metavar="NAME[:KEY]", default_text="none"))
    # require an API key (--k8s-api-key-secret); --no-auth: serve without one, anyone who reaches the Service may call
    auth: bool = field(default=True, metadata=cli("--auth"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpu", str(self.cpu))  # K8sOptions(cpu=2) as well as "2"
        problems = []
        cpu = _CPU.fullmatch(self.cpu)
        if not cpu or float(cpu.group(1)) <= 0:
            problems.append(f"--k8s-cpu {self.cpu!r} is not a positive CPU quantity (e.g. 2, 1.5 or 500m)")
        memory = _MEMORY.fullmatch(self.memory or "1Gi")
        if not memory:
            problems.append(f"--k8s-memory {self.memory!r} is not a memory quantity (e.g. 1Gi or 512Mi)")
        elif int(memory.group(1)) * _BYTES[memory.group(2)] < MIN_MEMORY:
            problems.append(f"--k8s-memory {self.memory} is below 256Mi, too little for the server")
        if self.min_replicas < 1:
            problems.append(f"--k8s-min-replicas must be >= 1, got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            problems.append(
                f"--k8s-min-replicas ({self.min_replicas}) is above --k8s-max-replicas "
                f"({self.max_replicas}): pass a minimum <= the maximum"
            )
        if not 1 <= self.target_cpu <= 100:
            problems.append(f"--k8s-target-cpu must be 1..100 (percent of the CPU request), got {self.target_cpu}")
        if self.api_key_secret is not None:
            name, _, key = self.api_key_secret.partition(":")
            if not _SECRET_NAME.fullmatch(name) or (key and not _SECRET_KEY.fullmatch(key)):
                problems.append(
                    f"--k8s-api-key-secret {self.api_key_secret!r} is not NAME or NAME:KEY "
                    "(NAME: lowercase letters, digits, '-' and '.')"
                )
        if not self.auth and self.api_key_secret:
            problems.append("--no-auth and --k8s-api-key-secret contradict each other; pass one")
        if problems:
            raise ConfigError("kubernetes options: " + "; ".join(problems))

    def require_auth(self) -> None:
        """The command line's rule: manifests for a server without a key only when asked for by name."""
        if self.auth and not self.api_key_secret:
            raise ConfigError(
                "kubernetes options: the server would answer anyone who reaches it; pass --k8s-api-key-secret NAME "
                "(a Secret holding the key: kubectl create secret generic NAME --from-literal=api-key=...) or "
                "--no-auth to serve without a key on purpose"
            )

    @property
    def whole_cpus(self) -> int:
        amount, milli = _CPU.fullmatch(self.cpu).groups()  # type: ignore[union-attr]
        return max(1, int(float(amount) / (1000 if milli else 1)))

    def workers(self, runtime: str) -> int:
        return default_workers(runtime, cpus=self.whole_cpus)

    def memory_for(self, runtime: str, models: int = 1) -> str:
        """Each worker holds every model: 384 Mi with the first, EXTRA_MODEL_MI for each further one."""
        per_worker = 384 + EXTRA_MODEL_MI * (models - 1)
        return self.memory or f"{256 + per_worker * self.workers(runtime)}Mi"


def drain_seconds() -> float:
    """The image's bound on a worker's stop after SIGTERM: the drain ($TRANSFERKIT_DRAIN_S, its default here as
    the manifests set no other) plus uvicorn's `--timeout-graceful-shutdown N` in Dockerfile.j2."""
    template = Path(__file__).with_name("Dockerfile.j2").read_text()
    match = re.search(r'"--timeout-graceful-shutdown",\s*"(\d+)"', template)
    if not match:
        raise TransferkitError("serving/Dockerfile.j2 sets no --timeout-graceful-shutdown; the grace period needs it")
    return ServingSettings().drain_s + int(match.group(1))


def resource_name(text: str) -> str:
    """A DNS-1035 label (what a Service's name must be): lowercase, [a-z0-9-], starts with a letter, <= 63."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = name if name[:1].isalpha() else f"tk-{name}"
    return name[:63].rstrip("-")


def manifests(
    image: str, model_tag: str, options: K8sOptions | None = None, runtime: str = "onnxruntime", name: str | None = None
) -> dict[str, dict]:
    """{file name: manifest} for the Deployment, the Service, the HorizontalPodAutoscaler, the NetworkPolicy and
    the PodDisruptionBudget."""
    options = options or K8sOptions()
    tags = model_tag.split(",")  # a Bento serving several models lists them all (build.py)
    name = resource_name(name or (tags[0].split(":")[0] if len(tags) == 1 else "transferkit-models"))
    selector = {"app.kubernetes.io/name": "transferkit", "app.kubernetes.io/instance": name}
    version = re.sub(r"[^A-Za-z0-9_.-]", "", tags[0].partition(":")[2])[:63].strip("-_.") if len(tags) == 1 else ""
    labels = {
        **selector,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": "transferkit",
        **({"app.kubernetes.io/version": version} if version else {}),
    }
    # the image's labels (`docker inspect`), so `kubectl describe` names the model a pod serves
    annotations = {"transferkit.model": model_tag, "transferkit.version": __version__, "transferkit.runtime": runtime}
    workers = options.workers(runtime)
    env = [
        {"name": PREFIX + "WORKERS", "value": str(workers)},
        {"name": PREFIX + "THREADS", "value": str(max(1, options.whole_cpus // workers))},
        # the writable places under a read-only root: BentoML's home and ONNX Runtime's cache
        {"name": "BENTOML_HOME", "value": "/tmp/bentoml"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
    ]
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    if options.api_key_secret:  # a file, not a variable: the kubelet updates a mounted Secret, and keys.py follows
        secret, _, key = options.api_key_secret.partition(":")
        env.append({"name": API_KEY_FILE_ENV, "value": f"{KEY_DIR}/api-key"})
        items = [{"key": key or "api-key", "path": "api-key"}]
        volumes.append({"name": "api-key", "secret": {"secretName": secret, "items": items, "defaultMode": 0o444}})
        mounts.append({"name": "api-key", "mountPath": KEY_DIR, "readOnly": True})
    resources = {"cpu": options.cpu, "memory": options.memory_for(runtime, models=len(tags))}

    def probe(path: str, delay: int, period: int, timeout: int, failures: int) -> dict:
        return {
            "httpGet": {"path": path, "port": PORT_NAME},
            "initialDelaySeconds": delay,
            "periodSeconds": period,
            "timeoutSeconds": timeout,
            "failureThreshold": failures,
        }

    container = {
        "name": "server",
        "image": image,
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": resources, "limits": dict(resources)},
        # startup: up to 2 min to load and warm up; readiness: out after 15 s unanswered; liveness: 30 s
        "startupProbe": probe("/readyz", delay=2, period=2, timeout=2, failures=60),
        "readinessProbe": probe("/readyz", delay=0, period=5, timeout=3, failures=3),
        "livenessProbe": probe("/livez", delay=0, period=10, timeout=5, failures=3),
        "lifecycle": {
            "preStop": {"exec": {"command": [IMAGE_PYTHON, "-c", f"import time; time.sleep({PRESTOP_SLEEP_S})"]}}
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    pod = {
        "metadata": {"labels": dict(labels), "annotations": dict(annotations)},  # copies: no YAML aliases
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + math.ceil(drain_seconds()) + EXIT_MARGIN_S,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": IMAGE_UID,
                "runAsGroup": IMAGE_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
        },
    }
    meta = {"name": name, "labels": labels}
    rollout = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**meta, "annotations": annotations},
        "spec": {"selector": {"matchLabels": selector}, "template": pod, "strategy": rollout},
    }
    port = {"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"type": "ClusterIP", "selector": selector, "ports": [port]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": options.target_cpu},
                    },
                }
            ],
        },
    }
    network_policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta,
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"port": PORT_NAME, "protocol": "TCP"}]}],
            "egress": [],  # nothing out: the server calls no service
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta,
        "spec": {"selector": {"matchLabels": selector}, "maxUnavailable": 1},
    }
    return dict(zip(FILES, (deployment, service, hpa, network_policy, pdb)))


def render(docs: dict[str, dict], model_tag: str, image_from_bento: bool = False) -> dict[str, str]:
    """The YAML text of each file: a header naming what it is for, and, for an image named after the Bento,
    a comment on the `image:` line saying what to put there."""
    texts = {}
    for filename, doc in docs.items():
        lines = yaml.safe_dump(doc, sort_keys=False).splitlines()
        if image_from_bento and doc["kind"] in ("Deployment", "InferenceService"):
            at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("image: "))
            indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
            lines[at:at] = [
                f"{indent}# The name `bentoml containerize` gives the image by default. Push the image",
                f"{indent}# to a registry this cluster pulls from and put its name here (or pass",
                f"{indent}# `--image REGISTRY/NAME:TAG` to transferkit build).",
            ]
        header = f"# {doc['kind']} for {model_tag}, written by `transferkit build --k8s` ({__version__})"
        texts[filename] = "\n".join([header, *lines]) + "\n"
    return texts


def check_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--k8s {out} is a file; pass a directory for the manifests")
    return out


def write_manifests(
    out_dir: str | Path,
    image: str,
    model_tag: str,
    options: K8sOptions | None = None,
    runtime: str = "onnxruntime",
    image_from_bento: bool = False,
    kserve: bool = False,
) -> list[Path]:
    """Write the five files into out_dir (and with `kserve`, kserve/inferenceservice.yaml: kserve.py) and
    return their paths. Each goes to a temporary file beside it, and all are renamed into place only once all
    are written: a failed write leaves the previous files whole."""
    docs = manifests(image, model_tag, options, runtime)
    if kserve:
        from transferkit.serving.kserve import FILE, inference_service

        docs[FILE] = inference_service(docs["deployment.yaml"], options or K8sOptions())
    texts = render(docs, model_tag, image_from_bento)
    out = check_out_dir(out_dir)
    staged: list[tuple[str, Path]] = []
    try:
        for filename, text in texts.items():
            target = out / filename
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            staged.append((tmp, target))
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the manifests from the rest of a team
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    return [target for _, target in staged]


def bento_model_tag(bento_path: str | Path) -> str:
    """The model tag a built Bento serves (its `model` argument in bento.yaml)."""
    info = yaml.safe_load((Path(bento_path) / "bento.yaml").read_text())
    tag = (info.get("args") or {}).get("model")
    if not tag:
        raise TransferkitError(f"{bento_path}/bento.yaml names no model argument; rebuild with transferkit build RUN")
    return tag
