"""What every inference route does around its own work, once: the request id, the API key, the SIGTERM drain,
admission to the worker's batcher, the deadline, and the mapping of failures to answers. POST /predict
(http_app.py) and the Open Inference Protocol's infer (v2_routes.py) both run through `guarded`, so the two
protocols share one queue, one limit, one key and one set of status codes:

    401 missing/wrong API key      503 at capacity (Retry-After), or shutting down (Connection: close)
    504 not answered within the deadline      4xx a ClientError raised by the route     500 a bug (logged)

Every answer but a 200 is JSON {"error": "...", "request_id": "..."} (the shape both protocols use for errors);
the request id is also the X-Request-ID header and is logged with any server-side failure.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from transferkit.serving.batcher import Overloaded
from transferkit.serving.inputs import ClientError

logger = logging.getLogger("transferkit.serving")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# Request ids: a random prefix per worker and a counter. Unique across workers and restarts like a uuid4, at
# a fraction of its cost per request (uuid4 reads the OS's random source every time).
_ID_PREFIX = uuid.uuid4().hex[:8]
_ID_COUNTER = itertools.count(1)

# (request, service, admission, request id) -> the route's answer
Work = Callable[[Request, Any, Any, str], Awaitable[Response]]


def request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if given and _REQUEST_ID.match(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def error(status: int, message: str, request_id: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": message, "request_id": request_id},
        status_code=status,
        headers={"X-Request-ID": request_id, **(headers or {})},
    )


def authorized(request: Request, service: Any) -> bool:
    """Whether the request may pass the worker's API key check (keys.py: constant-time, rotating)."""
    return not service.keys.required or service.keys.accepts(request.headers.get("authorization", ""))


def unauthorized(rid: str) -> JSONResponse:
    return error(
        401,
        "missing or wrong API key; send the header `Authorization: Bearer <key>`",
        rid,
        {"WWW-Authenticate": 'Bearer realm="transferkit"'},
    )


async def guarded(request: Request, service: Any, work: Work) -> Response:
    """`work`'s response, or the refusal or error that replaces it; counted on /metrics either way."""
    response = await _guarded(request, service, work)
    service.count_answer(response.status_code)
    return response


async def _guarded(request: Request, service: Any, work: Work) -> Response:
    rid = request_id(request)
    settings = service.settings
    if not authorized(request, service):
        return unauthorized(rid)
    if service.drain.draining:  # SIGTERM: this client should go to another replica (drain.py)
        service.drain.turn_away()
        service.count_refusal("shutting down")
        return error(
            503,
            "the server is shutting down; retry, and another replica will answer",
            rid,
            {"Connection": "close", "Retry-After": "1"},
        )
    try:
        with service.drain.request(), service.budget.admit(1) as admission:  # refuse before reading the body
            return await _within(settings.timeout_s, work(request, service, admission, rid))
    except Overloaded as exc:
        service.count_refusal("overloaded")
        return error(503, str(exc), rid, {"Retry-After": str(exc.retry_after)})
    except ClientError as exc:
        return error(exc.status, str(exc), rid)
    except asyncio.TimeoutError:
        service.count_refusal("timeout")
        return error(504, f"not answered within {settings.timeout_s:g} s; retry later or send fewer images", rid)
    except Exception:  # noqa: BLE001 - a bug: logged in full, answered in JSON, and the worker keeps serving
        logger.exception("request %s failed", rid)
        return error(500, f"internal error; the server log has the details under request id {rid}", rid)


async def _within(seconds: float, work: Any) -> Any:
    """`work` or asyncio.TimeoutError after `seconds`; asyncio.timeout (3.11+) runs it in this task, where
    wait_for would make a task per request."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)
