"""`imagefolder:PATH` datasets: PATH/{train,val,test}/<class>/<image>, or PATH/<class>/<image> (seeded split).

Files are decoded and resized once, in parallel threads (Pillow releases the GIL while decoding), into uint8
arrays at the model's input size. An unreadable file is a DataError naming the file, not a silent skip.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from transferkit.data.base import Split, limit_indices, seeded_split
from transferkit.errors import DataError
from transferkit.preprocess import SERVED_SUFFIXES, Preprocessing

# The Pillow plugins a file may be parsed by: its suffix's own first, then the other raster formats read here (a
# PNG saved as .jpg is common and still trains), and nothing else, so an EPS or a PDF renamed .jpg never reaches
# Ghostscript (where it is installed) while the training data is read.
_RASTER = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")  # camera MPO files open through the JPEG plugin
_OWN = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF"}
_OWN |= {".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}
SUFFIX_FORMATS = {suffix: (own, *(f for f in _RASTER if f != own)) for suffix, own in _OWN.items()}
IMAGE_SUFFIXES = set(SUFFIX_FORMATS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for idx, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a class may be absent from one split (e.g. a tiny val split)
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths += files
        labels += [idx] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _warn_skipped(spec: str, folders: list[Path], classes: list[str]) -> None:
    """Files in class folders without an image suffix are not read; say so once, with a count, so that a folder
    of .heic photos is not silently a smaller dataset. Hidden files (.DS_Store) are not counted."""
    skipped = [
        p
        for folder in folders
        for name in classes
        if (folder / name).is_dir()
        for p in (folder / name).rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES
    ]
    if skipped:
        suffixes = sorted({p.suffix.lower() or "(none)" for p in skipped})
        print(
            f"transferkit: warning: imagefolder:{spec}: skipped {len(skipped)} file(s) with suffix "
            f"{', '.join(suffixes[:5])}{', ...' if len(suffixes) > 5 else ''} (e.g. {skipped[0]}); "
            f"read are {' '.join(sorted(IMAGE_SUFFIXES))}",
            file=sys.stderr,
            flush=True,
        )


def _warn_not_served(spec: str, files: list[Path]) -> None:
    """Training reads BMP, GIF, TIFF, PPM and PGM too; the server decodes only SERVED_SUFFIXES and answers 415
    to the rest. Say so once per dataset, before a user deploys a model their own files cannot reach."""
    other = [p for p in files if p.suffix.lower() not in SERVED_SUFFIXES]
    if other:
        suffixes = sorted({p.suffix.lower() for p in other})
        print(
            f"transferkit: warning: imagefolder:{spec}: {len(other)} image(s) are {' '.join(suffixes)} "
            f"(e.g. {other[0]}); training reads them, but the server decodes {' '.join(SERVED_SUFFIXES)} "
            "only and answers 415: convert such files before sending them to /predict",
            file=sys.stderr,
            flush=True,
        )


def decode_file(path: Path, pre: Preprocessing) -> np.ndarray:
    """One image file -> uint8 (S, S, 3), or a DataError naming the file."""
    try:
        with Image.open(path, formats=SUFFIX_FORMATS.get(path.suffix.lower(), _RASTER)) as image:
            pre.draft(image)  # the run's JPEG decode, as serving does it (preprocess.py)
            return pre.pil_to_uint8(image)
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({exc}); remove or replace the file") from None


def _decode_all(paths: list[Path], pre: Preprocessing) -> np.ndarray:
    def load(path: Path) -> np.ndarray:
        return decode_file(path, pre)

    out = np.empty((len(paths), pre.image_size, pre.image_size, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, arr in enumerate(pool.map(load, paths)):
            out[i] = arr
    return out


def load_imagefolder(
    path: str, pre: Preprocessing, limit: int | None, max_in_memory_bytes: int
) -> tuple[dict[str, Split], list[str]]:
    """-> ({split: Split}, classes). A train split over `max_in_memory_bytes` decoded is left on disk
    (Split.paths) for training to stream; val and test are always decoded (they are read every epoch)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder:{path}: no such directory; give PATH with PATH/train/<class>/*.jpg")
    has_splits = (root / "train").is_dir()
    if has_splits:
        classes = [p.name for p in _class_dirs(root / "train")]
    else:
        classes = [p.name for p in _class_dirs(root)]
    if len(classes) < 2:
        raise DataError(
            f"imagefolder:{path}: found {len(classes)} class folder(s); need at least 2, laid out as "
            f"PATH/train/<class>/*.jpg (and PATH/val/<class>/*) or PATH/<class>/*.jpg"
        )
    split_dirs = [root / s for s in ("train", "val", "test") if (root / s).is_dir()] if has_splits else [root]
    _warn_skipped(path, split_dirs, classes)
    listed: dict[str, tuple[list[Path], np.ndarray]] = {}
    if has_splits:
        listed["train"] = _list_images(root / "train", classes)
        for split in ("val", "test"):
            if (root / split).is_dir():
                extra = sorted({p.name for p in _class_dirs(root / split)} - set(classes))
                if extra:
                    raise DataError(f"imagefolder:{path}: {split}/ has classes not in train/: {extra}")
                listed[split] = _list_images(root / split, classes)
        if "val" not in listed:  # carve val (and test if absent) out of train, seeded
            paths, labels = listed["train"]
            tr, va, te = seeded_split(len(labels), (0.15, 0.0 if "test" in listed else 0.15))
            listed["train"] = ([paths[i] for i in tr], labels[tr])
            listed["val"] = ([paths[i] for i in va], labels[va])
            if "test" not in listed:
                listed["test"] = ([paths[i] for i in te], labels[te])
        elif "test" not in listed:
            # no test/: a seeded test split is carved from train, not val, so that the export gate and the
            # report never judge the images that chose the best epoch
            paths, labels = listed["train"]
            tr, va, te = seeded_split(len(labels), (0.0, 0.15))
            tr = np.sort(np.concatenate([tr, va]))  # seeded_split keeps one image for a val split not wanted here
            listed["train"] = ([paths[i] for i in tr], labels[tr])
            listed["test"] = ([paths[i] for i in te], labels[te])
            print(
                f"transferkit: note: imagefolder:{path}: no test/ folder; a seeded 15% of train/ ({len(te)} "
                "images) is held out as the test split",
                file=sys.stderr,
                flush=True,
            )
    else:
        paths, labels = _list_images(root, classes)
        tr, va, te = seeded_split(len(labels), (0.15, 0.15))
        for split, idx in zip(("train", "val", "test"), (tr, va, te)):
            listed[split] = ([paths[i] for i in idx], labels[idx])
    _warn_not_served(path, [p for paths, _ in listed.values() for p in paths])
    splits = {}
    for split, (paths, labels) in listed.items():
        if len(paths) == 0:
            raise DataError(f"imagefolder:{path}: the {split} split has no images ({sorted(IMAGE_SUFFIXES)})")
        keep = limit_indices(len(paths), limit)
        files = [paths[i] for i in keep]
        if split == "train" and len(files) * pre.image_size**2 * 3 > max_in_memory_bytes:
            splits[split] = Split(None, labels[keep], paths=files)
        else:
            splits[split] = Split(_decode_all(files, pre), labels[keep])
    return splits, classes
