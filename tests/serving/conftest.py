"""Fixtures for serving tests: the exported tiny run, real test images, the service behind an ASGI client."""

from __future__ import annotations

import importlib
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image


def concurrent_posts(url: str, n: int, data: bytes, headers: dict | None = None) -> list[tuple[object, float]]:
    """n POST /predict at once, one connection each (as n independent clients would) -> (response, seconds)."""
    import asyncio
    import time

    import httpx

    async def run() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60, headers=headers) as client:

            async def one() -> tuple[httpx.Response, float]:
                start = time.perf_counter()
                response = await client.post(url + "/predict", files={"image": ("d.png", data)})
                return response, time.perf_counter() - start

            return await asyncio.gather(*(one() for _ in range(n)))

    return asyncio.run(run())


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture(scope="session")
def images() -> dict[str, bytes]:
    """Real pictures: scikit-learn's china.jpg photo (as JPEG and WebP) and a handwritten digit (PNG)."""
    from sklearn.datasets import load_digits, load_sample_images

    china = Image.fromarray(load_sample_images().images[0])
    digit = Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8), mode="L").resize((64, 64))
    return {
        "china.jpg": encode(china, "JPEG", quality=90),
        "china.webp": encode(china, "WEBP"),
        "digit.png": encode(digit, "PNG"),
    }


@pytest.fixture(scope="session")
def service_class(exported):
    """transferkit.serving.service:TransferkitService for the exported run (the module reads the tag at import)."""
    os.environ["TRANSFERKIT_MODEL"] = exported[1].bentoml_tag
    if "transferkit.serving.service" in sys.modules:
        module = importlib.reload(sys.modules["transferkit.serving.service"])
    else:
        module = importlib.import_module("transferkit.serving.service")
    yield module.TransferkitService
    os.environ.pop("TRANSFERKIT_MODEL", None)


@pytest.fixture(scope="session")
def client(service_class):
    """The service's ASGI app in-process (lifespan runs, so the model loads once)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # starlette's "use httpx2" notice; httpx is what BentoML ships with
        from starlette.testclient import TestClient

    with TestClient(service_class.to_asgi()) as c:
        yield c
