"""The HTTP face of the service: POST /predict, the Open Inference Protocol's /v2 routes (v2_routes.py) and a
truthful /docs.json, as a Starlette app that the BentoML service mounts (`bentoml.asgi_app`), so BentoML still
runs the server, its workers, /livez /readyz /metrics and its traffic metrics around it.

Why not a `@bentoml.api`: BentoML's input parsing writes every upload to a temporary file, follows a URL
given in place of a file, and answers some malformed bodies with a 500; its adaptive batching needs an HTTP
round trip from the API to the batched step. Here the body is read once with a size cap, parsed by
`inputs.py`, decoded in a small thread pool and batched in-process (`batcher.py`).

Every answer but a 200 is JSON {"error": "...", "request_id": "..."} (guard.py); /predict answers

    400 malformed request or image     401 missing/wrong API key      413 too large (body, pixels, image count)
    415 not multipart/JSON/a raw image body, or an image format other than JPEG/PNG/WebP
    503 at capacity (Retry-After), or shutting down (Connection: close)      504 not answered within the deadline      500 a bug (logged with traceback)
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from transferkit.serving import v2_routes
from transferkit.serving.guard import authorized, error, guarded, request_id, unauthorized
from transferkit.serving.inputs import RAW_IMAGE_TYPES, ClientError, parse_json, parse_multipart, parse_raw, read_body
from transferkit.serving.openapi import document
from transferkit.serving.settings import MAX_UPLOAD_BYTES

LARGE_BODY = 256 << 10
BODY_TYPES = ("multipart/form-data", "application/json", *RAW_IMAGE_TYPES)


async def predict(request: Request) -> Response:
    import bentoml

    return await guarded(request, bentoml.get_current_service(), _answer)


def requested_model(request: Request) -> tuple[str | None, str | None]:
    """The model and version a /predict request names: /predict/<model>[/versions/<v>], else the headers
    X-Model and X-Model-Version, else none (the only model, when the server serves one)."""
    parts = request.url.path.split("/")  # "", "predict", [model, ["versions", v]]
    if len(parts) == 3 and parts[2]:
        return parts[2], request.headers.get("x-model-version")
    if len(parts) == 5 and parts[2] and parts[3] == "versions" and parts[4]:
        return parts[2], parts[4]
    if len(parts) != 2:
        raise ClientError(404, f"no such route {request.url.path[:200]}; POST /predict[/<model>[/versions/<v>]]")
    return request.headers.get("x-model") or None, request.headers.get("x-model-version") or None


async def _answer(request: Request, service: Any, admission: Any, rid: str) -> Response:
    with service.repository.pick(*requested_model(request)).in_use() as model:
        return await _answer_with(request, service, admission, rid, model)


async def _answer_with(request: Request, service: Any, admission: Any, rid: str, model: Any) -> Response:
    settings = service.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in BODY_TYPES:
        got = content_type or "no content type"
        raise ClientError(
            415,
            f"expected multipart/form-data, application/json or {', '.join(RAW_IMAGE_TYPES)}, "
            f"got {got}; e.g. curl -F image=@photo.jpg URL/predict, or curl --data-binary "
            "@photo.jpg -H 'Content-Type: image/jpeg' URL/predict",
        )
    body = await read_body(
        request.stream(), request.headers.get("content-length"), MAX_UPLOAD_BYTES, reserve=admission.add_bytes
    )
    query_top_k = request.query_params.getlist("top_k")
    if query_top_k and content_type not in RAW_IMAGE_TYPES:
        raise ClientError(400, "top_k in the query string is for raw image bodies; send it as a form or JSON field")
    if content_type in RAW_IMAGE_TYPES:
        inputs = parse_raw(body, query_top_k)
    elif content_type == "application/json":
        # base64 of a large body takes milliseconds: off the event loop, which serves every other request
        inputs = (
            parse_json(body, settings.max_images)
            if len(body) < LARGE_BODY
            else await asyncio.to_thread(parse_json, body, settings.max_images)
        )
    else:
        inputs = await parse_multipart(_form_parser(request, body), settings.max_images)
    admission.add(len(inputs.images) - 1)
    predictions = await service.classify(inputs.images, inputs.names, inputs.top_k, admission, model, rid)
    meta = {"model": model.tag, "model_name": model.name, "model_version": model.version, "runtime": model.runtime_name}
    answer = {"predictions": predictions, **meta} if inputs.many else {**predictions[0], **meta}
    service.count_model_answer(model)
    return JSONResponse(answer, headers={"X-Request-ID": rid, "X-Model-Version": model.version})


# An uploaded file over 1 MB would be spooled to a temporary file on disk while the form is parsed: a second copy
# of a body that is already in memory, within the upload limit and counted in the worker's byte budget, and on
# the 1 GiB emptyDir of the Kubernetes manifests a way to fill /tmp. So the parser keeps every file in memory.
MultiPartParser.spool_max_size = MAX_UPLOAD_BYTES


def _form_parser(request: Request, body: bytes):
    """Request.form over the body already read (the stream can be consumed only once)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, replay).form


async def docs(request: Request) -> Response:
    import bentoml

    service = bentoml.get_current_service()
    models = service.repository.models
    names = sorted(models)
    versions = sorted({v for entry in models.values() for v in entry.versions})
    spec = document(service.bento_service.openapi_spec.asdict(), service.settings, names, versions)
    return JSONResponse(spec)


async def metrics(request: Request) -> Response:
    """/metrics when BentoML's own route is off with its per-request metrics (settings.py): the same registry
    (every worker's metrics, BentoML's multiprocess directory), so nothing that scraped it before is lost."""
    import bentoml

    text, content_type = await asyncio.to_thread(bentoml.get_current_service().metrics_text)
    return Response(text, media_type=content_type)


def _metrics_allowed(request: Request) -> bool:
    """/metrics is open unless TRANSFERKIT_METRICS_AUTH puts it behind the API key."""
    import bentoml

    service = bentoml.get_current_service()
    return not service.settings.metrics_auth or authorized(request, service)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing errors on these routes (GET /predict: 405) in the same JSON shape as every other error."""
    status = getattr(exc, "status_code", 500)
    return error(status, str(getattr(exc, "detail", "") or exc), request_id(request), getattr(exc, "headers", None))


# A request's headers: a client needs a dozen; hundreds cost every middleware behind this one their parsing and
# copying, for any route (431 Request Header Fields Too Large before anything else runs)
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 << 10


class InferenceFastPath:
    """ASGI middleware that answers POST /predict and every /v2 route (the Open Inference Protocol) itself and
    passes every other request on. The service puts it in front of everything BentoML wraps around its app
    (protocol.py), or, when a setting needs BentoML's tracing, access log or per-request metrics to see these
    routes, inside them (`add_asgi_middleware`). Either way a request skips BentoML's router, its request
    context, the mount and this app's own router, which together cost a small image as much CPU as its decode
    and answer. Any path under /v2 is answered here, an unknown one with the protocol's JSON 404 (BentoML's
    router would answer some, such as names with a newline, in plain text)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.v2 = Starlette(routes=v2_routes.routes(), exception_handlers={HTTPException: _http_error})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], scope["headers"]
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
            response = error(
                431,
                f"more than {MAX_HEADERS} headers or {MAX_HEADER_BYTES >> 10} KB of them",
                request_id(Request(scope)),
            )
        elif (path == "/predict" or path.startswith("/predict/")) and scope["method"] == "POST":
            response = await predict(Request(scope, receive))
        elif scope["method"] == "POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
            response = await v2_routes.infer_path(Request(scope, receive), path)
        elif path == "/v2" or path.startswith("/v2/"):
            return await self.v2(scope, receive, send)
        elif path == "/metrics" and not _metrics_allowed(Request(scope, receive)):
            response = unauthorized(request_id(Request(scope, receive)))
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)


def create_app() -> Starlette:
    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/{name}", predict, methods=["POST"]),
        Route("/predict/{name}/versions/{version}", predict, methods=["POST"]),
        Route("/docs.json", docs, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
