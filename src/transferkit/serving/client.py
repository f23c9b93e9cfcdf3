"""HTTP client for a running transferkit server (`transferkit predict`): `predict_files(["a.jpg"], url)` -> the
server's answers; folders and globs expanded, the API key sent, several requests at once, answers to a file."""

from __future__ import annotations

import csv
import glob
import io
import json
import mimetypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.utils import atomic_write_text, csv_cell

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


def expand_images(specs: list[str]) -> list[Path]:
    """IMAGE arguments -> files, in order: a file as given, a folder's images (recursive; the suffixes /predict
    decodes), a quoted glob's files. A folder or glob that finds nothing, or a missing path, is an error."""
    from transferkit.preprocess import SERVED_SUFFIXES
    from transferkit.utils import walk_files

    out: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = [Path(p) for p in walk_files(path, SERVED_SUFFIXES)]
            if not found:
                raise TransferkitError(f"{spec}: no {' '.join(SERVED_SUFFIXES)} images in this folder")
        elif path.is_file():
            found = [path]
        elif set("*?[") & set(spec):
            found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(spec), recursive=True)) if os.path.isfile(p)]
            if not found:
                raise TransferkitError(f"{spec}: the pattern matches no file")
        else:
            raise TransferkitError(f"{spec}: no such file or folder")
        out.extend(found)
    return out


def api_key_from(path: str | Path | None = None) -> str | None:
    """The key for a server that requires one: `path`, else $TRANSFERKIT_API_KEY, else $TRANSFERKIT_API_KEY_FILE;
    where these hold several keys (a rotation, serving/keys.py) the first."""
    from transferkit.serving.keys import parse_keys
    from transferkit.serving.settings import API_KEY_ENV, API_KEY_FILE_ENV, read_api_key_file

    if path is not None:
        text = read_api_key_file(path)
    elif os.environ.get(API_KEY_ENV, "").strip():
        text = os.environ[API_KEY_ENV]
    elif os.environ.get(API_KEY_FILE_ENV):
        text = read_api_key_file(os.environ[API_KEY_FILE_ENV])
    else:
        return None
    return parse_keys(text)[0]


def predict_files(
    paths: list[str | Path],
    url: str = DEFAULT_URL,
    top_k: int = 5,
    timeout: float = 60.0,
    *,
    api_key: str | None = None,
    concurrency: int = 1,
    errors: str = "raise",
    model: str | None = None,
    version: str | None = None,
) -> list[dict[str, Any]]:
    """POST each image to URL/predict, `concurrency` at a time -> one answer per file, in order, with "file"
    added. `model` (and `version`): which of a server's models answers (the headers X-Model, X-Model-Version).

    Raises TransferkitError for a missing file, an unreachable server or a refused key. A file the server
    answers with another 4xx/5xx raises too (quoting the server's message), or, with errors="record", becomes
    {"file", "status", "error"} and the rest go on.
    """
    import httpx

    if concurrency < 1:
        raise TransferkitError(f"--concurrency must be >= 1, got {concurrency}")
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise TransferkitError(f"{p}: no such file")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    headers.update({k: v for k, v in (("X-Model", model), ("X-Model-Version", version)) if v})

    def one(client: Any, p: Path) -> dict[str, Any]:
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
        if response.status_code == 401:
            hint = "the key was refused" if api_key else "it requires an API key"
            raise TransferkitError(
                f"the server at {url} answered 401: {hint}; pass --api-key-file PATH or set $TRANSFERKIT_API_KEY"
            )
        if response.status_code >= 400:
            message = f"the server answered {response.status_code}: {_server_message(response)}"
            if errors == "raise":
                raise TransferkitError(f"{p}: {message}")
            return {"file": str(p), "status": response.status_code, "error": message}
        return {"file": str(p), **response.json()}

    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers) as client:
        if concurrency == 1 or len(files) == 1:
            return [one(client, p) for p in files]
        with ThreadPoolExecutor(min(concurrency, len(files))) as pool:  # httpx.Client is safe across threads
            return list(pool.map(lambda p: one(client, p), files))


OUT_SUFFIXES = (".jsonl", ".csv")


def check_out(out: str | Path) -> Path:
    """The --out path, or an error when its suffix names no format write_results writes."""
    if Path(out).suffix.lower() not in OUT_SUFFIXES:
        raise TransferkitError(f"--out {out}: the suffix picks the format; use .jsonl or .csv")
    return Path(out)


def write_results(results: list[dict[str, Any]], out: str | Path) -> Path:
    """The answers as .jsonl (one object per line, as the server gave it) or .csv (per head: top-1 label, its
    score, and the top-k labels joined by ';'), written atomically."""
    out = check_out(out)
    if out.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in results)
    else:  # .csv
        heads = next((list(r["heads"]) for r in results if "heads" in r), [])
        columns = ["file", "error"] + [f"{h}_{c}" for h in heads for c in ("top1", "score", "labels")]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        for r in results:
            row = {"file": r["file"], "error": r.get("error", "")}
            for h, preds in r.get("heads", {}).items():
                if preds:
                    row.update(
                        {
                            f"{h}_top1": preds[0]["label"],
                            f"{h}_score": preds[0]["score"],
                            f"{h}_labels": ";".join(p["label"] for p in preds),
                        }
                    )
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
        text = buffer.getvalue()
    atomic_write_text(out, text)
    return out


def format_predictions(results: list[dict[str, Any]]) -> str:
    """Human-readable lines: file, then per head the labels with scores."""
    lines = []
    for r in results:
        lines.append(f"{r['file']}  (model {r.get('model')}, {r.get('runtime')})")
        for head, preds in r["heads"].items():
            top = ", ".join(f"{p['label']} {p['score']:.3f}" for p in preds)
            lines.append(f"  {head}: {top}")
    return "\n".join(lines)
