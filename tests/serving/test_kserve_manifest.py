"""`transferkit build RUN --k8s DIR --kserve`: the KServe InferenceService beside the plain manifests, checked
offline against KServe's own API models (in KServe's client venv) and, for the pod it runs, against
Kubernetes' schemas; then for what a schema cannot see: the protocol, the probes on routes the server answers,
and that it serves what the Deployment serves."""

import subprocess
from pathlib import Path

import pytest
import yaml

from transferkit.serving import kserve, v2_routes
from transferkit.serving.k8s import K8sOptions, manifests, write_manifests

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
from kubernetes_validate.utils import all_versions  # noqa: E402

MODEL = "transferkit-demo:abc123"
IMAGE = "registry.example/transferkit-demo:v1"
KSERVE_PYTHON = Path(__file__).parents[2] / ".venv-kserve" / "bin" / "python"
SCHEMA_CHECK = Path(__file__).with_name("clients") / "kserve_schema.py"


def _written(tmp_path, **options) -> dict:
    paths = write_manifests(tmp_path, IMAGE, MODEL, K8sOptions(**options), kserve=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in paths) == [
        "deployment.yaml",
        "hpa.yaml",
        "kserve/inferenceservice.yaml",
        "networkpolicy.yaml",
        "pdb.yaml",
        "service.yaml",
    ]
    return yaml.safe_load((tmp_path / kserve.FILE).read_text())


def _schema_check(path: Path) -> subprocess.CompletedProcess:
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: `make setup` builds KServe's client venv (make clients)")
    return subprocess.run(
        [str(KSERVE_PYTHON), str(SCHEMA_CHECK), str(path)], capture_output=True, text=True, timeout=120
    )


def test_the_inference_service_passes_kserves_api_models(tmp_path):
    _written(tmp_path, api_key_secret="tk-key:token")
    proc = _schema_check(tmp_path / kserve.FILE)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-2000:]


def test_the_schema_check_refuses_a_broken_inference_service(tmp_path):
    doc = _written(tmp_path)
    doc["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}  # misspelt
    doc["spec"]["predictor"]["minReplicas"] = "one"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    proc = _schema_check(broken)
    assert proc.returncode == 1
    assert "readinesProbe: not a field of V1Container" in proc.stdout and "minReplicas: expected int" in proc.stdout


@pytest.mark.parametrize("version", [all_versions()[0], all_versions()[-1]])
def test_the_predictors_pod_passes_the_kubernetes_schema(tmp_path, version):
    predictor = _written(tmp_path)["spec"]["predictor"]
    pod_fields = (
        "containers",
        "volumes",
        "securityContext",
        "automountServiceAccountToken",
        "terminationGracePeriodSeconds",
    )
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {k: predictor[k] for k in pod_fields}}
    assert kubernetes_validate.validate(pod, version, strict=True)


def test_a_custom_predictor_speaking_v2_with_probes_on_the_servers_v2_routes(tmp_path):
    isvc = _written(tmp_path, min_replicas=2, max_replicas=6, target_cpu=60)
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container" and container["image"] == IMAGE
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2"  # how KServe learns a custom predictor's protocol
    served = {route.path for route in v2_routes.routes()}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in served
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    assert (predictor["minReplicas"], predictor["maxReplicas"], predictor["scaleTarget"]) == (2, 6, 60)
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    deployment = manifests(IMAGE, MODEL, K8sOptions(min_replicas=2, max_replicas=6, target_cpu=60))["deployment.yaml"]
    plain = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == plain["resources"] and container["lifecycle"] == plain["lifecycle"]
    assert {e["name"] for e in plain["env"]} == set(env) - {"PROTOCOL"}
    assert (
        predictor["terminationGracePeriodSeconds"]
        == deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_cli_refuses_kserve_without_k8s(capsys):
    from transferkit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["build", "RUN", "--kserve"])
    assert exit_info.value.code == 2 and "--kserve: only with --k8s DIR" in capsys.readouterr().err
