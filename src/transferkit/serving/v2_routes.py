"""The Open Inference Protocol (KServe v2 REST, the same as Triton's HTTP API) beside /predict, so clients,
dashboards and load tools written for Triton, KServe or OpenVINO Model Server work unchanged:

    GET  /v2                                   server name, version, extensions
    GET  /v2/health/live, /v2/health/ready     200, or 400 while loading or shutting down (the spec's 4xx)
    GET  /v2/models/{name}[/versions/{v}]      inputs and outputs, -1 for the batch
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config   Triton's model configuration (max_batch_size, input, output)
    POST /v2/models/{name}[/versions/{v}]/infer
    POST /v2/repository/index, /v2/repository/models/{name}/load|unload   (repository_routes.py)

A server serves one or more models, each in one or more versions (repository.py); a route without a version
gets the model's default version (or the draw of its traffic split), and every answer names the version.
By default the name is the BentoML model's name and the version its tag's version (`transferkit-mnist:abc` ->
name transferkit-mnist, version abc). Inputs (send one): `image` BYTES [N] of encoded JPEG/PNG/WebP files, or
`tensor` FP32 [N,3,S,S] already preprocessed as the manifest's preprocessing says. Outputs per head h:
`h.logits` FP32 [N,C], `h.labels` BYTES [N,k] and `h.scores` FP32 [N,k] (softmax, best first; k is the
request parameter `top_k`, default 5). Triton's classification extension works on `h.logits`
(`"classification": n` -> "logit:index:label" strings, as Triton formats them).

Infer runs through guard.py like /predict: one batcher, admission (503 + Retry-After), deadline (504), API
key, body and pixel limits. The key also guards model metadata and config; health and readiness stay open
for probes. Errors are {"error": "..."} with the status the spec's clients read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from transferkit.serving import repository_routes
from transferkit.serving.guard import authorized, error, guarded, request_id, unauthorized
from transferkit.serving.inputs import ClientError, read_body
from transferkit.serving.repository import LOGITS, RANKED
from transferkit.serving.settings import MAX_TOP_K, MAX_UPLOAD_BYTES
from transferkit.serving.v2_tensors import HEADER_LENGTH, OutputTensor, decompress, encode_response, parse_request
from transferkit.version import __version__

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository"]
IMAGE, TENSOR = "image", "tensor"
OUTPUT_KINDS = ("logits", "labels", "scores")
LARGE_BODY = 256 << 10  # parsed in a thread from this size: JSON tensors take milliseconds
INLINE_ENCODE_ROWS = 64  # images x outputs encoded on the event loop; a larger answer is encoded in a thread
DEFAULT_TOP_K = 5


def _service() -> Any:
    import bentoml

    return bentoml.get_current_service()


def model_id(model: Any) -> tuple[str, str]:
    """A served version's (name, version), as the protocol names them."""
    return model.name, model.version


def _pick(service: Any, name: str, version: str | None) -> Any:
    """The served version a route names (version None or "": the default, or the split's draw)."""
    return service.repository.pick(name, version or None)


def output_names(model: Any) -> list[str]:
    return [f"{head}.{kind}" for head in model.labels for kind in OUTPUT_KINDS]


def model_metadata(model: Any, service: Any) -> dict[str, Any]:
    name = model.name
    entry = service.repository.models.get(name)
    versions = list(entry.versions) if entry is not None else [model.version]
    s = model.pre.image_size
    outputs = []
    for head, classes in model.labels.items():
        outputs += [
            {"name": f"{head}.logits", "datatype": "FP32", "shape": [-1, len(classes)]},
            {"name": f"{head}.labels", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": f"{head}.scores", "datatype": "FP32", "shape": [-1, -1]},
        ]
    return {
        "name": name,
        "versions": versions,
        "platform": f"transferkit_{model.runtime.name}",
        "inputs": [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR, "datatype": "FP32", "shape": [-1, 3, s, s]},
        ],
        "outputs": outputs,
    }


def model_config(model: Any, service: Any) -> dict[str, Any]:
    """Triton's configuration JSON: dims without the batch axis (max_batch_size > 0); `image` is one string per
    batch item, which Triton writes as dims [1] reshaped to []."""
    meta = model_metadata(model, service)
    types = {"FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}
    settings = service.settings
    return {
        "name": meta["name"],
        "platform": meta["platform"],
        "backend": "transferkit",
        "version_policy": {"specific": {"versions": meta["versions"]}},
        "max_batch_size": settings.max_images,
        "input": [
            {"name": IMAGE, "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}, "optional": True},
            {"name": TENSOR, "data_type": "TYPE_FP32", "dims": meta["inputs"][1]["shape"][1:], "optional": True},
        ],
        "output": [
            {"name": o["name"], "data_type": types[o["datatype"]], "dims": o["shape"][1:]} for o in meta["outputs"]
        ],
        "dynamic_batching": {
            "preferred_batch_size": [settings.max_batch],
            "max_queue_delay_microseconds": int(settings.max_wait_ms * 1000),
        },
        "instance_group": [{"count": settings.resolved_workers, "kind": "KIND_CPU"}],
    }


# ---- GET routes ------------------------------------------------------------------------------------------
def _ready(service: Any) -> bool:
    return service.ready and not service.drain.draining


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "transferkit", "version": __version__, "extensions": EXTENSIONS})


# Health answers carry {"live"/"ready": true} as KServe's own server does (its client reads the body; Triton's
# reads the status only).
async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    return _readiness(_service(), request_id(request))


def _readiness(service: Any, rid: str) -> Response:
    if _ready(service):
        return JSONResponse({"ready": True})
    return error(400, "not ready: the model is loading or the server is shutting down", rid)


def _model_route(build: Any, needs_key: bool = True) -> Any:
    """A GET under /v2/models/{name}[/versions/{version}]: the model found, then `build(model, service, rid)`."""

    async def route(request: Request) -> Response:
        service, rid = _service(), request_id(request)
        if needs_key and not authorized(request, service):
            return unauthorized(rid)
        try:
            model = _pick(service, request.path_params["name"], request.path_params.get("version"))
        except ClientError as exc:
            return error(exc.status, str(exc), rid)
        return build(model, service, rid)

    return route


def routes() -> list[Route]:
    metadata = _model_route(lambda model, service, rid: JSONResponse(model_metadata(model, service)))
    config = _model_route(lambda model, service, rid: JSONResponse(model_config(model, service)))
    model_ready = _model_route(lambda model, service, rid: _readiness(service, rid), needs_key=False)
    out = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        out += [
            Route(base, metadata, methods=["GET"]),
            Route(base + "/ready", model_ready, methods=["GET"]),
            Route(base + "/config", config, methods=["GET"]),
            Route(base + "/infer", infer, methods=["POST"]),
        ]
    return out + repository_routes.routes()


# ---- infer -----------------------------------------------------------------------------------------------
async def infer(request: Request) -> Response:
    return await infer_path(request, request.url.path)


async def infer_path(request: Request, path: str) -> Response:
    """POST /v2/models/{name}[/versions/{v}]/infer; `path` is the request's (the fast path has it at hand)."""
    parts = path.split("/")  # "", "v2", "models", name, ["versions", v,] "infer"
    if len(parts) == 5:
        name, version = parts[3], None
    elif len(parts) == 7 and parts[4] == "versions":
        name, version = parts[3], parts[5]
    else:
        return error(404, f"no such route {path}; POST /v2/models/<name>[/versions/<v>]/infer", request_id(request))

    async def work(request: Request, service: Any, admission: Any, rid: str) -> Response:
        with _pick(service, name, version).in_use() as model:
            return await _infer(request, service, admission, rid, model)

    return await guarded(request, _service(), work)


async def _infer(request: Request, service: Any, admission: Any, rid: str, model: Any) -> Response:
    headers = request.headers
    body = await read_body(request.stream(), headers.get("content-length"), MAX_UPLOAD_BYTES, admission.add_bytes)
    encoding = headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":  # up to 20 MB inflated: off the loop, at low priority
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(service.bulk_pool, decompress, body, encoding, MAX_UPLOAD_BYTES)
        admission.add_bytes(len(body))  # the inflated copy is memory this request holds too
    header_length = headers.get(HEADER_LENGTH)
    if len(body) < LARGE_BODY:
        parsed = parse_request(body, header_length, service.settings.max_images)
    else:
        parsed = await asyncio.to_thread(parse_request, body, header_length, service.settings.max_images)
    if len(parsed.inputs) != 1 or parsed.inputs[0].name not in (IMAGE, TENSOR):
        names = [t.name for t in parsed.inputs]
        raise ClientError(400, f"send one input, {IMAGE!r} (BYTES: encoded images) or {TENSOR!r} (FP32), got {names}")
    tensor = parsed.inputs[0]
    batch = _images(tensor, service) if tensor.name == IMAGE else _tensor(tensor, service, model)
    top_k = _top_k(parsed.parameters)
    wanted = _wanted(parsed.outputs, model)
    admission.add(batch.count - 1)
    if batch.images is not None:
        pixels = await service.decode(batch.images, batch.names, admission, model)
    else:
        pixels = batch.array
    answer = await service.infer(pixels, model, rid)
    outputs = [(_output(name, answer, model, top_k, classification), binary) for name, binary, classification in wanted]
    service.count_model_answer(model)
    header: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
    if parsed.id is not None:
        header["id"] = parsed.id
    if batch.count * len(outputs) > INLINE_ENCODE_ROWS:  # a large answer is encoded off the event loop
        content, json_length = await asyncio.to_thread(encode_response, header, outputs)
    else:
        content, json_length = encode_response(header, outputs)
    out_headers = {"X-Request-ID": rid, "X-Model-Version": model.version}
    if json_length is None:
        return Response(content, media_type="application/json", headers=out_headers)
    out_headers["Inference-Header-Content-Length"] = str(json_length)
    return Response(content, media_type="application/octet-stream", headers=out_headers)


class _Batch:
    __slots__ = ("count", "images", "names", "array")

    def __init__(self, count: int, images: list[bytes] | None = None, array: np.ndarray | None = None) -> None:
        self.count, self.images, self.array = count, images, array
        self.names = [f"{IMAGE}[{i}]" for i in range(count)] if images is not None else []


def _check_count(n: int, service: Any) -> None:
    if n == 0:
        raise ClientError(400, "the input holds no image; its first dimension is the number of images")
    if n > service.settings.max_images:
        raise ClientError(413, f"{n} images in one request, over the limit of {service.settings.max_images}; split it")


def _images(tensor: Any, service: Any) -> _Batch:
    if (
        tensor.datatype != "BYTES"
        or len(tensor.shape) not in (1, 2)
        or (len(tensor.shape) == 2 and tensor.shape[1] != 1)
    ):
        raise ClientError(400, f"input {IMAGE!r} is BYTES with shape [N] (or [N,1]): one encoded image per element")
    _check_count(len(tensor.value), service)
    return _Batch(len(tensor.value), images=list(tensor.value))


def _tensor(tensor: Any, service: Any, model: Any) -> _Batch:
    s = model.pre.image_size
    if tensor.datatype != "FP32" or len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != (3, s, s):
        raise ClientError(
            400,
            f"input {TENSOR!r} is FP32 with shape [N,3,{s},{s}], normalised as GET /v2/models/<name> says; "
            f"got {tensor.datatype} {list(tensor.shape)}",
        )
    _check_count(tensor.shape[0], service)
    array = np.ascontiguousarray(tensor.value, np.float32)
    if not np.isfinite(array).all():
        raise ClientError(400, f"input {TENSOR!r} holds NaN or infinite values")
    return _Batch(tensor.shape[0], array=array)


def _top_k(parameters: dict[str, Any]) -> int:
    k = parameters.get("top_k", DEFAULT_TOP_K)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_TOP_K:
        raise ClientError(400, f"parameter top_k must be an integer from 1 to {MAX_TOP_K}, got {str(k)[:40]!r}")
    return k


def _wanted(requested: Any, model: Any) -> list[tuple[str, bool, int]]:
    """(output name, as binary, classification count) for each output to answer, in the request's order."""
    names = output_names(model)
    if requested is None:
        return [(name, False, 0) for name in names]
    out, seen = [], set()
    for r in requested:
        if r.name not in names:
            raise ClientError(400, f"unknown output {r.name!r}; this model has {names}")
        if r.name in seen:  # each repeat would be computed and encoded again: an answer many times the request
            raise ClientError(400, f"output {r.name!r} is requested twice; name each output once")
        seen.add(r.name)
        if r.classification and not r.name.endswith(".logits"):
            raise ClientError(400, f"classification is for the logits outputs, not {r.name!r}")
        out.append((r.name, r.binary, r.classification))
    return out


def _output(name: str, answer: dict, model: Any, top_k: int, classification: int) -> OutputTensor:
    head, _, kind = name.rpartition(".")
    labels = model.labels[head]
    k = min(top_k, len(labels))
    if kind == "logits" and classification:
        return _classification(name, answer[head, LOGITS], labels, classification)
    if kind == "logits":
        return OutputTensor(name, "FP32", answer[head, LOGITS])
    ranked = answer[head, RANKED][:, :k]
    if kind == "scores":
        return OutputTensor(name, "FP32", ranked["score"].astype(np.float32))
    return OutputTensor(name, "BYTES", _label_table(model, head)[ranked["index"]])


def _label_table(model: Any, head: str) -> np.ndarray:
    """A head's labels as a numpy array of UTF-8 bytes, made once per loaded version: indexing it with the ranked
    class indices gives the BYTES output in one numpy call (per request, per element, Python cost as much as the
    rest of the answer for a small image)."""
    tables = model.label_tables
    if head not in tables:
        tables[head] = np.array([label.encode() for label in model.labels[head]], dtype=object)
    return tables[head]


def _classification(name: str, logits: np.ndarray, labels: list[str], n: int) -> OutputTensor:
    """Triton's classification extension: the n highest values as "value:index:label", best first."""
    n = min(n, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :n]
    rows = [[f"{logits[b, i]:f}:{i}:{labels[i]}".encode() for i in row] for b, row in enumerate(order)]
    return OutputTensor(name, "BYTES", np.array(rows, dtype=object).reshape(len(rows), n))
