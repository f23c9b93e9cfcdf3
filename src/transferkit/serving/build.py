"""`transferkit build RUN`: a Bento (service code + the run's stored model + locked requirements + Dockerfile).

    result = build_bento("runs/mnist")
    result.tag                    # transferkit-mnist:<version> in the Bento store ($BENTOML_HOME/bentos)
    result.dockerfile_path        # <bento>/env/docker/Dockerfile (python:3.11-slim base)
    result.containerize_command   # bentoml containerize transferkit-mnist:<version>   (needs Docker)

It runs `bentoml build` as a child process with the repo's bentofile.yaml, src/ as the build context, the
run's model tag as the Bento argument `model` (recorded in bento.yaml and restored by BentoML wherever the
Bento is served, the container included) and the model name as the Bento name. `bentoml build` locks the
Python requirements with uv against the package index, so it needs that index and can take a minute.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import transferkit
from transferkit.errors import TransferkitError
from transferkit.serving.server import resolve_served_model
from transferkit.serving.settings import MODEL_ENV

PACKAGE_DIR = Path(transferkit.__file__).resolve().parent  # .../src/transferkit
SOURCE_ROOT = PACKAGE_DIR.parent  # .../src: the build context
REPO_ROOT = SOURCE_ROOT.parent


@dataclass
class BuildResult:
    tag: str  # bento tag name:version
    bento_path: Path
    dockerfile_path: Path
    containerize_command: str


def _bentofile(path: Path | None) -> Path:
    path = Path(path) if path else REPO_ROOT / "bentofile.yaml"
    if not path.is_file():
        raise TransferkitError(f"{path} not found; `transferkit build` runs from a source checkout (git clone)")
    return path


def build_bento(run_dir: str | Path, bentofile: str | Path | None = None, timeout: float = 1800) -> BuildResult:
    """Build the Bento for an exported run. The run must have been exported with a servable format."""
    import bentoml

    model = resolve_served_model(run_dir, runtime="onnxruntime")  # the image serves with ONNX Runtime
    name = model.tag.split(":")[0]
    cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(_bentofile(bentofile)), "--name", name,
           "--arg", f"model={model.tag}", "--label", f"model={model.tag.replace(':', '_')}", "--output", "tag",
           str(SOURCE_ROOT)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != MODEL_ENV}  # the Bento argument is what counts
    try:
        done = subprocess.run(cmd, env=env, cwd=SOURCE_ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TransferkitError(f"bentoml build did not finish within {timeout:.0f}s") from None
    tag = next((line.split("__tag__:", 1)[1].strip() for line in done.stdout.splitlines() if "__tag__:" in line), None)
    if done.returncode != 0 or not tag:
        raise TransferkitError(f"bentoml build failed (exit {done.returncode}); its log is above. {done.stdout[-500:]}")
    bento_path = Path(bentoml.bentos.get(tag).path)
    dockerfile = bento_path / "env" / "docker" / "Dockerfile"
    if not dockerfile.is_file():
        raise TransferkitError(f"bentoml build made {tag} but {dockerfile} is missing")
    return BuildResult(
        tag=tag,
        bento_path=bento_path,
        dockerfile_path=dockerfile,
        containerize_command=f"bentoml containerize {tag}",
    )
