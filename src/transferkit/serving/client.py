"""HTTP client for a running transferkit server: `predict_files(["a.jpg"], url)` -> the server's answers."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError

DEFAULT_URL = "http://127.0.0.1:3000"


def _server_message(response: Any) -> str:
    """The error text of a 4xx/5xx answer: {"error": ...}, BentoML's [{"error": ...}], or the raw body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, dict) and "error" in body:
        detail = body.get("detail")
        if isinstance(detail, list) and detail:  # pydantic validation errors: name the field
            parts = [f"{'.'.join(str(x) for x in d.get('loc', []))}: {d.get('msg')}" for d in detail]
            return f"{body['error']} ({'; '.join(parts)})"
        return str(body["error"])
    return str(body)[:500]


def predict_files(
    paths: list[str | Path], url: str = DEFAULT_URL, top_k: int = 5, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """POST each image to URL/predict -> one answer per file, with "file" added.

    Raises TransferkitError for a missing file, an unreachable server, or a 4xx/5xx answer (quoting the
    server's message).
    """
    import httpx

    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise TransferkitError(f"{p}: no such file")
    results = []
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout) as client:
        for p in files:
            mime = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
            try:
                response = client.post(
                    "/predict", files={"image": (p.name, p.read_bytes(), mime)}, data={"top_k": str(top_k)}
                )
            except httpx.TransportError as exc:
                raise TransferkitError(
                    f"cannot reach the server at {url} ({type(exc).__name__}: {exc}); "
                    "start it with `transferkit serve RUN` or pass --url"
                ) from None
            if response.status_code >= 400:
                raise TransferkitError(f"{p}: the server answered {response.status_code}: {_server_message(response)}")
            results.append({"file": str(p), **response.json()})
    return results


def format_predictions(results: list[dict[str, Any]]) -> str:
    """Human-readable lines: file, then per head the labels with scores."""
    lines = []
    for r in results:
        lines.append(f"{r['file']}  (model {r.get('model')}, {r.get('runtime')})")
        for head, preds in r["heads"].items():
            top = ", ".join(f"{p['label']} {p['score']:.3f}" for p in preds)
            lines.append(f"  {head}: {top}")
    return "\n".join(lines)
