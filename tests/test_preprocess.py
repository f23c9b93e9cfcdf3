import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.errors import ImageDecodeError, ImageFormatError, ImageTooLargeError
from transferkit.preprocess import MAX_IMAGE_PIXELS, SERVED_FORMATS, Preprocessing, decode_image


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


def test_numpy_normalisation_is_the_plain_formula_bit_for_bit():
    """The lookup table gives exactly what (x / 255 - mean) / std gives in float32, for every pixel value."""
    pre = Preprocessing(image_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    batch = np.concatenate([every_value, np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)])
    x = batch.astype(np.float32) * (1.0 / 255.0)
    plain = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    out = pre.normalize_numpy(batch)
    assert out.flags["C_CONTIGUOUS"] and out.dtype == np.float32
    assert np.array_equal(out, plain.transpose(0, 3, 1, 2))


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
    """Orientation 6 means "rotate 90 degrees clockwise to display". The stored image is 64 wide, 32 tall,
    with only its top-left quadrant white: upright, that quadrant is the top-right one. Ignoring the tag
    would leave it top-left; a mirrored or counter-clockwise turn would put it elsewhere."""
    pre = Preprocessing(image_size=16)
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:16, :32] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (64, 32)  # decode keeps the stored pixels; pil_to_uint8 turns them upright
    out = pre.pil_to_uint8(decoded).mean(axis=2)
    assert out.shape == (16, 16)
    # quadrant cores, away from the resize's blended border rows and columns
    quadrants = {
        "top-left": out[1:7, 1:7],
        "top-right": out[1:7, 9:15],
        "bottom-left": out[9:15, 1:7],
        "bottom-right": out[9:15, 9:15],
    }
    assert quadrants["top-right"].min() > 200, out
    assert all(q.max() < 55 for name, q in quadrants.items() if name != "top-right"), out


# ---- untrusted uploads: formats restricted to what the server accepts ----

_RGB = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 30, 3), dtype=np.uint8))


def _dds_unknown_fourcc() -> bytes:
    """A 128-byte DDS header (magic + 124) whose pixel format Pillow's DDS plugin does not implement."""
    header = struct.pack("<7I", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)  # size, flags, h, w, pitch, depth, mips
    header += struct.pack("<2I", 32, 0x4) + b"XXXX" + bytes(20)  # pixel format: FOURCC "XXXX"
    header += struct.pack("<4I", 0x1000, 0, 0, 0) + bytes(4)  # caps
    data = b"DDS " + header
    assert len(data) == 128
    return data + bytes(48)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims width x height (CRC recomputed, so only the size is a lie)."""
    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


REFUSED = {
    "DDS": lambda: _png_bytes(_RGB, "DDS"),
    "DDS-unknown-fourcc": _dds_unknown_fourcc,
    "TIFF": lambda: _png_bytes(_RGB, "TIFF"),
    "EPS": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n",
    "SVG": lambda: b'\xef\xbb\xbf\n  <svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "SVG-xml": lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
    "ICO": lambda: _png_bytes(_RGB, "ICO"),
    "GIF": lambda: _png_bytes(_RGB, "GIF"),
    "BMP": lambda: _png_bytes(_RGB, "BMP"),
    "PSD": lambda: b"8BPS\x00\x01" + bytes(40),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_served_formats_refuse_other_formats_with_415(kind):
    with pytest.raises(ImageFormatError) as info:
        decode_image(REFUSED[kind](), name="image", formats=SERVED_FORMATS)
    shown = kind.split("-")[0]
    assert str(info.value) == f"image: {shown} images are not accepted; send JPEG, PNG or WebP"
    assert info.value.http_status == 415 and isinstance(info.value, ImageDecodeError)


def test_plugin_crash_on_unrestricted_decode_is_a_400_not_an_escape():
    """Pillow's DDS plugin raises NotImplementedError for an unknown FourCC; it must become a decode error."""
    with pytest.raises(ImageDecodeError, match="corrupt or truncated") as info:
        decode_image(_dds_unknown_fourcc())
    assert type(info.value) is ImageDecodeError and info.value.http_status == 400


@pytest.mark.parametrize("formats", [SERVED_FORMATS, None])
def test_header_over_pillow_bomb_limit_is_413(formats):
    data = _png_claiming(20000, 10000)  # 200 MP: Pillow raises DecompressionBombError inside Image.open
    with pytest.raises(ImageTooLargeError, match="pixel limit") as info:
        decode_image(data, formats=formats)
    assert info.value.http_status == 413 and "200000000 pixels" in str(info.value)


@pytest.mark.parametrize("formats", [SERVED_FORMATS, None])
def test_header_over_our_limit_is_413_before_decoding(formats):
    width, height = 10000, MAX_IMAGE_PIXELS // 10000 + 1  # over our limit, under Pillow's warning threshold
    with pytest.raises(ImageTooLargeError, match="pixel limit") as info:
        decode_image(_png_claiming(width, height), formats=formats)
    assert f"{width}x{height}" in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_served_formats_are_400(fmt):
    good = _png_bytes(_RGB, fmt)
    for data in (good[: len(good) // 2], good[:16]):
        with pytest.raises(ImageDecodeError, match="corrupt or truncated") as info:
            decode_image(data, formats=SERVED_FORMATS)
        assert type(info.value) is ImageDecodeError and info.value.http_status == 400


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_served_formats_decode(fmt):
    image = decode_image(_png_bytes(_RGB, fmt), formats=SERVED_FORMATS)
    assert image.size == (30, 20) and image.format == fmt


def test_multi_picture_camera_jpeg_is_served():
    """Cameras write MPO (several JPEGs in one file); Pillow opens it through the JPEG plugin."""
    buf = io.BytesIO()
    _RGB.save(buf, format="MPO", save_all=True, append_images=[_RGB.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    image = decode_image(buf.getvalue(), formats=SERVED_FORMATS)
    assert image.format == "MPO" and image.size == (30, 20)


def test_unrecognised_bytes_keep_their_message_when_restricted():
    with pytest.raises(ImageDecodeError, match="not a recognised image format; send a JPEG, PNG or WebP") as info:
        decode_image(b"this is not an image at all", formats=SERVED_FORMATS)
    assert type(info.value) is ImageDecodeError and info.value.http_status == 400


def test_unrestricted_decode_still_reads_other_formats():
    for fmt in ("GIF", "BMP", "TIFF"):
        assert decode_image(_png_bytes(_RGB, fmt)).size == (30, 20)


def test_unknown_format_name_is_a_caller_error():
    with pytest.raises(ValueError, match="MPO"):
        decode_image(_png_bytes(_RGB), formats=("JPEG", "MPO"))


def _photo_jpeg(width: int, height: int) -> bytes:
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).resize((width, height)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_jpeg_draft_decodes_a_large_photo_at_a_reduced_scale_with_nearly_the_same_pixels():
    data = _photo_jpeg(1600, 1000)
    full = decode_image(data)
    drafted = decode_image(data, draft_size=224)
    assert full.size == (1600, 1000) and drafted.size == (400, 250)  # 1/4: the smallest scale keeping both >= 224
    plain, draft = Preprocessing(image_size=224), Preprocessing(image_size=224, jpeg_draft=True)
    a = plain.pil_to_uint8(full).astype(np.int16)
    b = draft.pil_to_uint8(drafted).astype(np.int16)
    assert np.abs(a - b).mean() < 4.0  # the DCT-scaled decode, then the same bilinear resize
    small = _photo_jpeg(300, 300)
    assert decode_image(small, draft_size=224).size == (300, 300)  # under 2x the target: the full decode
    png = io.BytesIO()
    full.save(png, "PNG")
    assert decode_image(png.getvalue(), draft_size=224).size == (1600, 1000)  # only JPEG has a DCT to scale


def test_jpeg_draft_is_recorded_and_runs_made_before_it_keep_the_full_decode():
    new = Preprocessing(image_size=224, jpeg_draft=True)
    assert Preprocessing.from_dict(new.to_dict()) == new and new.to_dict()["jpeg_draft"] is True
    old = {k: v for k, v in new.to_dict().items() if k != "jpeg_draft"}
    assert Preprocessing.from_dict(old).jpeg_draft is False and Preprocessing.from_dict(old).draft_size is None


def test_the_served_pixel_limit_follows_the_model_and_counts_a_jpeg_as_drafted():
    """4.2 MP up to 128 px, (16 x side)^2 above, 64 MP at most; a 6000x4000 camera JPEG is 1/8 of that once drafted
    for a 32 px model, so it stays acceptable, while the same pixels in a full decode are refused."""
    from transferkit.preprocess import served_pixel_limit

    assert served_pixel_limit(32) == served_pixel_limit(128) == 2048 * 2048
    assert served_pixel_limit(224) == (16 * 224) ** 2 and served_pixel_limit(1024) == MAX_IMAGE_PIXELS
    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (10, 120, 200)).save(buf, "JPEG", quality=80)
    photo, limit = buf.getvalue(), served_pixel_limit(32)
    drafted = Preprocessing(image_size=32, jpeg_draft=True)
    opened = drafted.open_served(photo, "photo.jpg", limit)
    assert opened.size == (750, 500) and drafted.finish_served(opened, "photo.jpg").shape == (32, 32, 3)
    with pytest.raises(ImageTooLargeError, match="6000x4000 as decoded, over this model's limit"):
        Preprocessing(image_size=32, jpeg_draft=False).open_served(photo, "photo.jpg", limit)
