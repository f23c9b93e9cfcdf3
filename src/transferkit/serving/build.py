"""`transferkit build RUN`: a Bento (service code + the run's stored model + locked requirements + Dockerfile),
and with `image=` the container image too.

    result = build_bento("runs/mnist", base_image="python:3.11-slim")
    result.tag                    # transferkit-mnist:<version> in the Bento store ($BENTOML_HOME/bentos)
    result.dockerfile_path        # <bento>/env/docker/Dockerfile (from serving/Dockerfile.j2)
    containerize(result.tag, "transferkit-mnist:latest")   # needs a Docker engine

The recipe is made here, from the installed package's own files, so it works from a wheel as from a checkout:
`bentofile()` is the bentofile as a dict (the repo's bentofile.yaml is the same recipe, kept equal by a test),
and Dockerfile.j2 (package data) extends BentoML's Dockerfile template to keep the image lean and production
ready. The build context is a temporary folder with only the serving modules, so neither the repo layout nor
site-packages matter. `bentoml build` runs as a child process and locks the Python requirements with uv against
the package index, so it needs that index and can take a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferkit.errors import TransferkitError
from transferkit.runtimes.resolve import resolve_served_model
from transferkit.serving.settings import MODEL_ENV
from transferkit.serving.sources import parse_sources, run_list
from transferkit.version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the installed transferkit package, not its face
TEMPLATE = PACKAGE_DIR / "serving" / "Dockerfile.j2"
TEMPLATE_IN_CONTEXT = "transferkit/serving/Dockerfile.j2"
DEFAULT_BASE_IMAGE = "python:3.11-slim"
MULTI_MODEL_BENTO = "transferkit-models"  # the Bento's name when it serves several models

# Only what serving imports: no training, data or export code, and so no torch.
SERVING_FILES = (
    "transferkit/__init__.py",
    "transferkit/artifact.py",
    "transferkit/errors.py",
    "transferkit/machine.py",
    "transferkit/manifest.py",
    "transferkit/options.py",
    "transferkit/predictions.py",
    "transferkit/traffic.py",
    "transferkit/shift.py",
    "transferkit/drift_reference.py",
    "transferkit/preprocess.py",
    "transferkit/utils.py",
    "transferkit/version.py",
    "transferkit/py.typed",
    "transferkit/runtimes/*.py",
    "transferkit/serving/*.py",
)


def bentoml_requirement() -> str:
    """The image's BentoML: transferkit's own pinned requirement, read from its installed metadata, so that
    pyproject.toml is the one place the pin is written (an image on another BentoML would serve differently)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("transferkit") or []
    except PackageNotFoundError:
        declared = []
    for requirement in declared:
        spec = requirement.split(";")[0].replace(" ", "")
        if re.fullmatch(r"bentoml==[\w.]+", spec):
            return spec
    raise TransferkitError("transferkit's metadata pins no bentoml version; reinstall it (pip install -e .)")


# uvloop and httptools: uvicorn's fast event loop and HTTP parser (serving/stack.py), and orjson for the v2
# protocol's JSON (serving/v2_tensors.py): in the image as in the venv
# The floors past known flaws, as in pyproject.toml (docs/security.md); starlette and python-multipart come with
# BentoML, named here because the serving code imports them
COMMON_PACKAGES = (
    "numpy>=1.26",
    "pillow>=10.3",
    "httpx>=0.27",
    "uvloop>=0.19",
    "httptools>=0.6",
    "orjson>=3.9.15",
    "starlette>=0.40",
    "python-multipart>=0.0.18",
    "pyarrow>=14.0.1",  # `--capture` writes Parquet (capture.py)
    "scipy>=1.11",  # the live drift score's two-sample tests (drift_monitor.py, shift.py)
)
# Per runtime, its Python packages only (`--runtime openvino` leaves onnxruntime out: serving imports an engine only
# when it loads an artifact). GPU serving (onnxruntime-gpu, tensorrt) needs a CUDA base image and is not offered
# here; the two onnxruntime packages share one module name and never go in one environment.
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime>=1.18",), "openvino": ("openvino>=2024.0",)}


@dataclass
class BuildResult:
    tag: str  # bento tag name:version
    bento_path: Path
    dockerfile_path: Path
    containerize_command: str
    image: str | None = None  # the container image, when one was built


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIME_PACKAGES:
        choices = ", ".join(sorted(RUNTIME_PACKAGES))
        raise TransferkitError(f"runtime {runtime!r} cannot be built into an image; choose from: {choices}")


def bentofile(runtime: str = "onnxruntime", base_image: str = DEFAULT_BASE_IMAGE) -> dict:
    """The bentofile for the serving Bento. The base image is always set, so BentoML renders its plain base
    template (no apt-get) under Dockerfile.j2."""
    check_runtime(runtime)
    return {
        "service": "transferkit.serving.service:TransferkitService",
        "description": "transferkit image classifier: one backbone, one head per label space, verified ONNX artifact",
        "labels": {"project": "transferkit"},
        "include": list(SERVING_FILES),
        "exclude": ["**/__pycache__"],
        "python": {"packages": [bentoml_requirement(), *RUNTIME_PACKAGES[runtime], *COMMON_PACKAGES]},
        "docker": {
            "base_image": base_image,
            "dockerfile_template": TEMPLATE_IN_CONTEXT,
            "env": {"TRANSFERKIT_RUNTIME": runtime},
        },
    }


def render_template(model_tag: str, runtime: str) -> str:
    """Dockerfile.j2 with the image labels filled in (BentoML renders the Jinja parts at containerize time)."""
    text = TEMPLATE.read_text()
    for key, value in (("MODEL_TAG", model_tag), ("TRANSFERKIT_VERSION", __version__), ("RUNTIME", runtime)):
        text = text.replace(f"@{key}@", value.replace('"', ""))
    return text


def stage_context(dest: Path, model_tag: str, runtime: str, base_image: str) -> Path:
    """A build context holding the serving modules, the filled-in template and the bentofile; returns the
    bentofile's path."""
    root = PACKAGE_DIR.parent
    for pattern in SERVING_FILES:
        for src in root.glob(pattern):
            target = dest / src.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    (dest / TEMPLATE_IN_CONTEXT).write_text(render_template(model_tag, runtime))
    path = dest / "bentofile.yaml"
    path.write_text(yaml.safe_dump(bentofile(runtime, base_image), sort_keys=False))
    return path


def build_bento(
    run_dir: str | Path | list[str | Path],
    base_image: str | None = None,
    runtime: str = "onnxruntime",
    image: str | None = None,
    timeout: float = 1800,
) -> BuildResult:
    """Build the Bento for an exported run, or several in one Bento (each a model, by its BentoML model name),
    and, with `image`, the container image. Each run must have been exported with a format the chosen runtime
    serves."""
    import bentoml

    base_image = base_image or DEFAULT_BASE_IMAGE
    check_runtime(runtime)
    if image:
        check_docker()  # before a minute of `bentoml build`, not after
    tags = [resolve_served_model(r, runtime=runtime).tag for r in run_list(run_dir)]
    if len(set(tags)) != len(tags):
        raise TransferkitError("the same exported model is listed twice; list each run once")
    names = [t.split(":")[0] for t in tags]
    if len(set(names)) != len(names):  # two exports of one run: versions of one model
        parse_sources(",".join(tags))  # refuses a version listed twice
    name = names[0] if len(tags) == 1 else MULTI_MODEL_BENTO
    models = ",".join(tags)  # the service's `model` argument: every listed version is bundled (service.py)
    env = {k: v for k, v in os.environ.items() if k != MODEL_ENV}  # the Bento argument is what counts
    with tempfile.TemporaryDirectory(prefix="transferkit-build-") as context:
        bentofile_path = stage_context(Path(context), models, runtime, base_image)
        cmd = [
            sys.executable,
            "-m",
            "bentoml",
            "build",
            "-f",
            str(bentofile_path),
            "--name",
            name,
            "--arg",
            f"model={models}",
            "--label",
            f"model={tags[0].replace(':', '_')}" if len(tags) == 1 else f"models={len(tags)}",
            "--output",
            "tag",
            context,
        ]
        try:
            done = subprocess.run(cmd, env=env, cwd=context, stdout=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TransferkitError(f"bentoml build did not finish within {timeout:.0f}s") from None
    tag = next((line.split("__tag__:", 1)[1].strip() for line in done.stdout.splitlines() if "__tag__:" in line), None)
    if done.returncode != 0 or not tag:
        raise TransferkitError(f"bentoml build failed (exit {done.returncode}); its log is above. {done.stdout[-500:]}")
    bento_path = Path(bentoml.bentos.get(tag).path)
    dockerfile = bento_path / "env" / "docker" / "Dockerfile"
    if not dockerfile.is_file():
        raise TransferkitError(f"bentoml build made {tag} but {dockerfile} is missing")
    result = BuildResult(
        tag=tag, bento_path=bento_path, dockerfile_path=dockerfile, containerize_command=f"bentoml containerize {tag}"
    )
    if image:
        containerize(tag, image, timeout=timeout)
        result.image = image
    return result


def check_docker() -> bool:
    """Raise one line naming the fix when no Docker engine answers; return whether `docker buildx` exists."""
    if shutil.which("docker") is None:
        raise TransferkitError("no `docker` command: install Docker (e.g. apt-get install docker.io) to build an image")
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        info = None
    if info is None or info.returncode != 0:
        raise TransferkitError(
            "no Docker engine answers (`docker info` failed): start it (`sudo dockerd &` or "
            "`systemctl start docker`) or set DOCKER_HOST, then re-run"
        )
    buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True, timeout=30)
    return buildx.returncode == 0


def containerize(tag: str, image: str, timeout: float = 1800) -> None:
    """`bentoml containerize TAG -t IMAGE`; with the legacy builder where `docker buildx` is missing."""
    env = dict(os.environ)
    if not check_docker():
        print("note: `docker buildx` is missing; building with the legacy builder (DOCKER_BUILDKIT=0)", flush=True)
        env["DOCKER_BUILDKIT"] = "0"
    cmd = [sys.executable, "-m", "bentoml", "containerize", tag, "-t", image, "--backend", "docker"]
    # BentoML copies the Bento to a temporary folder and then refuses to read a Dockerfile template outside the
    # working directory: so the temporary folder goes under a working directory of our own.
    with tempfile.TemporaryDirectory(prefix="transferkit-containerize-") as workdir:
        env["TMPDIR"] = workdir
        try:
            done = subprocess.run(cmd, env=env, cwd=workdir, timeout=timeout)
        except subprocess.TimeoutExpired:
            done = None
    if done is None:
        raise TransferkitError(f"bentoml containerize did not finish within {timeout:.0f}s") from None
    if done.returncode != 0:
        raise TransferkitError(f"bentoml containerize {tag} failed (exit {done.returncode}); its log is above")
