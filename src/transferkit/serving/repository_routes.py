"""Triton's model repository extension, as `tritonclient.http` calls it, behind the API key:

    POST /v2/repository/index                   [{"name", "version", "state": READY|UNAVAILABLE, "reason"?,
                                                  "default"?, "traffic"?}], body {"ready": true} for READY only
    POST /v2/repository/models/{name}/load      load the model's versions (again: versions that failed are
                                                retried); parameters, all optional:
        "version": "V"                          serve V by default: a rollback (or a roll forward) in one call;
                                                "" or null: the newest version again
        "split": {"V1": 90, "V2": 10}           a weighted traffic split, drawn per request ({} ends it)
        "config": "{...}"                       Triton's way: a model configuration whose version_policy
                                                {"specific": {"versions": ["V"]}} names the default
    POST /v2/repository/models/{name}/unload    stop serving the model (requests in flight finish first)

A change is written to the control every worker follows (control.py); the answer comes once every live worker
serves it: 200 {}, 400 with the reason a version failed to load or verify (it never becomes the default), 503
when a worker did not get there within the deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from transferkit.serving.guard import authorized, error, request_id, unauthorized
from transferkit.serving.inputs import ClientError, read_body
from transferkit.serving.repository import Control
from transferkit.serving.sources import check_name

MAX_BODY = 64 << 10
SYNC_TIMEOUT_S = 120.0  # loading and warming a 224 px version takes seconds; a worker that misses this is reported


def _service() -> Any:
    import bentoml

    return bentoml.get_current_service()


async def _parameters(request: Request) -> dict[str, Any]:
    body = await read_body(request.stream(), request.headers.get("content-length"), MAX_BODY)
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ClientError(400, 'the body is not JSON; send {"parameters": {...}} or nothing') from None
    parameters = doc.get("parameters", {}) if isinstance(doc, dict) else None
    if not isinstance(parameters, dict):
        raise ClientError(400, "parameters must be a JSON object")
    return parameters


def _split(value: Any) -> dict[str, float]:
    """{"V1": 90, "V2": 10} or "V1:90,V2:10" -> version -> weight."""
    if isinstance(value, str):
        try:
            value = {k.strip(): float(w) for k, _, w in (p.partition(":") for p in value.split(",") if p.strip())}
        except ValueError:
            raise ClientError(400, 'split must be like {"V1": 90, "V2": 10} or "V1:90,V2:10"') from None
    if not isinstance(value, dict) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in value.values()
    ):
        raise ClientError(400, 'split must map versions to weights >= 0, like {"V1": 90, "V2": 10}')
    if value and (len(value) < 2 or sum(value.values()) <= 0):
        raise ClientError(400, "a split names at least two versions with weights that sum to more than 0")
    return {check_name("version", str(v)): float(w) for v, w in value.items()}


def _default(parameters: dict[str, Any]) -> tuple[bool, str | None]:
    """(whether the request names a default version, the version or None for the newest)."""
    if "version" in parameters:
        version = parameters["version"]
        if version in (None, ""):
            return True, None
        if not isinstance(version, str):
            raise ClientError(400, "parameter version must be a string")
        return True, check_name("version", version)
    config = parameters.get("config")
    if config:
        try:
            versions = json.loads(config)["version_policy"]["specific"]["versions"]
        except (ValueError, TypeError, KeyError):
            return False, None  # a configuration without a specific version: nothing to change
        if isinstance(versions, list) and len(versions) == 1:
            return True, check_name("version", str(versions[0]))
        raise ClientError(400, "config's version_policy.specific.versions must name one version, the default")
    return False, None


async def _apply(request: Request, name: str, change: Any) -> tuple[Any, str]:
    service, rid = _service(), request_id(request)
    generation = await asyncio.to_thread(service.watcher.control.update, name, change)
    workers = service.settings.resolved_workers
    done = await asyncio.to_thread(service.watcher.wait_for, generation, workers, SYNC_TIMEOUT_S)
    if not done:
        raise ClientError(503, f"not every worker applied the change within {SYNC_TIMEOUT_S:g} s; see the server log")
    return service, rid


def _reason(service: Any, name: str, version: str | None = None) -> str:
    rows = [r for r in service.index() if r["name"] == name and (version is None or r["version"] == version)]
    if not rows:
        return f"the repository has no model {name!r}" + (f" version {version!r}" if version else "")
    return "; ".join(f"version {r['version']}: {r['reason']}" for r in rows if r["state"] != "READY") or "unknown"


async def load(request: Request) -> Response:
    service, rid = _service(), request_id(request)
    if not authorized(request, service):
        return unauthorized(rid)
    try:
        name = check_name("model name", request.path_params["name"])
        parameters = await _parameters(request)
        named, version = _default(parameters)
        split = _split(parameters["split"]) if "split" in parameters else None

        if name not in await asyncio.to_thread(service.watcher.known_names):
            raise ClientError(400, f"failed to load {name!r}: the repository has no model {name!r}")
        before = service.watcher.control.read()[1].get(name, Control())

        def change(c: Control) -> Control:
            c = dataclasses.replace(c, unloaded=False, attempt=c.attempt + 1)
            if named:
                c = dataclasses.replace(c, default=version)
            return c if split is None else dataclasses.replace(c, split=split)

        service, rid = await _apply(request, name, change)
        entry = service.repository.models.get(name)
        problem = None
        if entry is None:
            problem = f"failed to load {name!r}: {_reason(service, name)}"
        elif version is not None and entry.default != version:
            problem = f"failed to serve {name!r} version {version!r}: {_reason(service, name, version)}"
        elif split and set(entry.split) != set(split):
            missing = [v for v in split if v not in entry.versions]
            problem = f"failed to split {name!r}: version(s) {missing} not loaded: {_reason(service, name)}"
        if problem:  # what was asked does not stay asked: a version fixed later does not take over unannounced
            await _apply(request, name, lambda c: dataclasses.replace(c, default=before.default, split=before.split))
            raise ClientError(400, problem)
    except ClientError as exc:
        return error(exc.status, str(exc), rid)
    return JSONResponse({}, headers={"X-Request-ID": rid})


async def unload(request: Request) -> Response:
    service, rid = _service(), request_id(request)
    if not authorized(request, service):
        return unauthorized(rid)
    try:
        name = check_name("model name", request.path_params["name"])
        await _parameters(request)  # Triton's unload_dependents: there are no dependents here
        if name not in await asyncio.to_thread(service.watcher.known_names):
            raise ClientError(400, f"failed to unload {name!r}: the repository has no such model")
        service, rid = await _apply(request, name, lambda c: dataclasses.replace(c, unloaded=True, split={}))
    except ClientError as exc:
        return error(exc.status, str(exc), rid)
    return JSONResponse({}, headers={"X-Request-ID": rid})


async def index(request: Request) -> Response:
    service, rid = _service(), request_id(request)
    if not authorized(request, service):
        return unauthorized(rid)
    try:
        body = await read_body(request.stream(), request.headers.get("content-length"), MAX_BODY)
        doc = json.loads(body) if body.strip() else {}
    except ClientError as exc:
        return error(exc.status, str(exc), rid)
    except (ValueError, RecursionError):
        doc = None
    ready_only = doc.get("ready", False) if isinstance(doc, dict) else None
    if not isinstance(ready_only, bool):
        return error(400, 'the body is JSON like {"ready": true}, or nothing', rid)
    rows = [r for r in service.index() if r["state"] == "READY" or not ready_only]
    return JSONResponse(rows, headers={"X-Request-ID": rid})


def routes() -> list[Route]:
    return [
        Route("/v2/repository/index", index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", unload, methods=["POST"]),
    ]
