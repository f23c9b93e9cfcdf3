"""`transferkit build RUN --k8s DIR`: the Deployment, Service, HorizontalPodAutoscaler, NetworkPolicy and
PodDisruptionBudget it writes.

The manifests are validated offline against Kubernetes' own OpenAPI schemas (the `kubernetes-validate` package
ships them as JSON schemas per Kubernetes version; strict mode refuses unknown fields), then checked for what a
schema cannot see: names that must point at each other, the grace period against the image's drain bound, the
user against the image's. The writer needs no Bento, so most tests call it directly; the CLI tests replace
`bentoml build` with a stand-in, but one (slow). The `docker` test runs the image the way the Deployment does.
"""

import io
import os
import re
import time

import httpx
import pytest
import yaml

from transferkit import cli
from transferkit.errors import ConfigError
from transferkit.serving import k8s
from transferkit.serving.k8s import K8sOptions, manifests, write_manifests
from transferkit.serving.settings import ServingSettings

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
from kubernetes_validate.utils import all_versions  # noqa: E402

MODEL = "transferkit-demo:abc123"
IMAGE = "registry.example/transferkit-demo:v1"


def docs(**options) -> dict[str, dict]:
    return manifests(IMAGE, MODEL, K8sOptions(**options))


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("version", [all_versions()[0], all_versions()[-1]])  # oldest and newest schemas shipped
def test_written_files_pass_the_kubernetes_schema(tmp_path, version):
    paths = write_manifests(tmp_path, IMAGE, MODEL, K8sOptions(api_key_secret="tk-key:token"), image_from_bento=True)
    assert sorted(p.name for p in paths) == [
        "deployment.yaml",
        "hpa.yaml",
        "networkpolicy.yaml",
        "pdb.yaml",
        "service.yaml",
    ]
    kinds = set()
    for path in paths:
        doc = yaml.safe_load(path.read_text())  # the file as kubectl reads it, comments and all
        assert kubernetes_validate.validate(doc, version, strict=True)
        kinds.add((doc["apiVersion"], doc["kind"]))
    assert kinds == {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
        ("policy/v1", "PodDisruptionBudget"),
    }


def test_the_network_policy_admits_the_serving_port_only_and_nothing_out_and_the_pdb_never_blocks_a_drain():
    written = docs(api_key_secret="tk-key")
    selector = written["deployment.yaml"]["spec"]["selector"]["matchLabels"]
    policy = written["networkpolicy.yaml"]["spec"]
    assert policy["podSelector"]["matchLabels"] == selector and policy["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["ingress"]
    port_name = container_of(written["deployment.yaml"])["ports"][0]["name"]
    assert rule == {"ports": [{"port": port_name, "protocol": "TCP"}]} and policy["egress"] == []
    pdb = written["pdb.yaml"]["spec"]
    assert pdb == {"selector": {"matchLabels": selector}, "maxUnavailable": 1}


def test_manifests_without_a_key_are_refused_unless_no_auth_is_said(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr("transferkit.serving.build.build_bento", fake_build(tmp_path, calls))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["build", "RUN", "--k8s", str(tmp_path / "k8s")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and calls == [] and not (tmp_path / "k8s").exists()
    assert "would answer anyone" in err and "--k8s-api-key-secret NAME" in err and "--no-auth" in err
    cli.main(["build", "RUN", "--k8s", str(tmp_path / "k8s"), "--no-auth"])
    assert "TRANSFERKIT_API_KEY_FILE" not in env_of(
        container_of(yaml.safe_load((tmp_path / "k8s" / "deployment.yaml").read_text()))
    )
    with pytest.raises(ConfigError, match="contradict"):
        K8sOptions(auth=False, api_key_secret="tk-key")


def test_the_schema_check_refuses_broken_manifests():
    """The validation above can fail: a misspelt field, a wrong type and a missing required field are caught."""
    for corrupt in (
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenesProbe={}),
        lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="18s"),
        lambda d: d["spec"].pop("selector"),
    ):
        deployment = docs()["deployment.yaml"]
        corrupt(deployment)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, all_versions()[-1], strict=True)


def test_names_point_at_each_other():
    d = docs()
    deployment, service, hpa = d["deployment.yaml"], d["service.yaml"], d["hpa.yaml"]
    container = container_of(deployment)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 3000}  # the image's EXPOSE
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
        assert container[probe]["httpGet"]["port"] in port_names
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]

    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector and selector.items() <= pod_labels.items()
    assert "app.kubernetes.io/version" not in selector  # a selector is immutable: it must not change per model
    assert pod_labels["app.kubernetes.io/version"] == "abc123"

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "transferkit-demo")
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "transferkit-demo"
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    pod_annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    for annotations in (deployment["metadata"]["annotations"], pod_annotations):
        assert annotations["transferkit.model"] == MODEL and annotations["transferkit.runtime"] == "onnxruntime"


def test_grace_period_outlasts_the_prestop_sleep_and_the_drain(tmp_path, monkeypatch):
    from tests.serving.test_build import render_dockerfile

    # the drain bound, read from the Dockerfile BentoML renders (not from the module that computes the period)
    dockerfile = render_dockerfile(tmp_path, monkeypatch)
    entrypoint = next(line for line in dockerfile.splitlines() if line.startswith("ENTRYPOINT"))
    graceful = int(re.search(r'"--timeout-graceful-shutdown", "(\d+)"', entrypoint).group(1))
    drain = ServingSettings().drain_s + graceful  # the workers' drain, then uvicorn's own bound
    assert k8s.drain_seconds() == drain == 10

    pod = docs()["deployment.yaml"]["spec"]["template"]["spec"]
    command = container_of(docs()["deployment.yaml"])["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/app/.venv/bin/python" and f'"{command[0]}"' in dockerfile  # the image's own Python
    sleep = float(re.fullmatch(r"import time; time.sleep\((\d+(?:\.\d+)?)\)", command[2]).group(1))
    assert sleep >= 3  # endpoint removal reaches kube-proxy in seconds
    assert pod["terminationGracePeriodSeconds"] > sleep + drain


def test_security_context_matches_the_image_user(tmp_path, monkeypatch):
    from bentoml._internal.container.generate import BENTO_UID_GID

    from tests.serving.test_build import render_dockerfile

    users = [
        line.split()[1] for line in render_dockerfile(tmp_path, monkeypatch).splitlines() if line.startswith("USER ")
    ]
    assert users[-1] == "bentoml"  # the user BentoML's template creates with BENTO_UID_GID
    deployment = docs()["deployment.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == BENTO_UID_GID
    container = container_of(deployment)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # under a read-only root every place the server writes is the /tmp volume
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["name"] == "tmp" and "emptyDir" in pod["volumes"][0]
    env = env_of(container)
    assert env["BENTOML_HOME"].startswith("/tmp/") and env["XDG_CACHE_HOME"].startswith("/tmp/")


@pytest.mark.parametrize(
    "cpu, workers, threads, memory",
    [("500m", 1, 1, "640Mi"), ("2", 2, 1, "1024Mi"), ("1.5", 1, 1, "640Mi"), ("8", 4, 2, "1792Mi")],
)
def test_workers_follow_the_cpu_request(cpu, workers, threads, memory):
    container = container_of(docs(cpu=cpu)["deployment.yaml"])
    env = env_of(container)
    assert (env["TRANSFERKIT_WORKERS"], env["TRANSFERKIT_THREADS"]) == (str(workers), str(threads))
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"cpu": cpu, "memory": memory}
    assert container_of(docs(cpu=cpu, memory="3Gi")["deployment.yaml"])["resources"]["limits"]["memory"] == "3Gi"


def test_a_bento_of_several_models_gets_memory_for_each_and_a_name_of_its_own():
    """Every worker holds every model: each further one adds EXTRA_MODEL_MI per worker to the pod's memory."""
    several = manifests(IMAGE, "transferkit-a:v1,transferkit-b:v2,transferkit-c:v3", K8sOptions(cpu="2"))
    deployment = several["deployment.yaml"]
    assert deployment["metadata"]["name"] == "transferkit-models"
    assert "app.kubernetes.io/version" not in deployment["metadata"]["labels"]
    memory = container_of(deployment)["resources"]["limits"]["memory"]
    assert memory == f"{256 + 2 * (384 + 2 * k8s.EXTRA_MODEL_MI)}Mi"


def test_api_key_comes_from_a_secret_mounted_as_a_file_only_when_asked():
    """A mounted Secret, not a variable: the kubelet updates the file in place, and the server follows it."""
    plain = container_of(docs()["deployment.yaml"])
    assert not {"TRANSFERKIT_API_KEY", "TRANSFERKIT_API_KEY_FILE"} & set(env_of(plain))
    for option, key in (("tk-key", "api-key"), ("tk-key:token", "token")):
        deployment = docs(api_key_secret=option)["deployment.yaml"]
        container, pod = container_of(deployment), deployment["spec"]["template"]["spec"]
        env = env_of(container)
        assert "TRANSFERKIT_API_KEY" not in env and env["TRANSFERKIT_API_KEY_FILE"] == f"{k8s.KEY_DIR}/api-key"
        (volume,) = [v for v in pod["volumes"] if v["name"] == "api-key"]
        assert volume["secret"] == {
            "secretName": "tk-key",
            "items": [{"key": key, "path": "api-key"}],
            "defaultMode": 0o444,
        }
        assert {"name": "api-key", "mountPath": k8s.KEY_DIR, "readOnly": True} in container["volumeMounts"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_replicas": 5, "max_replicas": 2}, r"--k8s-min-replicas \(5\) is above --k8s-max-replicas \(2\)"),
        ({"min_replicas": 0}, "--k8s-min-replicas must be >= 1"),
        ({"cpu": "two"}, "--k8s-cpu 'two' is not a positive CPU quantity"),
        ({"cpu": "0"}, "--k8s-cpu '0' is not a positive CPU quantity"),
        ({"memory": "100Mi"}, "--k8s-memory 100Mi is below 256Mi"),
        ({"memory": "1 GB"}, "--k8s-memory '1 GB' is not a memory quantity"),
        ({"target_cpu": 0}, "--k8s-target-cpu must be 1..100"),
        ({"api_key_secret": "Bad_Name"}, "--k8s-api-key-secret 'Bad_Name' is not NAME or NAME:KEY"),
    ],
)
def test_broken_options_are_refused_with_a_clear_message(options, message):
    with pytest.raises(ConfigError, match=message):
        K8sOptions(**options)


def test_writing_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "k8s"
    first = write_manifests(out, IMAGE, MODEL)
    before = {p.name: p.read_text() for p in first}
    assert "# The name `bentoml containerize` gives" not in before["deployment.yaml"]
    assert oct(first[0].stat().st_mode & 0o777) == "0o644"

    real_chmod, calls = os.chmod, []

    def failing_chmod(path, mode):  # the disk fills while the third file is written
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_chmod(path, mode)

    monkeypatch.setattr(os, "chmod", failing_chmod)
    with pytest.raises(OSError):
        write_manifests(out, "other:image", MODEL, image_from_bento=True)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # old files whole, no temporary left over

    write_manifests(out, "transferkit-demo:bento1", MODEL, image_from_bento=True)
    text = (out / "deployment.yaml").read_text()
    assert "# The name `bentoml containerize` gives the image by default" in text
    assert container_of(yaml.safe_load(text))["image"] == "transferkit-demo:bento1"
    assert sorted(p.name for p in out.iterdir()) == sorted(k8s.FILES)

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        write_manifests(tmp_path / "file", IMAGE, MODEL)


def fake_build(tmp_path, calls):
    from transferkit.serving.build import BuildResult

    bento = tmp_path / "bento"
    bento.mkdir(exist_ok=True)
    (bento / "bento.yaml").write_text(yaml.safe_dump({"args": {"model": MODEL}}))

    def build_bento(run, base_image=None, runtime="onnxruntime", image=None):
        calls.append({"run": run, "image": image})
        return BuildResult(
            tag="transferkit-demo:bento1",
            bento_path=bento,
            dockerfile_path=bento / "Dockerfile",
            containerize_command="bentoml containerize transferkit-demo:bento1",
            image=image,
        )

    return build_bento


def test_cli_writes_the_manifests_after_the_build(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr("transferkit.serving.build.build_bento", fake_build(tmp_path, calls))
    out = tmp_path / "k8s"
    cli.main(["build", "RUN", "--k8s", str(out), "--k8s-cpu", "4", "--k8s-api-key-secret", "tk-key"])
    assert calls == [{"run": ["RUN"], "image": None}]  # no --image: no Docker needed
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[-1] == str(tmp_path / "bento") and f"kubectl apply -f {out}" in stdout[-2]
    deployment = yaml.safe_load((out / "deployment.yaml").read_text())
    container = container_of(deployment)
    assert container["image"] == "transferkit-demo:bento1"  # the tag `bentoml containerize` gives the image
    assert env_of(container)["TRANSFERKIT_WORKERS"] == "4" and "TRANSFERKIT_API_KEY_FILE" in env_of(container)
    assert deployment["metadata"]["annotations"]["transferkit.model"] == MODEL  # read from the Bento

    cli.main(["build", "RUN", "--k8s", str(out), "--image", IMAGE, "--no-auth"])
    assert calls[-1] == {"run": ["RUN"], "image": IMAGE}
    text = (out / "deployment.yaml").read_text()
    assert container_of(yaml.safe_load(text))["image"] == IMAGE and "bentoml containerize" not in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--k8s-min-replicas", "5", "--k8s-max-replicas", "2"], r"--k8s-min-replicas \(5\) is above"),
        (["--k8s-cpu", "lots"], "--k8s-cpu 'lots'"),
    ],
)
def test_cli_refuses_bad_options_before_building(tmp_path, monkeypatch, capsys, argv, message):
    calls: list = []
    monkeypatch.setattr("transferkit.serving.build.build_bento", fake_build(tmp_path, calls))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["build", "RUN", "--k8s", str(tmp_path / "k8s"), *argv])
    assert exit_info.value.code == 2 and calls == [] and not (tmp_path / "k8s").exists()
    assert re.search("transferkit: error: kubernetes options: " + message, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        cli.main(["build", "RUN", "--k8s-cpu", "2"])  # a --k8s-* option without --k8s would be ignored
    assert "--k8s-cpu: only with --k8s DIR" in capsys.readouterr().err and calls == []


@pytest.mark.slow
def test_cli_build_writes_manifests_for_the_real_bento(exported, tmp_path):
    """`transferkit build RUN --k8s DIR` as a user runs it: a real `bentoml build`, no Docker."""
    from tests.helpers import run_cli

    run_dir, export = exported
    out = tmp_path / "k8s"
    stdout = run_cli(
        "build", str(run_dir), "--k8s", str(out), "--k8s-max-replicas", "6", "--no-auth"
    ).stdout.splitlines()
    bento_tag = next(line.split(": ", 1)[1] for line in stdout if line.startswith("bento: "))
    loaded = {p.name: yaml.safe_load(p.read_text()) for p in out.iterdir()}
    assert sorted(loaded) == ["deployment.yaml", "hpa.yaml", "networkpolicy.yaml", "pdb.yaml", "service.yaml"]
    for doc in loaded.values():
        assert kubernetes_validate.validate(doc, all_versions()[-1], strict=True)
    deployment = loaded["deployment.yaml"]
    assert container_of(deployment)["image"] == bento_tag  # what `bentoml containerize` would tag the image
    assert deployment["metadata"]["annotations"]["transferkit.model"] == export.bentoml_tag  # read from the Bento
    assert loaded["hpa.yaml"]["spec"]["maxReplicas"] == 6


def big_png() -> bytes:
    """A PNG of noise over Starlette's 1 MB in-memory limit for an uploaded file."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(buffer, "PNG")
    assert len(buffer.getvalue()) > 1024 * 1024
    return buffer.getvalue()


@pytest.mark.docker
@pytest.mark.slow
def test_image_runs_as_the_deployment_runs_it(exported, images):
    from tests.serving.test_docker_image import LOCAL_BASE_IMAGE, docker, engine_problem
    from transferkit.serving.build import build_bento

    problem = engine_problem()
    if problem:
        pytest.skip(problem)
    run_dir, export = exported
    tag = f"transferkit-test:k8s-{os.getpid()}"
    local = docker("image", "inspect", LOCAL_BASE_IMAGE, check=False).returncode == 0
    build_bento(run_dir, base_image=LOCAL_BASE_IMAGE if local else None, image=tag)
    try:
        run_as_deployed(tag, export.bentoml_tag, images["digit.png"])
    finally:
        docker("image", "rm", "-f", tag, check=False)


def run_as_deployed(tag: str, model_tag: str, png: bytes) -> None:
    """The pod's settings as `docker run` flags: read-only root with /tmp writable, the manifest's user, no
    capabilities, its env and resources. The server gets ready, answers (an upload big enough to be spooled to
    /tmp too), the preStop command runs in the image, and SIGTERM stops it within the grace period."""
    from tests.serving.test_docker_image import docker, wait_ready
    from transferkit.serving.processes import free_port

    deployment = manifests(tag, model_tag)["deployment.yaml"]
    pod, container = deployment["spec"]["template"]["spec"], container_of(deployment)
    user = pod["securityContext"]
    flags = [
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--user",
        f"{user['runAsUser']}:{user['runAsGroup']}",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--cpus",
        container["resources"]["limits"]["cpu"],
        "--memory",
        container["resources"]["limits"]["memory"].replace("Mi", "m"),
    ]
    for name, value in env_of(container).items():
        flags += ["-e", f"{name}={value}"]
    port, name = free_port(), f"tk-k8s-{os.getpid()}"
    try:
        docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", *flags, tag)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, name)
        assert httpx.get(url + "/livez").status_code == 200
        for data in (png, big_png()):  # the big one is spooled to /tmp while it is read
            answer = httpx.post(url + "/predict", files={"image": ("d.png", data, "image/png")}, timeout=60)
            assert answer.status_code == 200 and answer.json()["model"] == model_tag, answer.text
        start = time.monotonic()
        docker("exec", name, *container["lifecycle"]["preStop"]["exec"]["command"])
        assert time.monotonic() - start >= k8s.PRESTOP_SLEEP_S - 0.5
        grace = pod["terminationGracePeriodSeconds"]
        start = time.monotonic()
        docker("stop", "-t", str(grace), name, timeout=grace + 30)
        stopped = time.monotonic() - start
        logs = docker("logs", name, check=False).stderr
        exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert stopped < grace and exit_code == "0", logs[-2000:]
        # nothing the server or ONNX Runtime writes is refused (BENTOML_HOME and XDG_CACHE_HOME under /tmp)
        for refused in ("Read-only file system", "Permission denied", "Failed to persist"):
            assert refused not in logs, logs[-2000:]
    finally:
        docker("rm", "-f", name, check=False)
