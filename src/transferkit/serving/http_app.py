"""The HTTP face of the service: POST /predict and a truthful /docs.json, as a Starlette app that the BentoML
service mounts (`bentoml.asgi_app`), so BentoML still runs the server, its workers, /livez /readyz /metrics
and its traffic metrics around it.

Why not a `@bentoml.api`: BentoML's input parsing writes every upload to a temporary file, follows a URL
given in place of a file, and answers some malformed bodies with a 500; its adaptive batching needs an HTTP
round trip from the API to the batched step. Here the body is read once with a size cap, parsed by
`inputs.py`, decoded in a small thread pool and batched in-process (`batcher.py`).

Every answer but a 200 is JSON {"error": "...", "request_id": "..."}; the request id is also the
X-Request-ID header and is logged with any server-side failure:

    400 malformed request or image     401 missing/wrong API key      413 too large (body, pixels, image count)
    415 not multipart/JSON/a raw image body, or an image format other than JPEG/PNG/WebP
    503 at capacity (Retry-After), or shutting down (Connection: close)      504 not answered within the deadline      500 a bug (logged with traceback)
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import re
import sys
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from transferkit.serving.batcher import Overloaded
from transferkit.serving.inputs import RAW_IMAGE_TYPES, ClientError, parse_json, parse_multipart, parse_raw, read_body
from transferkit.serving.openapi import document
from transferkit.serving.settings import MAX_UPLOAD_BYTES

logger = logging.getLogger("transferkit.serving")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LARGE_BODY = 256 << 10
BODY_TYPES = ("multipart/form-data", "application/json", *RAW_IMAGE_TYPES)


# Request ids: a random prefix per worker and a counter. Unique across workers and restarts like a uuid4, at
# a fraction of its cost per request (uuid4 reads the OS's random source every time).
_ID_PREFIX = uuid.uuid4().hex[:8]
_ID_COUNTER = itertools.count(1)


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if given and _REQUEST_ID.match(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def error(status: int, message: str, request_id: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message, "request_id": request_id},
        status_code=status,
        headers={"X-Request-ID": request_id, **(headers or {})},
    )


def _authorized(request: Request, key: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes the same time wherever the first difference is, so the key cannot be guessed
    # byte by byte from response times.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def predict(request: Request) -> Response:
    import bentoml

    service = bentoml.get_current_service()
    response = await _predict(request, service)
    service.count_answer(response.status_code)
    return response


async def _predict(request: Request, service: Any) -> Response:
    request_id = _request_id(request)
    settings = service.settings
    if settings.api_key and not _authorized(request, settings.api_key):
        return error(
            401,
            "missing or wrong API key; send the header `Authorization: Bearer <key>`",
            request_id,
            {"WWW-Authenticate": 'Bearer realm="transferkit"'},
        )
    if service.drain.draining:  # SIGTERM: this client should go to another replica (drain.py)
        service.drain.turn_away()
        service.count_refusal("shutting down")
        return error(
            503,
            "the server is shutting down; retry, and another replica will answer",
            request_id,
            {"Connection": "close", "Retry-After": "1"},
        )
    try:
        with service.drain.request(), service.batcher.admit(1) as admission:  # refuse before reading the body
            answer = await _within(settings.timeout_s, _answer(request, service, admission))
    except Overloaded as exc:
        service.count_refusal("overloaded")
        return error(503, str(exc), request_id, {"Retry-After": str(exc.retry_after)})
    except ClientError as exc:
        return error(exc.status, str(exc), request_id)
    except asyncio.TimeoutError:
        service.count_refusal("timeout")
        return error(504, f"not answered within {settings.timeout_s:g} s; retry later or send fewer images", request_id)
    except Exception:  # noqa: BLE001 - a bug: logged in full, answered in JSON, and the worker keeps serving
        logger.exception("request %s failed", request_id)
        return error(500, f"internal error; the server log has the details under request id {request_id}", request_id)
    return JSONResponse(answer, headers={"X-Request-ID": request_id})


async def _within(seconds: float, work: Any) -> Any:
    """`work` or asyncio.TimeoutError after `seconds`; asyncio.timeout (3.11+) runs it in this task, where
    wait_for would make a task per request."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)


async def _answer(request: Request, service: Any, admission: Any) -> dict[str, Any]:
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
    body = await read_body(request.stream(), request.headers.get("content-length"), MAX_UPLOAD_BYTES)
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
    predictions = await service.classify(inputs.images, inputs.names, inputs.top_k)
    meta = {"model": service.tag, "runtime": service.runtime_name}
    if inputs.many:
        return {"predictions": predictions, **meta}
    return {**predictions[0], **meta}


def _form_parser(request: Request, body: bytes):
    """Request.form over the body already read (the stream can be consumed only once)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, replay).form


async def docs(request: Request) -> Response:
    import bentoml

    service = bentoml.get_current_service()
    return JSONResponse(document(service.bento_service.openapi_spec.asdict(), service.settings))


async def metrics(request: Request) -> Response:
    """/metrics when BentoML's own route is off with its per-request metrics (settings.py): the same registry
    (every worker's metrics, BentoML's multiprocess directory), so nothing that scraped it before is lost."""
    import bentoml

    text, content_type = await asyncio.to_thread(bentoml.get_current_service().metrics_text)
    return Response(text, media_type=content_type)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing errors on these routes (GET /predict: 405) in the same JSON shape as every other error."""
    status = getattr(exc, "status_code", 500)
    return error(status, str(getattr(exc, "detail", "") or exc), _request_id(request), getattr(exc, "headers", None))


class PredictFastPath:
    """ASGI middleware that answers POST /predict itself and passes every other request on. The service puts it
    in front of everything BentoML wraps around its app (protocol.py), or, when a setting needs BentoML's
    tracing, access log or per-request metrics to see /predict, inside them (`add_asgi_middleware`). Either
    way a request skips BentoML's router, its request context, the mount and this app's own router, which
    together cost a small image as much CPU as its decode and answer; the response is the one the /predict
    route gives."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            response = await predict(Request(scope, receive))
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def create_app() -> Starlette:
    from starlette.exceptions import HTTPException

    routes = [
        Route("/predict", predict, methods=["POST"]),
        Route("/docs.json", docs, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
