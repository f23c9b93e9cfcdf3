"""The Open Inference Protocol's routes (v2_routes.py) in the OpenAPI document at /docs.json.

The schemas say what the server checks and no more: an OpenAPI-driven fuzzer sends requests that break them
and expects a 4xx for each, so a rule written here that the server does not enforce is a failing test, and a
rule the server enforces beyond them (which input names exist, shapes that match) is said in the descriptions.
The model name and version are enumerated, so generated requests reach the real model as well as unknown ones.
"""

from __future__ import annotations

from typing import Any

from transferkit.serving.settings import MAX_TOP_K, MAX_UPLOAD_BYTES, ServingSettings
from transferkit.serving.v2_tensors import DATATYPES

ERROR = {"$ref": "#/components/schemas/Error"}
JSON_ERROR = {"content": {"application/json": {"schema": ERROR}}}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
        "data": {"description": "row-major elements, flat or nested; BYTES elements are base64 strings"},
    },
}
_REQUESTED_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data": {"type": "boolean"},
                "classification": {"type": "integer", "minimum": 0},
            },
        },
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 5},
                "binary_data_output": {"type": "boolean"},
            },
        },
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {"type": "array", "items": _REQUESTED_OUTPUT},
    },
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": _TENSOR},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "versions", "platform", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}
_STATUSES = {
    "400": "Malformed request: JSON, tensor shape or datatype, base64, binary sizes, an unknown input or output, or "
    "an empty, corrupt or truncated image",
    "401": "API key required (`Authorization: Bearer <key>`) and missing or wrong; only when the server has a key",
    "404": "Unknown model name or version",
    "408": "The request body arrived too slowly (under 64 KB/s after 4 s); send it at once",
    "413": "Body over the upload limit (also once decompressed), an image over the pixel limit, or too many images",
    "415": "An image other than JPEG, PNG or WebP, or a Content-Encoding other than gzip or deflate",
    "500": "Unexpected server error; the message names the request id under which the server logged it",
    "503": "The worker is at capacity, or shutting down; retry after the number of seconds in Retry-After",
    "504": "Not answered within the server's request deadline",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(settings: ServingSettings, codes: list[str]) -> dict[str, Any]:
    return {c: {"description": _STATUSES[c], **JSON_ERROR} for c in codes if c != "401" or settings.api_key}


def _operation(op_id: str, summary: str, responses: dict[str, Any], secured: bool, settings: ServingSettings) -> dict:
    operation = {"tags": ["Open Inference Protocol (v2)"], "operationId": op_id, "summary": summary}
    operation["responses"] = responses
    if secured and settings.api_key:
        operation["security"] = [{"bearer": []}]
    return operation


def _path_params(names: list[str], versions: list[str] | None) -> list[dict[str, Any]]:
    params = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}]
    if versions is not None:
        params.append(
            {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "enum": versions}}
        )
    return params


def v2_paths(settings: ServingSettings, names: list[str], versions: list[str]) -> dict[str, Any]:
    """The paths of the v2 routes for the models `names`, served in `versions` (the repository's, all models')."""
    health = {"type": "object", "properties": {"live": {"type": "boolean"}, "ready": {"type": "boolean"}}}
    server = {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "extensions": {"type": "array"}},
    }
    not_ready = {"description": "not ready: loading or shutting down", **JSON_ERROR}
    paths: dict[str, Any] = {
        "/v2": {
            "get": _operation("v2_server_metadata", "Server metadata", {"200": _json(server, "name")}, False, settings)
        },
        "/v2/health/live": {"get": _operation("v2_live", "Liveness", {"200": _json(health, "live")}, False, settings)},
        "/v2/health/ready": {
            "get": _operation(
                "v2_ready", "Readiness", {"200": _json(health, "ready"), "400": not_ready}, False, settings
            )
        },
    }
    infer_body = {
        "required": True,
        "description": (
            "One input: `image` (BYTES [N]: encoded JPEG/PNG/WebP files, base64 in JSON) or `tensor` (FP32 "
            "[N,3,S,S], preprocessed as the model metadata's shape says). With the binary tensor data "
            "extension the JSON is followed by the tensors' bytes and its length is in the "
            f"Inference-Header-Content-Length header. The body at most {MAX_UPLOAD_BYTES // 2**20} MB."
        ),
        "content": {
            "application/json": {"schema": _INFER_REQUEST},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    infer_ok = {
        "description": "per head: logits, top-k labels and scores (binary outputs after the JSON when asked for)",
        "content": {
            "application/json": {"schema": _INFER_RESPONSE},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    infer_errors = _errors(settings, ["400", "401", "404", "408", "413", "415", "500", "503", "504"])
    infer_errors["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    for base, v in (("/v2/models/{name}", None), ("/v2/models/{name}/versions/{version}", versions)):
        params, suffix = _path_params(names, v), "" if v is None else "_version"
        model_errors = _errors(settings, ["401", "404"])
        metadata = _operation(
            f"v2_model_metadata{suffix}",
            "Model metadata",
            {"200": _json(_METADATA, "inputs and outputs"), **model_errors},
            True,
            settings,
        )
        ready = _operation(
            f"v2_model_ready{suffix}",
            "Model readiness",
            {"200": _json(health, "ready"), "400": not_ready, **_errors(settings, ["404"])},
            False,
            settings,
        )
        config = _operation(
            f"v2_model_config{suffix}",
            "Triton model configuration",
            {"200": _json({"type": "object"}, "configuration"), **model_errors},
            True,
            settings,
        )
        infer = _operation(f"v2_infer{suffix}", "Inference", {"200": infer_ok, **infer_errors}, True, settings)
        infer["requestBody"] = infer_body
        for op in (metadata, ready, config, infer):
            op["parameters"] = params
        paths[base] = {"get": metadata}
        paths[base + "/ready"] = {"get": ready}
        paths[base + "/config"] = {"get": config}
        paths[base + "/infer"] = {"post": infer}
    paths.update(_repository_paths(settings, names))
    return paths


def _repository_paths(settings: ServingSettings, names: list[str]) -> dict[str, Any]:
    """Triton's model repository extension (repository_routes.py)."""
    row = {
        "type": "object",
        "required": ["name", "version", "state"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "state": {"type": "string", "enum": ["READY", "UNAVAILABLE"]},
            "reason": {"type": "string"},
            "default": {"type": "boolean"},
            "traffic": {"type": "number"},
        },
    }
    index = _operation(
        "v2_repository_index",
        "Every model version and its state",
        {"200": _json({"type": "array", "items": row}, "the versions"), **_errors(settings, ["400", "401"])},
        True,
        settings,
    )
    index["requestBody"] = {
        "required": False,
        "content": {"application/json": {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}},
    }
    parameters = {
        "type": "object",
        "properties": {
            "version": {"type": ["string", "null"], "description": "the version to serve by default (a rollback)"},
            "split": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
            "config": {"type": "string", "description": "Triton's model configuration, as JSON"},
        },
    }
    changes = {}
    for action, summary in (("load", "Load a model's versions, choose its default or split"), ("unload", "Unload")):
        op = _operation(
            f"v2_repository_{action}",
            summary,
            {"200": _json({"type": "object"}, "applied in every worker"), **_errors(settings, ["400", "401", "503"])},
            True,
            settings,
        )
        op["parameters"] = _path_params(names, None)
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": {"type": "object", "properties": {"parameters": parameters}}}},
        }
        changes[f"/v2/repository/models/{{name}}/{action}"] = {"post": op}
    return {"/v2/repository/index": {"post": index}, **changes}
