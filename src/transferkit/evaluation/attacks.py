"""White-box adversarial accuracy: FGSM or PGD on the PyTorch model, then the same images through each artifact.

    result = score_attacks(model, run, datasets, "test", options, device, runtimes)
    cell = result["mnist"]["mnist"]           # dataset -> head -> AttackCell
    cell.pytorch[2 / 255], cell.artifacts["onnx-int8"][2 / 255]

The attack works in 0..1 pixel space under an L-infinity budget eps: the gradient flows through the run's
normalisation into the pixels, every step is clipped to the eps-ball around the image and to [0, 1]. Each head is
attacked on its own, with its own loss, on the images of each dataset whose class it has. The adversarial images
are then rounded to uint8, as a saved PNG would hold them, and scored again by PyTorch (so the artifacts are
compared with PyTorch on the very same pixels) and by every servable artifact of the run's export, through the
serving runtimes (what `serve` and `score` run).

FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018, random start, step 2.5 eps / steps) are a few lines of
training/adversarial.py, which `--adversarial-training` trains with (training never imports evaluation):
torchattacks, the package usually taken for them, is no longer maintained, and pinning it would tie this project's
torch upgrades to a dead package for ten lines of arithmetic.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from transferkit.data import ImageDataset
from transferkit.evaluation.corruption_eval import seeded_subset
from transferkit.evaluation.matrix import head_targets
from transferkit.evaluation.robust_options import RobustnessOptions
from transferkit.runs import Run
from transferkit.training.adversarial import Loss, fgsm, pgd
from transferkit.training.precision import model_input

__all__ = ["AttackCell", "exported_runtimes", "fgsm", "head_loss", "pgd", "score_attacks"]

BATCH = 128  # images per attack step: the backward pass holds every activation of the batch


def head_loss(model: torch.nn.Module, run: Run, head: str, target: torch.Tensor) -> Loss:
    """Pixels in 0..1 -> the summed cross-entropy of `head` against `target`, in fp32 through the normalisation."""
    return lambda x: F.cross_entropy(model(model_input(run.preprocessing, x))[head].float(), target, reduction="sum")


@dataclass
class AttackCell:
    """One head on one dataset: accuracy clean and at each eps, for PyTorch and for each artifact."""

    images: int
    own: bool
    clean: float
    pytorch: dict[float, float] = field(default_factory=dict)  # eps -> accuracy on the float adversarial images
    pytorch_uint8: dict[float, float] = field(default_factory=dict)  # the same, rounded to uint8
    artifacts: dict[str, dict[float, float]] = field(default_factory=dict)  # artifact -> eps -> on the uint8 ones

    def to_dict(self) -> dict:
        as_text = lambda by_eps: {f"{e:.6g}": a for e, a in by_eps.items()}  # noqa: E731 - JSON keys are text
        return {
            "images": self.images,
            "own": self.own,
            "clean": self.clean,
            "pytorch": as_text(self.pytorch),
            "pytorch_uint8": as_text(self.pytorch_uint8),
            "artifacts": {name: as_text(by) for name, by in self.artifacts.items()},
        }


def _seed(seed: int, *parts: object) -> int:
    return int(np.random.SeedSequence([seed, *(zlib.crc32(str(p).encode()) for p in parts)]).generate_state(1)[0])


def _adversarial(model, run: Run, head: str, x: torch.Tensor, y: torch.Tensor, eps: float, options, seed: int):
    loss_of = head_loss(model, run, head, y)
    if options.attack == "fgsm":
        return fgsm(loss_of, x, eps)
    return pgd(loss_of, x, eps, options.steps, generator=torch.Generator().manual_seed(seed))


def _correct(logits: torch.Tensor | np.ndarray, y: np.ndarray) -> int:
    predicted = logits.argmax(1)
    predicted = predicted.cpu().numpy() if isinstance(predicted, torch.Tensor) else predicted
    return int((predicted == y).sum())


def score_attacks(
    model: torch.nn.Module,
    run: Run,
    datasets: list[ImageDataset],
    split: str,
    options: RobustnessOptions,
    device: str,
    runtimes: dict | None = None,
) -> dict[str, dict[str, AttackCell]]:
    """dataset -> head -> AttackCell. `runtimes`: artifact name -> a loaded serving Runtime of this run's export."""
    from tqdm import tqdm

    model.eval()
    pre = run.preprocessing
    runtimes = runtimes or {}
    cells: dict[str, dict[str, AttackCell]] = {}
    progress = tqdm(desc=f"{options.attack} {run.dir.name}", unit="img", disable=None, leave=False)
    for ds in datasets:
        pixels, labels = seeded_subset(ds, split, options)
        for head, target in head_targets(run, ds, labels).items():
            keep = target >= 0
            images, y_all = pixels[keep], target[keep]
            clean = 0
            counts = {eps: {"pytorch": 0, "uint8": 0, **dict.fromkeys(runtimes, 0)} for eps in options.eps_values}
            for start in range(0, len(images), BATCH):
                chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH])).to(device)
                x = chunk.permute(0, 3, 1, 2).float() / 255
                y_np = y_all[start : start + BATCH]
                y = torch.from_numpy(y_np).to(device)
                with torch.no_grad():
                    clean += _correct(model(model_input(pre, x))[head], y_np)
                for eps in options.eps_values:
                    adv = _adversarial(
                        model, run, head, x, y, eps, options, _seed(options.robust_seed, ds.name, head, eps, start)
                    )
                    as_uint8 = (adv * 255).round().to(torch.uint8)  # what a saved PNG of it would hold
                    with torch.no_grad():
                        counts[eps]["pytorch"] += _correct(model(model_input(pre, adv))[head], y_np)
                        counts[eps]["uint8"] += _correct(model(model_input(pre, as_uint8))[head], y_np)
                    batch = pre.normalize_numpy(as_uint8.permute(0, 2, 3, 1).cpu().numpy())
                    for name, runtime in runtimes.items():
                        counts[eps][name] += _correct(runtime.run(batch)[head], y_np)
                progress.update(len(y_np))
            n = max(len(images), 1)
            cell = AttackCell(len(images), run.labels.datasets.get(ds.name) == head, clean / n)
            for eps, count in counts.items():
                cell.pytorch[eps] = count["pytorch"] / n
                cell.pytorch_uint8[eps] = count["uint8"] / n
                for name in runtimes:
                    cell.artifacts.setdefault(name, {})[eps] = count[name] / n
            cells.setdefault(ds.name, {})[head] = cell
    progress.close()
    return cells


def exported_runtimes(run: Run, failed_gate: bool = False) -> tuple[dict, dict[str, str]]:
    """The run's servable artifacts, loaded through the serving runtimes (files checked against the manifest's
    sha256), and why each other artifact was left out. Nothing when the run has not been exported.
    `failed_gate`: also load artifacts that exported but failed the accuracy gate, which serving never loads, so
    that a benchmark can say how far they fall under corruption too (docs/robustness.md)."""
    from dataclasses import replace

    from transferkit.artifact import PASSED, VERIFY_FAILED
    from transferkit.errors import one_line
    from transferkit.manifest import FileRecord, read_manifest
    from transferkit.runtimes.selection import artifact_problem, load_runtime

    export_dir = run.export_dir
    if not (export_dir / "manifest.json").is_file():
        return {}, {}
    manifest = read_manifest(export_dir)
    stale = manifest.source.get("sha256") != FileRecord.of(run.model_path).sha256
    loaded, skipped = {}, {}
    for name, entry in manifest.artifacts.items():
        view = manifest
        if failed_gate and entry.status == VERIFY_FAILED:  # loaded as if it had passed: files and runtime checked
            view = replace(manifest, artifacts={**manifest.artifacts, name: replace(entry, status=PASSED)})
        problem = artifact_problem(name, view, export_dir)
        if problem is None and stale:
            problem = f"exported from another model.pt than the run's; re-run `transferkit export {run.dir}`"
        if problem is None:
            try:
                loaded[name] = load_runtime(name, export_dir, view, check_files=True)
            except Exception as exc:  # noqa: BLE001 - one artifact that cannot load leaves the others scored
                problem = one_line(exc)
        if problem is not None:
            skipped[name] = problem
    return loaded, skipped
