"""`transferkit score` on one machine against the machine's bound and a plain PyTorch DataLoader loop, the Ray
engine on the same machine, and memory at 10k and 100k inputs. Writes docs/score.md.

    python benchmarks/score.py [--small-run runs/demo] [--photo-run runs/export-bench/fashion-224px-seed0]
        [--images 10000] [--workdir runs/score-bench]

Images (made once in `--workdir`): at 32 px, the first `--images` Fashion-MNIST and MNIST test images as 28x28
PNG files; at 224 px, `--images` JPEG crops (256 to 427 px square, quality 90, random positions, seeded) of
scikit-learn's two sample photos, real photo content at photo sizes. Per size, in one process and on an idle
machine:
- local engine: `transferkit.score(run, [folder], out.parquet)` with its defaults (the run's `auto` artifact);
- bound: cores / (decode + inference per image), decode as the engine does it and inference at batch 64 on one
  runtime thread, each measured alone;
- PyTorch loop: what timm's inference script does, a torch DataLoader (one worker process per core) that opens
  each file with PIL and resizes it to the same input, then the run's model in eager PyTorch, batch 64;
- Ray engine: `transferkit score --engine ray` as a fresh process that starts a local Ray on 127.0.0.1 (one
  actor per core), its wall time from the command's start (Ray's start-up included) and without it (the
  summary's own time, from the first listing row to the committed folder).
Memory: peak RSS of `transferkit score` as a fresh process over a list of 10k paths and of 100k (the 10k listed
ten times), 32 px.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from provenance import command_line, commit, write_report  # noqa: E402

from transferkit.machine import Machine, load_average  # noqa: E402

BATCH = 64


def small_images(folder: Path, n: int) -> Path:
    from PIL import Image

    from transferkit.data import load_dataset
    from transferkit.preprocess import Preprocessing

    if len(list(folder.glob("*/*.png"))) >= n:
        return folder
    pre = Preprocessing(image_size=28)
    per = (n + 1) // 2
    for name in ("fashion-mnist", "mnist"):
        split = load_dataset(name, pre, limit=per).test
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(split.images[:per]):
            Image.fromarray(pixels[..., 0], mode="L").save(folder / name / f"{i:05d}.png")
    return folder


def photo_images(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if len(list(folder.glob("*/*.jpg"))) >= n:
        return folder
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for i in range(n):
        photo = photos[i % 2]
        side = int(rng.integers(256, min(photo.size) + 1))
        x, y = (int(rng.integers(0, d - side + 1)) for d in photo.size)
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + side, y + side)).save(sub / f"{i:05d}.jpg", quality=90)
    return folder


def files_of(folder: Path) -> list[str]:
    from transferkit.scoring.sources import open_sources

    return [item.path for item in open_sources([str(folder)], {})[0].items()]


def local_engine(run: Path, folder: Path, out: Path) -> tuple[float, str]:
    from transferkit.scoring.job import score

    out.unlink(missing_ok=True)
    summary = score(run, [str(folder)], out)
    assert not summary.errors, summary.errors
    return summary.images_per_second, summary.artifact


def ray_engine(run: Path, folder: Path, out: Path, artifact: str) -> tuple[float, float]:
    """(img/s over the whole command, img/s over the job once Ray is up), same artifact as the local row."""
    import re
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferkit",
            "score",
            str(run),
            "--input",
            str(folder),
            "--out",
            str(out),
            "--engine",
            "ray",
            "--runtime",
            artifact,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    found = re.search(r"scored ([\d,]+) images with \S+ in ([\d.]+) s .*Ray start-up ([\d.]+) s", done.stdout)
    if not found:
        raise RuntimeError(f"no summary in the ray engine's output:\n{done.stdout}\n{done.stderr[-2000:]}")
    images, seconds, startup = int(found.group(1).replace(",", "")), float(found.group(2)), float(found.group(3))
    return images / wall, images / (seconds - startup)


def bound(run: Path, artifact: str, files: list[str], cores: int) -> tuple[float, float, float]:
    """(bound img/s, decode ms per image, inference ms per image at batch 64 on one thread)."""
    import numpy as np

    from transferkit.machine import median_seconds
    from transferkit.scoring.engine import Scorer

    scorer = Scorer(run, artifact, threads=1)
    sample = files[:500]
    start = time.perf_counter()
    pixels = [scorer.pixels(p) for p in sample]
    decode = (time.perf_counter() - start) / len(sample)
    batch = np.stack((pixels * (BATCH // len(pixels) + 1))[:BATCH])
    normalized = scorer.pre.normalize_numpy(batch)
    infer = median_seconds(lambda: scorer.runtime.run(normalized), 10, warmup=3) / BATCH
    return cores / (decode + infer), decode * 1000, infer * 1000


def torch_loop(run: Path, files: list[str], cores: int) -> float:
    """A DataLoader over the files (PIL open, RGB, resize, to tensor, normalize) into the eager model."""
    import torch
    from PIL import Image

    from transferkit.runs import load_run_model

    model, loaded = load_run_model(run)
    model.eval()
    pre = loaded.preprocessing
    size = pre.image_size
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            with Image.open(files[i]) as im:
                im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
            return (x.permute(2, 0, 1).float() / 255 - mean) / std

    torch.set_num_threads(cores)
    loader = torch.utils.data.DataLoader(Files(), batch_size=BATCH, num_workers=cores)
    start = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            model(x)
    return len(files) / (time.perf_counter() - start)


def peak_rss_mb(run: Path, list_file: Path, out: Path) -> tuple[float, float]:
    """(peak RSS in MB of the command's own process, its img/s)."""
    import re

    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferkit", "score", str(run), "--input", str(list_file), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"transferkit score over {list_file} failed ({status})")
    rate = re.search(r"\(([\d,]+) img/s", stdout)
    return usage.ru_maxrss / 1024, float(rate.group(1).replace(",", "")) if rate else 0.0  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-run", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--photo-run", default=str(ROOT / "runs" / "export-bench" / "fashion-224px-seed0"))
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "score-bench"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "score.md"))
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    machine = Machine.this()
    rows = []
    for size, run, folder in (
        (32, Path(args.small_run), small_images(work / "small", args.images)),
        (224, Path(args.photo_run), photo_images(work / "photos", args.images)),
    ):
        files = files_of(folder)
        load = load_average()
        local, artifact = local_engine(run, folder, work / f"preds-{size}.parquet")
        top, decode_ms, infer_ms = bound(run, artifact, files, cores)
        plain = torch_loop(run, files, cores)
        ray_wall, ray_job = ray_engine(run, folder, work / f"preds-{size}-ray.parquet", artifact)
        rows.append((size, len(files), artifact, local, top, decode_ms, infer_ms, plain, ray_wall, ray_job, load))
        print(
            f"{size} px: local {local:,.0f} img/s ({artifact}); bound {top:,.0f}; torch loop {plain:,.0f}; "
            f"ray {ray_wall:,.0f} ({ray_job:,.0f} once up)",
            flush=True,
        )
    small = files_of(work / "small")
    (work / "10k.txt").write_text("\n".join(small) + "\n")
    (work / "100k.txt").write_text("\n".join(small * 10) + "\n")
    measured = {
        n: peak_rss_mb(Path(args.small_run), work / f"{n}.txt", work / f"rss-{n}.parquet") for n in ("10k", "100k")
    }
    rss = {n: m[0] for n, m in measured.items()}
    print(f"peak RSS: 10k {rss['10k']:.0f} MB, 100k {rss['100k']:.0f} MB", flush=True)
    # at 32 px, 10k images take seconds: Ray's fixed start-up decides its row; 100k inputs show the rate it keeps
    ray_100k = ray_engine(Path(args.small_run), work / "100k.txt", work / "preds-100k-ray.parquet", rows[0][2])
    scale = (measured["100k"][1], *ray_100k)
    print(f"100k inputs, 32 px: local {scale[0]:,.0f} img/s, ray {scale[1]:,.0f} ({scale[2]:,.0f} once up)", flush=True)
    write_report(args.out, report(rows, rss, scale, machine, cores))


def report(rows: list[tuple], rss: dict[str, float], scale: tuple, machine: Machine, cores: int) -> list[str]:
    command = command_line()
    lines = [
        "# Bulk scoring: `transferkit score`, local engine and Ray, on one machine",
        "",
        f"Command: `{command.strip()}` at commit {commit()}. Machine: {machine.describe()}; {cores} cores.",
        "",
        "Local engine: `transferkit score RUN --input FOLDER --out preds.parquet` with its defaults. Bound: cores / "
        "(decode + inference per image), each measured alone, inference at batch 64 on one thread. PyTorch loop: a "
        "torch DataLoader (one worker process per core, PIL open + RGB + bilinear resize + normalize) into the run's "
        "eager model at batch 64, as timm's inference script scores a folder. Ray: `transferkit score --engine ray` "
        "as a fresh process starting a local Ray (one actor per core, the local row's artifact); whole command, and "
        "the job once Ray is up. One after another, on an otherwise idle machine.",
        "",
        "| input | images | artifact | local img/s | bound img/s | vs bound | decode ms | infer ms (1 thread) | "
        "PyTorch loop img/s | local vs PyTorch | Ray img/s (whole command) | Ray vs local | Ray once up | "
        "load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, n, artifact, local, top, decode_ms, infer_ms, plain, ray_wall, ray_job, load in rows:
        lines.append(
            f"| {size} px | {n:,} | {artifact} | {local:,.0f} | {top:,.0f} | {local / top:.2f} | "
            f"{decode_ms:.2f} | {infer_ms:.2f} | {plain:,.0f} | {local / plain:.2f}x | {ray_wall:,.0f} | "
            f"{ray_wall / local:.2f}x | {ray_job:,.0f} ({ray_job / local:.2f}x) | {load} |"
        )
    lines += [
        "",
        f"Peak RSS of `transferkit score` (32 px run, a fresh process): {rss['10k']:.0f} MB at 10k inputs, "
        f"{rss['100k']:.0f} MB at 100k (the 10k listed ten times): {rss['100k'] / rss['10k']:.2f}x.",
        "",
        f"100k inputs at 32 px (the same list): local {scale[0]:,.0f} img/s, Ray {scale[1]:,.0f} img/s whole "
        f"command ({scale[1] / scale[0]:.2f}x local), {scale[2]:,.0f} once up ({scale[2] / scale[0]:.2f}x).",
        "",
        "Goals: local >= 0.85x the bound and >= 2x the PyTorch loop; Ray on one machine >= 0.7x the local "
        "engine; RSS at 100k within 1.2x of 10k.",
    ]
    return lines


if __name__ == "__main__":
    main()
