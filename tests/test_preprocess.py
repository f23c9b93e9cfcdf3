import io

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.errors import ImageDecodeError
from transferkit.preprocess import Preprocessing, decode_image


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_grayscale_and_any_size_become_rgb_at_model_size():
    pre = Preprocessing(image_size=32)
    gray = Image.fromarray(np.arange(28 * 20, dtype=np.uint8).reshape(28, 20), mode="L")
    out = pre.pil_to_uint8(gray)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_numpy_and_torch_normalisation_agree():
    pre = Preprocessing(image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    a = pre.normalize_numpy(batch)
    b = pre.normalize_torch(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy()
    assert a.shape == (4, 3, 16, 16)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_array_path_matches_pil_path():
    """Dataset loading (arrays) and serving (decoded files) must give the same pixels."""
    pre = Preprocessing(image_size=24)
    img = np.random.default_rng(1).integers(0, 256, size=(28, 28), dtype=np.uint8)
    from_array = pre.array_to_uint8(img[None])[0]
    from_file = pre.pil_to_uint8(decode_image(_png_bytes(Image.fromarray(img, mode="L"))))
    assert np.array_equal(from_array, from_file)


def test_roundtrip_dict():
    pre = Preprocessing(image_size=40, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert Preprocessing.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a recognised image"),
    ],
)
def test_decode_rejects_bad_bytes(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_decode_rejects_truncated_png():
    good = _png_bytes(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(good[: len(good) // 2])


def test_decode_names_a_truncated_header_as_corrupt():
    good = _png_bytes(Image.fromarray(np.zeros((8, 8), np.uint8)))
    with pytest.raises(ImageDecodeError, match="corrupt or truncated PNG"):
        decode_image(good[:40])


def test_decode_accepts_jpeg_and_webp():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for fmt in ("JPEG", "WEBP"):
        assert decode_image(_png_bytes(img, fmt)).size == (30, 20)


def test_unusual_modes_become_sensible_rgb():
    pre = Preprocessing(image_size=16)
    ramp16 = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)
    image16 = Image.fromarray(ramp16)
    assert image16.mode.startswith("I;16")
    out = pre.pil_to_uint8(image16)
    assert out.min() == 0 and out.max() == 255  # scaled by range, not clipped to white
    rgba = Image.fromarray(np.full((10, 12, 4), 200, np.uint8), mode="RGBA")
    assert pre.pil_to_uint8(rgba).shape == (16, 16, 3)
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))
    red = pre.pil_to_uint8(cmyk)
    assert red[..., 0].mean() > 200 and red[..., 1].mean() < 50


def test_exif_orientation_is_applied():
    pre = Preprocessing(image_size=8)
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image(buf.getvalue())
    assert pre.pil_to_uint8(upright).shape == (8, 8, 3)
    assert upright.size == (16, 8)  # decode keeps the stored pixels; pil_to_uint8 turns them upright
