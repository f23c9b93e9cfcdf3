"""The OpenAPI document served at /docs.json: BentoML's (infrastructure routes), the v2 routes (v2_openapi.py)
and /predict, described
exactly: both request encodings, both answer shapes, and every status code with the JSON error body.

/predict is a mounted Starlette route (http_app.py), which BentoML cannot describe by itself; this module is
the one place that does, so a change to the route's inputs or answers belongs here too. The document is
checked by an OpenAPI-driven fuzzer in the tests.
"""

from __future__ import annotations

import copy
from typing import Any

from transferkit.serving.inputs import RAW_IMAGE_TYPES
from transferkit.serving.settings import MAX_TOP_K, MAX_UPLOAD_BYTES, ServingSettings
from transferkit.serving.v2_openapi import v2_paths

ERROR = {"$ref": "#/components/schemas/Error"}
_STATUSES = {
    "400": "Malformed request: missing or unknown field, bad top_k, invalid base64, or an empty, corrupt or "
    "truncated image",
    "401": "API key required (`Authorization: Bearer <key>`) and missing or wrong; only when the server has a key",
    "408": "The request body arrived too slowly (under 64 KB/s after 4 s); send it at once",
    "413": "Request body over the upload limit, an image over the pixel limit, or more images than the limit",
    "415": "Body neither multipart/form-data, application/json nor a raw image/jpeg, image/png or image/webp "
    "body, or an image that is not JPEG, PNG or WebP",
    "500": "Unexpected server error; the message names the request id under which the server logged it",
    "503": "The worker is at capacity, or shutting down (then with `Connection: close`); retry after the number "
    "of seconds in Retry-After",
    "504": "Not answered within the server's request deadline",
}


def _schemas(settings: ServingSettings) -> dict[str, Any]:
    label = {
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"type": "string"}, "score": {"type": "number", "minimum": 0, "maximum": 1}},
    }
    heads = {
        "type": "object",
        "description": "head name -> labels, most likely first",
        "additionalProperties": {"type": "array", "items": label},
    }
    meta = {
        "model": {"type": "string", "description": "BentoML model tag"},
        "runtime": {"type": "string", "description": "the engine that ran the model"},
    }
    return {
        "Prediction": {
            "type": "object",
            "required": ["heads", "model", "runtime"],
            "properties": {"heads": heads, **meta},
        },
        "PredictionList": {
            "type": "object",
            "required": ["predictions", "model", "runtime"],
            "properties": {
                "predictions": {
                    "type": "array",
                    "items": {"type": "object", "required": ["heads"], "properties": {"heads": heads}},
                },
                **meta,
            },
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "what is wrong and how to fix it"},
                "request_id": {"type": "string", "description": "also in the X-Request-ID header and the server log"},
                "detail": {"description": "extra detail, when there is any"},
            },
        },
    }


def _predict_operation(settings: ServingSettings) -> dict[str, Any]:
    top_k = {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 5}
    # No minItems on the multipart list: an empty list is no field at all there (the request is then refused
    # for having no image, whatever the schema says).
    many = {"type": "array", "maxItems": settings.max_images}
    # "Exactly one of image/images" is said in the description, not as a oneOf of `required` lists: fuzzers
    # negate such a oneOf branch by branch and report valid requests as invalid ones that were accepted.
    # Unknown fields are refused (400) in both encodings; only the JSON schema says so with additionalProperties,
    # because a fuzzer's extra multipart field can vanish in serialisation, turning its "invalid" case valid.
    multipart = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "one JPEG, PNG or WebP file"},
            "images": {
                **many,
                "items": {"type": "string", "format": "binary"},
                "description": "several files (repeat the field); answered as a list, in order",
            },
            "top_k": top_k,
        },
    }
    as_json = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "byte", "minLength": 1, "description": "one base64-encoded file"},
            "images": {
                **many,
                "minItems": 1,
                "items": {"type": "string", "format": "byte", "minLength": 1},
                "description": "base64-encoded files",
            },
            "top_k": top_k,
        },
    }
    raw = {
        "type": "string",
        "format": "binary",
        "minLength": 1,
        "description": "the image file itself (curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg')",
    }
    answer = {"oneOf": [{"$ref": "#/components/schemas/Prediction"}, {"$ref": "#/components/schemas/PredictionList"}]}
    responses: dict[str, Any] = {
        "200": {
            "description": "top-k labels per head: one object for `image`, a list for `images`",
            "content": {"application/json": {"schema": answer}},
        }
    }
    for status, text in _STATUSES.items():
        if status == "401" and not settings.api_key:
            continue
        responses[status] = {"description": text, "content": {"application/json": {"schema": ERROR}}}
    responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    operation = {
        "tags": ["Service APIs"],
        "operationId": "transferkit__predict",
        "summary": "Classify images: top-k labels per head",
        "description": (
            f"Send exactly one of `image` or `images` (up to {settings.max_images}), or one image "
            f"as the raw body; the whole body at most {MAX_UPLOAD_BYTES // 2**20} MB; JPEG, PNG or "
            "WebP only."
        ),
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "required": False,
                "schema": top_k,
                "description": "for a raw image body only (the other encodings carry top_k inside)",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/json": {"schema": as_json},
                **{kind: {"schema": raw} for kind in RAW_IMAGE_TYPES},
            },
        },
        "responses": responses,
    }
    if settings.api_key:
        operation["security"] = [{"bearer": []}]
    return operation


def document(
    bentoml_spec: dict[str, Any], settings: ServingSettings, names: list[str], versions: list[str]
) -> dict[str, Any]:
    """BentoML's spec for the service, completed with /predict, the v2 routes for the models `names` (in
    `versions`) and the error schema."""
    spec = copy.deepcopy(bentoml_spec)
    spec["info"] = {
        **spec.get("info", {}),
        "title": "transferkit",
        "description": "Image classification: one backbone, one head per label space.",
    }
    spec["info"].pop("contact", None)
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {}).update(_schemas(settings))
    if settings.api_key:
        components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    paths = spec.setdefault("paths", {})
    paths["/predict"] = {"post": _predict_operation(settings)}
    by_name = _predict_operation(settings)
    by_name["operationId"] = "predict_model"
    by_name["responses"] = {
        **by_name["responses"],
        "404": {
            "description": "a model or version this server does not serve",
            "content": {"application/json": {"schema": ERROR}},
        },
    }
    by_name["parameters"] = [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}
    ]
    by_version = {**by_name, "operationId": "predict_model_version"}
    by_version["parameters"] = [
        *by_name["parameters"],
        {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": versions}},
    ]
    paths["/predict/{name}"] = {"post": by_name}
    paths["/predict/{name}/versions/{version}"] = {"post": by_version}
    paths.update(v2_paths(settings, names, versions))
    ready = paths.get("/readyz", {}).get("get")
    if ready is not None:  # 503 until the model has loaded and run once
        ready.setdefault("responses", {})["503"] = {"description": "not ready yet (the model is loading)"}
    return spec
