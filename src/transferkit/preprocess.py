"""The one definition of model input: size, resize, channels, mean/std.

Training, export verification and serving all go through this module, so a served image is turned into
exactly the tensor the model was trained on:

    image (any mode/size) --PIL--> RGB --PIL bilinear resize--> uint8 HxWx3 --/255, -mean, /std--> float NCHW

The resize happens once, with PIL, when a dataset is loaded or a request is decoded; training augments the
resulting uint8 pixels on the device and normalizes with `normalize_torch`, serving with `normalize_numpy`.
Serving needs only NumPy and Pillow (no torch) for this.
"""
from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.errors import ImageDecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow raises a DecompressionBombError above this many pixels; we refuse earlier with a clear message.
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 64  # square side in pixels; the exported model's input is (N, 3, image_size, image_size)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel, on the 0..1 scale (the backbone's weights)
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bilinear"  # PIL filter used for every resize
    channels: str = "RGB"  # grayscale inputs are replicated to 3 channels
    layout: str = field(default="NCHW", repr=False)

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.resize not in _FILTERS:
            raise ValueError(f"resize must be one of {sorted(_FILTERS)}, got {self.resize!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=d.get("resize", "bilinear"),
            channels=d.get("channels", "RGB"),
        )

    # ---- pixels -> uint8 (PIL; shared by dataset loading and serving) ----
    def pil_to_uint8(self, image: Image.Image) -> np.ndarray:
        """Any PIL image -> uint8 (image_size, image_size, 3).

        Camera photos are turned upright by their EXIF orientation; 16-bit and float grayscale are scaled
        to 8 bits by their range (Pillow's own conversion would clip them); alpha is dropped."""
        image = ImageOps.exif_transpose(image) or image
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(image, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            image = Image.fromarray(arr.round().astype(np.uint8), mode="L")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), _FILTERS[self.resize])
        return np.asarray(image, dtype=np.uint8)

    def array_to_uint8(self, images: np.ndarray) -> np.ndarray:
        """A stack of uint8 images (N,H,W) or (N,H,W,C with C in 1,3) -> (N, S, S, 3) uint8."""
        if images.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        n = len(images)
        out = np.empty((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        mode = "L" if images.ndim == 3 else "RGB"
        for i in range(n):
            out[i] = self.pil_to_uint8(Image.fromarray(images[i], mode=mode))
        return out

    # ---- uint8 -> normalized float ----
    def normalize_numpy(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N,S,S,3) -> float32 (N,3,S,S), normalized. Used by serving runtimes."""
        x = batch.astype(np.float32) * (1.0 / 255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def normalize_torch(self, batch):
        """(N,3,S,S) tensor on any device -> float32 normalized. uint8 input is scaled by 1/255; float input
        must already be in 0..1 (training normalizes after augmenting in that space). Used by training and
        evaluation."""
        import torch  # lazy: serving (numpy only) never calls this

        x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch
        mean, std = _stats_on(batch.device, self.mean, self.std)
        return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _stats_on(device, mean: tuple, std: tuple):
    """mean/std as (1,3,1,1) tensors on `device`, made once: a fresh host-to-device copy per batch would
    make the CPU wait for the GPU every step."""
    import torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def decode_image(data: bytes, name: str = "upload") -> Image.Image:
    """Bytes -> fully decoded PIL image, or ImageDecodeError naming what is wrong.

    `Image.open` is lazy, so a truncated file would only fail later; `load()` forces the full decode here.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file; send a JPEG, PNG or WebP image")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(
                f"{name}: image is {image.width}x{image.height}, over the {MAX_IMAGE_PIXELS} pixel limit; "
                "downscale it before sending"
            )
        image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        kind = _sniff_format(data)
        if kind:  # the right magic bytes, but Pillow cannot parse what follows
            raise ImageDecodeError(f"{name}: corrupt or truncated {kind} file; re-encode or re-upload it") from None
        raise ImageDecodeError(f"{name}: not a recognised image format; send a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({exc}); re-encode or re-upload it") from None
    return image
