"""Which backbone families export to which format: one small architecture of each family, from torchvision and
from timm, trained for one short epoch at 224 px (random weights: whether a graph exports does not depend on
them) and exported to every CPU format through the gate. Prints a table and writes it into docs/backbones.md.

    python benchmarks/backbone_families.py [--arch timm/vit_tiny_patch16_224,resnet18,...] [--out docs/backbones.md]

Each architecture: `transferkit train --data digits --backbone ARCH --weights none --image-size 224 --limit 32
--epochs 1 --batch-size 16`, then `transferkit export RUN --format onnx,openvino,aoti --verify-images 32`. A
format's cell is its gate status, or the first line of why it failed. TensorRT needs a GPU and is not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import command_line, commit, write_section  # noqa: E402

PY = ROOT / ".venv" / "bin" / "python"
FORMATS = ("onnx", "openvino", "aoti")
ARCHS = (
    "mobilenet_v2,resnet18,efficientnet_b0,convnext_tiny,swin_t,vit_b_16,"
    "timm/mobilenetv2_100,timm/tf_efficientnet_lite0,timm/mobilenetv4_conv_small,timm/resnet18,timm/convnext_atto,"
    "timm/ghostnet_100,timm/vit_tiny_patch16_224,timm/mobilevit_xxs,timm/efficientformerv2_s0,timm/fastvit_t8,"
    "timm/levit_128s"
)
BEGIN, END = "<!-- backbone-families:begin -->", "<!-- backbone-families:end -->"


def one(arch: str, work: Path, env: dict) -> dict:
    run_dir = work / arch.replace("/", "-")
    result = {"arch": arch}
    start = time.perf_counter()
    train = subprocess.run(
        [
            str(PY),
            "-m",
            "transferkit",
            "train",
            "--data",
            "digits",
            "--backbone",
            arch,
            "--weights",
            "none",
            "--image-size",
            "224",
            "--limit",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--out",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if train.returncode:
        result["train"] = train.stderr.strip().splitlines()[-1][:160]
        return result
    result["train"] = "ok"
    export = subprocess.run(
        [str(PY), "-m", "transferkit", "export", str(run_dir), "--format", ",".join(FORMATS), "--verify-images", "32"],
        capture_output=True,
        text=True,
        env=env,
    )
    manifest = run_dir / "export" / "manifest.json"
    formats = json.loads(manifest.read_text())["formats"] if manifest.is_file() else {}
    for name in FORMATS:
        entry = formats.get(name)
        if entry is None:
            result[name] = (export.stderr.strip().splitlines() or ["no manifest"])[-1][:160]
        elif entry["status"] == "passed":
            result[name] = "passed"
        else:
            error = (entry.get("error") or "").splitlines()
            result[name] = f"{entry['status']}: {error[0][:140] if error else ''}"
    result["seconds"] = round(time.perf_counter() - start)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=ARCHS)
    parser.add_argument("--out", default=str(ROOT / "docs" / "backbones.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="families-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "HF_HUB_OFFLINE": "1"}
    rows = []
    for arch in args.arch.split(","):
        row = one(arch, work, env)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        BEGIN,
        "## Which families export (measured)",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Each architecture trained one short epoch at 224 px with "
        "random weights, then exported through the gate (32 test images; the gate compares every artifact with "
        "PyTorch). TensorRT needs a GPU and is not run here.",
        "",
        "| backbone | train | " + " | ".join(FORMATS) + " |",
        "|---|---|" + "---|" * len(FORMATS),
    ]
    for r in rows:
        cells = [r.get(f, "-") for f in FORMATS] if r["train"] == "ok" else ["-"] * len(FORMATS)
        train = r["train"] if r["train"] == "ok" else f"refused: {r['train']}"
        lines.append(f"| `{r['arch']}` | {train} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", END]
    print("\n".join(lines))
    write_section(args.out, "\n".join(lines), BEGIN, END, new_file="# Backbones\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
