"""What a /predict request carries, parsed from its body before anything decodes an image.

    multipart/form-data   image=@a.jpg                      one image  -> {"heads": ...}
                          images=@a.jpg images=@b.png ...   a list     -> {"predictions": [{"heads": ...}, ...]}
                          top_k=5 (optional)
    application/json      {"images": ["<base64>", ...], "top_k": 5}   -> {"predictions": [...]}
                          {"image": "<base64>"}                       -> {"heads": ...}
    image/jpeg|png|webp   the file itself as the body, ?top_k=5         -> {"heads": ...}
                          (curl --data-binary @a.jpg -H 'Content-Type: image/jpeg'; what mosec and
                          TorchServe clients send: no framing to parse, no base64)

Every problem is a `ClientError` with its HTTP status and a sentence naming the fix: 415 for another content
type, 413 for a body over the upload limit or more than `max_images` images, 400 for everything malformed.
The body is read here with a running byte count, so an oversized upload is refused while it streams in,
before it is buffered whole.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from transferkit.serving.settings import MAX_TOP_K

HINT = (
    "send multipart/form-data with a file field `image` (or repeated `images`), e.g. "
    'curl -F image=@photo.jpg URL/predict, or JSON {"images": ["<base64>", ...]}'
)
FIELDS = ("image", "images", "top_k")
RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")  # the formats the server decodes (SERVED_FORMATS)
DEFAULT_TOP_K = 5


class ClientError(Exception):
    """A request the client must change: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class PredictInputs:
    images: list[bytes]  # encoded image files, in request order
    top_k: int
    many: bool  # answer a list (`images` / JSON list) rather than one object (`image`)
    names: list[str]  # how each image is named in error messages: image, images[2], ...


# A body must keep arriving: after BODY_GRACE_S, at BODY_MIN_RATE bytes a second on average, or 408. The grace lets a
# client on a poor link stall for a few seconds; a client that sends a byte now and then (slowloris) holds its
# admission slot for about BODY_GRACE_S, not the whole request deadline.
BODY_GRACE_S = 4.0
BODY_MIN_RATE = 64 << 10


async def _next_within(stream: AsyncIterator[bytes], seconds: float) -> bytes:
    """The stream's next chunk, or TimeoutError after `seconds`; asyncio.timeout (3.11+) needs no task per chunk."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await stream.__anext__()
    return await asyncio.wait_for(stream.__anext__(), seconds)


async def read_body(
    chunks: AsyncIterator[bytes],
    content_length: str | None,
    max_bytes: int,
    reserve: Callable[[int], None] | None = None,
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes`, and with 408 when it
    arrives slower than BODY_MIN_RATE after BODY_GRACE_S. `reserve(n)`: called for each chunk's bytes before it
    is kept (the worker's byte budget, batcher.py; it raises Overloaded when full)."""
    too_big = f"request body over the {max_bytes // 2**20} MB upload limit; send smaller or fewer images"
    try:
        declared = int(content_length) if content_length else 0
    except ValueError:
        raise ClientError(400, f"invalid Content-Length header {content_length!r}") from None
    if declared > max_bytes:
        raise ClientError(413, too_big)
    loop = asyncio.get_running_loop()
    start, parts, size = loop.time(), [], 0
    stream = chunks.__aiter__()
    while True:
        allowed = BODY_GRACE_S + size / BODY_MIN_RATE - (loop.time() - start)
        try:
            if allowed <= 0:
                raise TimeoutError
            chunk = await _next_within(stream, allowed)
        except StopAsyncIteration:
            break
        except (TimeoutError, asyncio.TimeoutError):
            raise ClientError(
                408,
                f"the request body arrived too slowly ({size} bytes in {loop.time() - start:.1f} s; at least "
                f"{BODY_MIN_RATE >> 10} KB/s after {BODY_GRACE_S:g} s); send it at once",
            ) from None
        size += len(chunk)
        if size > max_bytes:
            raise ClientError(413, too_big)
        if reserve is not None:
            reserve(len(chunk))
        parts.append(chunk)
    return b"".join(parts)


def parse_top_k(raw: Any) -> int:
    value = None
    if isinstance(raw, int) and not isinstance(raw, bool):  # JSON true/false are not numbers
        value = raw
    elif isinstance(raw, str) and raw.strip().isdigit():
        value = int(raw)
    if value is None or not 1 <= value <= MAX_TOP_K:
        raise ClientError(400, f"top_k must be an integer from 1 to {MAX_TOP_K}, got {str(raw)[:40]!r}")
    return value


def parse_raw(body: bytes, top_k: list[str]) -> PredictInputs:
    """A raw image body; `top_k` is the query string's values (at most one)."""
    if not body:
        raise ClientError(400, f"the request body is empty; send the image file itself as the body, or {HINT}")
    if len(top_k) > 1:
        raise ClientError(400, "top_k given more than once")
    return PredictInputs([body], parse_top_k(top_k[0]) if top_k else DEFAULT_TOP_K, False, ["image"])


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise ClientError(400, f"no image in the request; {HINT}")
    if n > max_images:
        raise ClientError(413, f"{n} images in one request, over the limit of {max_images}; split the request")


def parse_json(body: bytes, max_images: int) -> PredictInputs:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"the JSON body does not parse ({exc}); {HINT}") from None
    except RecursionError:  # Python's parser recurses per level: 100,000 `[` are 200 KB
        raise ClientError(400, f"the JSON body is nested too deeply to parse; {HINT}") from None
    if not isinstance(data, dict):
        raise ClientError(400, f"the JSON body must be an object; {HINT}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ClientError(400, f"unknown JSON field(s) {unknown}; /predict takes {list(FIELDS)}")
    if ("image" in data) == ("images" in data):
        raise ClientError(400, f"send exactly one of `image` (one base64 string) or `images` (a list); {HINT}")
    many = "images" in data
    items = data["images"] if many else [data["image"]]
    if not isinstance(items, list):
        raise ClientError(400, "`images` must be a list of base64 strings")
    _check_count(len(items), max_images)
    names = [f"images[{i}]" if many else "image" for i in range(len(items))]
    images = [_b64decode(item, name) for item, name in zip(items, names)]
    top_k = parse_top_k(data["top_k"]) if "top_k" in data else DEFAULT_TOP_K
    return PredictInputs(images, top_k, many, names)


def _b64decode(item: Any, name: str) -> bytes:
    if not isinstance(item, str):
        raise ClientError(400, f"{name} must be a base64 string, got {type(item).__name__}")
    if item.startswith("data:") and "," in item:  # a data URI: data:image/png;base64,....
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"{name} is not valid base64") from None


async def parse_multipart(form_parser: Any, max_images: int) -> PredictInputs:
    """`form_parser` is an awaitable-returning callable giving a Starlette FormData (Request.form)."""
    from starlette.datastructures import UploadFile

    try:
        form = await form_parser(max_files=max_images + 1, max_fields=len(FIELDS) + max_images)
    except Exception as exc:  # noqa: BLE001 - malformed framing, too many parts: python-multipart's many errors
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        if "too many files" in detail.lower():  # Starlette stops at max_files: too many images is always 413
            raise ClientError(
                413, f"more than {max_images} images in one request, over the limit; split the request"
            ) from None
        raise ClientError(400, f"could not parse the multipart body ({detail}); {HINT}") from None
    try:
        unknown = sorted(set(form.keys()) - set(FIELDS))
        if unknown:
            raise ClientError(400, f"unknown form field(s) {unknown}; /predict takes {list(FIELDS)}; {HINT}")
        single, listed = form.getlist("image"), form.getlist("images")
        if single and listed:
            raise ClientError(400, "send either `image` (one file) or `images` (several), not both")
        if len(single) > 1:
            raise ClientError(
                400,
                f"{len(single)} `image` fields; send one image per `image` field, or use "
                "the repeated `images` field for several",
            )
        many = bool(listed)
        files = listed if many else single
        _check_count(len(files), max_images)
        names = [f"images[{i}]" if many else "image" for i in range(len(files))]
        images = []
        for value, name in zip(files, names):
            if not isinstance(value, UploadFile):
                raise ClientError(400, f"form field {name} must be a file upload, not text; {HINT}")
            images.append(await value.read())
        top_values = form.getlist("top_k")
        if len(top_values) > 1:
            raise ClientError(400, "top_k given more than once")
        if top_values and not isinstance(top_values[0], str):
            raise ClientError(400, "top_k must be a text field, not a file")
        top_k = parse_top_k(top_values[0]) if top_values else DEFAULT_TOP_K
        return PredictInputs(images, top_k, many, names)
    finally:
        await form.close()
