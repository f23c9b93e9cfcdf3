"""The one definition of model input: size, resize, channels, mean/std.

Training, export verification and serving all go through this module, so a served image is turned into
exactly the tensor the model was trained on:

    image (any mode/size) --PIL--> RGB --PIL bilinear resize--> uint8 HxWx3 --/255, -mean, /std--> float NCHW

A JPEG at least twice the target size on both sides is decoded at 1/2, 1/4 or 1/8 scale when `jpeg_draft` is
on (Pillow's draft mode: the DCT itself skips the detail the resize would throw away), then resized as above.
New runs record `jpeg_draft: true` in preprocessing.json, so training, verification and serving all see the
same pixels; a run without the key (made before) keeps the full decode.

The resize happens once, with PIL, when a dataset is loaded or a request is decoded; training augments the
resulting uint8 pixels on the device and normalizes with `normalize_torch`, serving with `normalize_numpy`.
Serving needs only NumPy and Pillow (no torch) for this.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.errors import ImageDecodeError, ImageFormatError, ImageTooLargeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The most bytes one image may have: one request body to the server, one file to `score`.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Pillow raises DecompressionBombError above 2x its own limit (~179 MP); we refuse above this, with a clear message.
MAX_IMAGE_PIXELS = 64_000_000
# What a server decodes for one image is bounded by what the model looks at, not by that global ceiling: a lossless
# WebP of one colour at 8000x8000 is 2.5 KB and costs half a second and 256 MB to decode, for a model that then
# shrinks it to 32x32. So a served image may have at most (SERVED_PIXELS_PER_SIDE x the model's side)^2 pixels as
# decoded (after a JPEG's draft scaling, so a camera JPEG of any size stays acceptable), and never fewer than
# SERVED_MIN_PIXELS, so a 2048x2048 screenshot still answers for a 32 px model: 4.2 MP for models up to 128 px,
# 12.8 MP at 224 px (a phone photo as PNG). `TRANSFERKIT_MAX_PIXELS` (`serve --max-pixels`) sets another bound.
SERVED_PIXELS_PER_SIDE = 16
SERVED_MIN_PIXELS = 2048 * 2048


def served_pixel_limit(image_size: int) -> int:
    """Decoded pixels a server accepts in one image for a model of this input side (see SERVED_PIXELS_PER_SIDE)."""
    return min(MAX_IMAGE_PIXELS, max(SERVED_MIN_PIXELS, (SERVED_PIXELS_PER_SIDE * image_size) ** 2))


@dataclass(frozen=True)
class Preprocessing:
    image_size: int = 64  # square side in pixels; the exported model's input is (N, 3, image_size, image_size)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per-channel, on the 0..1 scale (the backbone's weights)
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bilinear"  # PIL filter used for every resize
    channels: str = "RGB"  # grayscale inputs are replicated to 3 channels
    layout: str = field(default="NCHW", repr=False)
    jpeg_draft: bool = False  # decode large JPEGs at a reduced DCT scale (module docstring); new runs: True

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
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize=d.get("resize", "bilinear"),
            channels=d.get("channels", "RGB"),
            jpeg_draft=bool(d.get("jpeg_draft", False)),  # runs made before the option: the full decode
        )

    @property
    def draft_size(self) -> int | None:
        """The size a JPEG may be drafted down to (decode_image, `draft`), or None for the full decode."""
        return self.image_size if self.jpeg_draft else None

    def draft(self, image: Image.Image) -> None:
        """Before an opened JPEG is loaded: decode it at the smallest DCT scale still >= the target size."""
        _draft(image, self.draft_size)

    def decode_served(self, data: bytes, name: str = "upload") -> np.ndarray:
        """A client's encoded image -> uint8 (S, S, 3), as the server and `transferkit score` read it: only
        SERVED_FORMATS, this run's JPEG draft decode; an ImageDecodeError (or subclass) names the problem."""
        return self.pil_to_uint8(decode_image(data, name=name, formats=SERVED_FORMATS, draft_size=self.draft_size))

    def open_served(self, data: bytes, name: str, max_pixels: int) -> Image.Image:
        """A client's image opened (its header read, JPEG draft scaling set) and checked against `max_pixels`
        as it will be decoded, before any pixel is: an ImageTooLargeError (413) costs no decode at all. Finish
        with `finish_served`, inline when the image is small, else in a thread."""
        return open_image(data, name, SERVED_FORMATS, self.draft_size, max_pixels)

    def finish_served(self, image: Image.Image, name: str) -> np.ndarray:
        """The opened image of `open_served` decoded -> uint8 (S, S, 3)."""
        return self.pil_to_uint8(load_image(image, name))

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
        """uint8 (N,S,S,3) -> float32 (N,3,S,S), normalized. Used by serving runtimes.

        A uint8 pixel has 256 values: each channel's plane is one lookup in a table computed with the float32
        steps of the plain formula (x / 255 - mean) / std, so the result is bit-identical to it, written once in
        NCHW order instead of five passes over a float copy (at 224 px: 14 instead of 25 ms per batch of 32)."""
        lut = self._normalize_table
        n, h, w, _ = batch.shape
        out = np.empty((n, 3, h, w), np.float32)
        for c in range(3):
            np.take(lut[c], batch[..., c], out=out[:, c], mode="clip")  # uint8 indices are always in range
        return out

    @functools.cached_property
    def _normalize_table(self) -> np.ndarray:
        """(3, 256) float32: channel c, pixel value v -> (v / 255 - mean[c]) / std[c], in float32 throughout."""
        values = np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)
        table = (values - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(table.T)

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


# Magic bytes -> (name for messages, Pillow format that reads it or None). Read without any Pillow plugin, so
# bytes in a format the caller refused are never parsed, yet the client is told what it sent.
_MAGIC: tuple[tuple[bytes, int, str, str | None], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG", "PNG"),
    (b"\xff\xd8", 0, "JPEG", "JPEG"),
    (b"WEBP", 8, "WebP", "WEBP"),  # after b"RIFF" + size, checked below
    (b"GIF8", 0, "GIF", "GIF"),
    (b"II*\x00", 0, "TIFF", "TIFF"),
    (b"MM\x00*", 0, "TIFF", "TIFF"),
    (b"II+\x00", 0, "TIFF", "TIFF"),  # BigTIFF
    (b"MM\x00+", 0, "TIFF", "TIFF"),
    (b"BM", 0, "BMP", "BMP"),
    (b"\x00\x00\x01\x00", 0, "ICO", "ICO"),
    (b"\x00\x00\x02\x00", 0, "CUR", "CUR"),
    (b"DDS ", 0, "DDS", "DDS"),
    (b"%!PS", 0, "EPS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS", "EPS"),  # DOS EPS binary header
    (b"8BPS", 0, "PSD", "PSD"),
    (b"%PDF", 0, "PDF", None),
    (b"icns", 0, "ICNS", "ICNS"),
    (b"qoif", 0, "QOI", "QOI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", 0, "JPEG 2000", "JPEG2000"),
    (b"\xffO\xffQ", 0, "JPEG 2000", "JPEG2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", 0, "JPEG XL", None),
    (b"\xff\x0a", 0, "JPEG XL", None),
)
_FTYP = {
    b"avif": ("AVIF", "AVIF"),
    b"avis": ("AVIF", "AVIF"),
    b"heic": ("HEIC", None),
    b"heix": ("HEIC", None),
    b"mif1": ("HEIF", None),
    b"msf1": ("HEIF", None),
}
_NAMES = {"WEBP": "WebP", "JPEG2000": "JPEG 2000"}

# What the HTTP server decodes. Camera JPEGs that Pillow calls "MPO" (several pictures in one file) are opened
# by the JPEG plugin, so "JPEG" covers them; "MPO" itself is not an open-able format name in Pillow.
SERVED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
SERVED_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")  # the file names of SERVED_FORMATS


def _sniff_format(data: bytes) -> tuple[str, str | None] | None:
    """(name, Pillow format) from the leading bytes alone, or None when nothing matches."""
    for magic, offset, name, pil in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (name != "WebP" or data[:4] == b"RIFF"):
            return name, pil
    if data[4:8] == b"ftyp" and data[8:12] in _FTYP:
        return _FTYP[data[8:12]]
    head = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip()  # UTF-8 BOM, then whitespace
    if head.startswith((b"<?xml", b"<svg", b"<!DOCTYPE svg")):
        return "SVG", None
    return None


def _spoken(formats: tuple[str, ...]) -> str:
    names = [_NAMES.get(f, f) for f in formats]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def decode_image(
    data: bytes, name: str = "upload", formats: tuple[str, ...] | None = None, draft_size: int | None = None
) -> Image.Image:
    """Bytes -> fully decoded PIL image, or an ImageDecodeError naming what is wrong.

    `formats` (Pillow names, e.g. SERVED_FORMATS) restricts which Pillow plugins may parse the bytes; None
    lets every plugin try (dataset loading). Untrusted bytes only ever raise ImageDecodeError or a subclass:
    ImageFormatError (a recognised format outside `formats`), ImageTooLargeError (over MAX_IMAGE_PIXELS),
    plain ImageDecodeError (empty, corrupt, truncated or unrecognised).
    `Image.open` is lazy, so a truncated file would only fail later; `load()` forces the full decode here,
    after the header's size has been checked. `draft_size` (Preprocessing.draft_size): a JPEG is decoded at the
    smallest DCT scale that keeps both sides >= it.
    """
    return load_image(open_image(data, name, formats, draft_size), name)


def open_image(
    data: bytes,
    name: str = "upload",
    formats: tuple[str, ...] | None = None,
    draft_size: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """The first half of `decode_image`: the header read and checked, nothing decoded. The declared size must
    be within MAX_IMAGE_PIXELS, and the size as it will be decoded (a JPEG after its draft scaling) within
    `max_pixels`."""
    accepted = None if formats is None else tuple(f.upper() for f in formats)
    if accepted is not None:
        Image.init()
        unknown = [f for f in accepted if f not in Image.OPEN]
        if unknown or not accepted:  # a caller bug, not bad input: do not report it as a bad upload
            raise ValueError(f"formats: {unknown or 'empty'} not readable by Pillow (MPO opens as JPEG)")
    send = _spoken(accepted or ("JPEG", "PNG", "WEBP"))
    if not data:
        raise ImageDecodeError(f"{name}: empty file; send a {send} image")
    try:
        image = Image.open(io.BytesIO(data), formats=None if accepted is None else list(accepted))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageTooLargeError(
                f"{name}: image is {image.width}x{image.height}, over the {MAX_IMAGE_PIXELS} pixel limit; "
                "downscale it before sending"
            )
        _draft(image, draft_size)
        if image.width * image.height > max_pixels:
            raise ImageTooLargeError(
                f"{name}: image is {image.width}x{image.height} as decoded, over this model's limit of {max_pixels} "
                f"pixels (the model looks at far fewer; the server's --max-pixels sets it); downscale it before sending"
            )
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses in Image.open, before our own check (the warning only when warnings are errors);
        # its message speaks of attacks, so only the pixel count is passed on
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"has {found.group(1)} pixels" if found else "is"
        raise ImageTooLargeError(
            f"{name}: image {size}, over the {MAX_IMAGE_PIXELS} pixel limit; downscale it before sending"
        ) from None
    except UnidentifiedImageError:
        raise _unidentified(data, name, accepted, send) from None
    except Exception as exc:  # noqa: BLE001 - plugins raise anything (NotImplementedError, struct.error, ...)
        detail = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({detail}); re-encode or re-upload it") from None
    return image


def load_image(image: Image.Image, name: str = "upload") -> Image.Image:
    """The second half of `decode_image`: the pixels of an image `open_image` checked, decoded."""
    try:
        image.load()
    except Exception as exc:  # noqa: BLE001 - plugins raise anything (NotImplementedError, struct.error, ...)
        detail = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({detail}); re-encode or re-upload it") from None
    return image


def _draft(image: Image.Image, size: int | None) -> None:
    """Before load(): a JPEG decoded at the smallest DCT scale that keeps both sides >= size (None: full)."""
    if size and image.format == "JPEG":
        image.draft(image.mode, (size, size))


def _unidentified(data: bytes, name: str, accepted: tuple[str, ...] | None, send: str) -> ImageDecodeError:
    """The error for bytes no permitted plugin would open, told apart by magic bytes alone."""
    sniffed = _sniff_format(data)
    if sniffed is None:
        return ImageDecodeError(f"{name}: not a recognised image format; send a {send} image")
    kind, pil = sniffed
    if pil is not None and (pil in accepted if accepted is not None else pil in Image.OPEN):
        # the right magic bytes, but the plugin cannot parse what follows
        return ImageDecodeError(f"{name}: corrupt or truncated {kind} file; re-encode or re-upload it")
    if accepted is not None:
        return ImageFormatError(f"{name}: {kind} images are not accepted; send {send}")
    return ImageFormatError(f"{name}: {kind} images cannot be read; convert it to {send}")
